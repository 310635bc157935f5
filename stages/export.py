"""Stage `export` (not implemented yet)."""
import click

from stages.errors import StageError


@click.command("export")
def command():
    raise StageError("export: not implemented yet")
