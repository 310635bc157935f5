"""The `eagle-pipe` command line: a short table of stages, each a click command in its own module.

Stage modules are imported only when their command runs, so `eagle-pipe --help` stays fast.
"""
from __future__ import annotations

import importlib

import click

from stages.config import check_section, load_pipeline_file
from stages.errors import StageError

# command name -> (module, one-line help); the one table: stages/run.py's pipeline runs these in this order, but
# verify and run
COMMANDS = {
    "regenerate": ("stages.regenerate.stage", "Replace the data's assistant turns with the target's own answers (on-policy data)."),
    "dump-teacher": ("stages.dump.stage", "Run the target once and write teacher shards (stage one)."),
    "verify": ("stages.shards.verify", "Check a teacher dump: shards complete, checksums, every record accounted for."),
    "train": ("stages.train.stage", "Train a draft (EAGLE-3 or DFlash) from teacher shards, without the target (stage two)."),
    "export": ("stages.train.export", "Export a training checkpoint in the layout vLLM and SGLang serve."),
    "eval": ("stages.evaluate.stage", "Measure acceptance length with real speculative decoding (lossless check)."),
    "run": ("stages.run", "Run (regenerate ->) dump-teacher -> train -> export -> eval as configured in pipeline.yaml."),
}


class StageGroup(click.Group):
    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module = importlib.import_module(COMMANDS[name][0])
        return module.command

    def format_commands(self, ctx, formatter):
        rows = [(name, help_) for name, (_, help_) in COMMANDS.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=StageGroup, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False),
              help="pipeline.yaml whose sections (one per stage) supply option defaults; flags override it.")
@click.version_option(package_name="eagle-pipe")
@click.pass_context
def main(ctx: click.Context, config_path: str | None) -> None:
    """eagle-pipe: train speculative-decoding drafts (EAGLE-3, DFlash) offline from cached teacher outputs."""
    if config_path is None:
        return
    sections = load_pipeline_file(config_path)
    for section, values in sections.items():
        if section not in COMMANDS:
            raise StageError(f"{config_path}: unknown section '{section}' (known: {', '.join(COMMANDS)})")
        check_section(config_path, section, values, main.get_command(ctx, section))
    ctx.default_map = sections
    ctx.meta["config_path"] = config_path


if __name__ == "__main__":
    main()
