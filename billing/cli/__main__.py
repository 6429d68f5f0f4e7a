from billing.cli.main import app

app()
