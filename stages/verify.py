"""Stage `verify` (not implemented yet)."""
import click

from stages.errors import StageError


@click.command("verify")
def command():
    raise StageError("verify: not implemented yet")
