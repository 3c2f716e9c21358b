from m3compile.cli import app

app()
