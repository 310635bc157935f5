"""The one error type a stage raises for bad input or settings: printed as one line, exit code 2."""
import click


class StageError(click.ClickException):
    """A user-facing failure: bad input, bad settings, a dump that cannot be used. No traceback."""

    exit_code = 2
