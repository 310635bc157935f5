"""Stage `dump-teacher` (not implemented yet)."""
import click

from stages.errors import StageError


@click.command("dump-teacher")
def command():
    raise StageError("dump-teacher: not implemented yet")
