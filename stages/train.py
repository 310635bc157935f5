"""Stage `train` (not implemented yet)."""
import click

from stages.errors import StageError


@click.command("train")
def command():
    raise StageError("train: not implemented yet")
