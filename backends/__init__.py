"""Backend adapters, installed as wwwserve_gateway.backends and registered through entry points."""
