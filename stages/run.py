"""Stage `run` (not implemented yet)."""
import click

from stages.errors import StageError


@click.command("run")
def command():
    raise StageError("run: not implemented yet")
