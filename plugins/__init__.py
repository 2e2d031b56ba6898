"""Built-in plugins, installed as wwwserve_gateway.plugins and registered through entry points."""
