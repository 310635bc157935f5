"""Stage `eval` (not implemented yet)."""
import click

from stages.errors import StageError


@click.command("eval")
def command():
    raise StageError("eval: not implemented yet")
