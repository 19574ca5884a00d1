"""`python -m ftcli` runs the same command line as the `ftcli` script."""

from ftcli.cli import app

app(prog_name="ftcli")
