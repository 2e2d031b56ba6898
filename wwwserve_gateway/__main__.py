from wwwserve_gateway.cli import app

app()
