"""Stage `run`: (regenerate ->) dump-teacher -> train -> export -> eval from one `pipeline.yaml`, skipping
finished stages.

Each section of the file holds one stage's options (the same keys as its CLI flags, validated exactly as
`eagle-pipe -c FILE STAGE` validates them: stages/config.py). Every stage is called in-process with
`ctx.invoke(stage.command, **options)` and returns its summary dict. Paths the stages share are wired for you
when a section leaves them out: dump-teacher.data = regenerate.out and regenerate.target = dump-teacher.target
(with a `regenerate` section); train.teacher_dir = dump-teacher.out; eval.target = dump-teacher.target;
eval.draft = RUN/export (or export.out); eval.run_dir = RUN; eval.report = RUN/eval_report.json (eval's whole report:
per category, per turn, per prompt, timings).

A stage is skipped when its outputs are complete and were made with the same settings:
  regenerate    every shard's done.json was written under a manifest equal to the one these options give;
  dump-teacher  OUT/manifest.json `settings` equal the options' and `verify` finds no problem;
  train         RUN/train_summary.json (written last) holds the same `settings`, and RUN/export/ exists;
  export        (only with an `export` section) its output has config.json + model.safetensors and train was
                skipped. eval always runs: it is the measurement.
A train run killed half-way (checkpoints but no train_summary.json) is resumed. `--force` runs every stage
anyway (each stage's own checks still apply: train refuses a RUN that holds a finished run).
"""
from __future__ import annotations

import dataclasses
import importlib
import json as jsonlib
import time
from pathlib import Path

import click

from stages.cli import COMMANDS
from stages.config import check_section, load_pipeline_file
from stages.errors import StageError
from stages.train.settings import TrainSettings

# a pipeline's sections, in the order they run: every command of stages/cli.py's table (which names each one's
# module) but `verify` (dump_is_complete runs it on the dump) and `run` itself
PIPELINE_STAGES = tuple(name for name in COMMANDS if name not in ("verify", "run"))
REQUIRED = ("dump-teacher", "train", "eval")


def stage_command(name: str) -> click.Command:
    return importlib.import_module(COMMANDS[name][0]).command


def load_sections(path: str) -> dict[str, dict]:
    """The file's sections, checked like stages/cli.py does, with the shared paths wired between stages."""
    sections = load_pipeline_file(path)
    for name, values in sections.items():
        if name not in PIPELINE_STAGES:
            raise StageError(f"{path}: unknown section '{name}' (a pipeline has: {', '.join(PIPELINE_STAGES)})")
        check_section(path, name, values, stage_command(name))
    missing = [name for name in REQUIRED if name not in sections]
    if missing:
        raise StageError(f"{path}: missing section(s) {', '.join(missing)} (a pipeline needs {', '.join(REQUIRED)})")
    dump, train, evaluation = sections["dump-teacher"], sections["train"], sections["eval"]
    regen = sections.get("regenerate")
    if regen is not None:  # the target answers the data's prompts; dump-teacher reads its answers
        if "target" in dump:
            regen.setdefault("target", dump["target"])
        if "out" in regen:
            dump.setdefault("data", [regen["out"]])
    if "out" in dump:
        train.setdefault("teacher_dir", dump["out"])
    if "target" in dump:
        evaluation.setdefault("target", dump["target"])
    if dump.get("trust_remote_code"):
        evaluation.setdefault("trust_remote_code", True)
    if "out" in train:
        evaluation.setdefault("run_dir", train["out"])
        evaluation.setdefault("report", str(Path(train["out"]) / "eval_report.json"))
        export = sections.get("export")
        if export is not None:
            export.setdefault("checkpoint", train["out"])  # its newest checkpoint
            evaluation.setdefault("draft", export.get("out", str(Path(train["out"]) / "export")))
        else:
            evaluation.setdefault("draft", str(Path(train["out"]) / "export"))
    return sections


def resolve_options(path: str, name: str, values: dict) -> dict:
    """Every option of the stage, converted by click exactly as for `eagle-pipe -c FILE NAME`."""
    command = stage_command(name)
    values = dict(values)
    for param in command.params:  # a single path for a repeatable option is a one-item list
        if getattr(param, "multiple", False) and isinstance(values.get(param.name), str):
            values[param.name] = [values[param.name]]
    try:
        ctx = command.make_context(name, [], default_map=values)
    except click.ClickException as e:
        raise StageError(f"{path}: section '{name}': {e.format_message()}") from None
    return dict(ctx.params)


# ------------------------------------------------------------------------------------------------ skipping
def _jsonable(value):
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def expected_dump_settings(options: dict, num_layers: int) -> dict:
    """The `settings` dump-teacher would write for these options (its own helpers, without loading the target)."""
    from stages.shards.aux import storage_dtype
    from stages.sharding import shard_from_env
    from stages.dump.forward import parse_aux_layers
    from stages.target import dtype_name, resolve_device, resolve_dtype
    from stages.paths import local_or_name

    device = resolve_device(options.get("device"))
    _, num_shards = shard_from_env(options.get("shard_index"), options.get("num_shards"))
    topk = options["teacher"] == "topk"
    dtype = resolve_dtype(options.get("dtype"), device)
    engine = {} if options["engine"] == "hf" else {"engine": options["engine"]}  # as DumpSettings.record
    return {
        **engine, "target": local_or_name(options["target"]), "data": [local_or_name(s) for s in options["data"]],
        "dtype": dtype_name(dtype), "aux_dtype": dtype_name(storage_dtype(options["aux_dtype"], dtype)),
        "aux_layers": list(parse_aux_layers(options.get("aux_layers"), num_layers)),
        "teacher": options["teacher"], "top_k": options["top_k"] if topk else None,
        "max_seq_len": options["max_seq_len"], "loss_on": options["loss_on"], "num_shards": num_shards,
        "part_tokens": options["part_tokens"], "batch_tokens": options["batch_tokens"], "limit": options["limit"],
    }


def dump_is_complete(options: dict) -> tuple[bool, str]:
    """(complete for these settings, why not)."""
    from stages import shards
    from stages.shards.verify import verify_dump

    if not options.get("out") or not options.get("target"):
        return False, "no --out/--target"
    out = Path(options["out"])
    manifest_path = out / "manifest.json"
    if not manifest_path.is_file():
        return False, f"{manifest_path} does not exist"
    try:
        manifest = shards.read_json(manifest_path)
        expected = expected_dump_settings(options, int(manifest["target"]["num_layers"]))
    except (ValueError, KeyError, TypeError, StageError) as e:
        return False, f"{manifest_path}: cannot compare settings ({e})"
    if _jsonable(manifest.get("settings")) != _jsonable(expected):
        return False, "settings changed"
    problems = verify_dump(out)
    if problems:
        return False, f"verify: {problems[0]}"
    return True, "complete"


def dump_summary_from_disk(out: str) -> dict:
    """The summary of a finished dump, read back from its manifest and every shard's done.json."""
    from stages import shards

    manifest = shards.read_json(Path(out) / "manifest.json")
    tokens = supervised = parts_bytes = sequences = 0
    for i in range(int(manifest["num_shards"])):
        done = shards.read_done(Path(out), i, int(manifest["num_shards"]))
        tokens += done["num_tokens"]
        supervised += done["num_supervised_tokens"]
        sequences += done["records"]["written"]
        parts_bytes += sum(p["bytes"] for p in done["parts"])
    return {"out": str(out), "sequences": sequences, "tokens": tokens, "supervised_tokens": supervised,
            "bytes": parts_bytes, "bytes_per_token": parts_bytes / tokens if tokens else 0.0}


def train_is_complete(options: dict) -> tuple[bool, str]:
    """(RUN/train_summary.json records the same settings and RUN/export/ exists, why not)."""
    run = Path(options["out"])
    summary_path = run / "train_summary.json"
    if not summary_path.is_file():
        return False, f"{summary_path} does not exist"
    if not (run / "export" / "config.json").is_file():
        return False, f"{run / 'export'} is missing"
    try:
        recorded = jsonlib.loads(summary_path.read_text()).get("settings")
    except (ValueError, AttributeError) as e:
        return False, f"{summary_path}: unreadable ({e})"
    if not isinstance(recorded, dict):
        return False, f"{summary_path} holds no settings"
    defaults = {f.name: f.default for f in dataclasses.fields(TrainSettings)
                if f.default is not dataclasses.MISSING}
    # an option added after the run was recorded counts as its default (an older summary lacks the key)
    changed = sorted(k for k, v in options.items() if k not in TRAIN_SETTINGS_IGNORED
                     and not _same(recorded.get(k, _jsonable(defaults.get(k))), _jsonable(v)))
    if changed:
        return False, f"settings changed: {', '.join(changed)}"
    return True, "complete"


# train options that do not change the trained draft
TRAIN_SETTINGS_IGNORED = {"resume", "num_workers", "log_every", "keep_checkpoints"}


def _same(recorded, wanted) -> bool:
    if _jsonable(recorded) == wanted:
        return True
    if isinstance(recorded, str) and isinstance(wanted, str):  # the same path written two ways
        return Path(recorded).expanduser().resolve() == Path(wanted).expanduser().resolve()
    return False


def export_is_complete(options: dict) -> bool:
    out = options.get("out")
    return bool(out) and (Path(out) / "config.json").is_file() and (Path(out) / "model.safetensors").is_file()


# ------------------------------------------------------------------------------------------------ the run
def run_pipeline(ctx: click.Context, path: str, force: bool = False) -> dict:
    """Run (or skip) every stage; returns the one pipeline summary."""
    sections = load_sections(path)
    # resolved up front so a missing or bad option fails before hours of work; export's checkpoint
    # argument must exist, so it is resolved when its turn comes
    options = {name: resolve_options(path, name, values) for name, values in sections.items() if name != "export"}
    started = time.perf_counter()
    status, results = {}, {}

    seconds = {}

    def stage(name: str, complete: bool, why: str) -> None:
        if complete and not force:
            status[name] = "skipped"
            click.echo(f"== {name}: skipped ({why})", err=True)
            return
        click.echo(f"== {name}" + ("" if complete else f" ({why})"), err=True)
        t0 = time.perf_counter()
        results[name] = ctx.invoke(stage_command(name), **options[name])
        seconds[name] = time.perf_counter() - t0
        status[name] = f"ran in {seconds[name]:.1f} s"

    if "regenerate" in options:
        from stages.regenerate.stage import is_complete as regenerate_is_complete

        stage("regenerate", *regenerate_is_complete(options["regenerate"]))
    stage("dump-teacher", *dump_is_complete(options["dump-teacher"]))
    done, why = train_is_complete(options["train"])
    if not done and not force and has_partial_run(options["train"]["out"]):
        options["train"]["resume"] = True  # a pipeline killed during training continues where it stopped
        why += "; resuming the interrupted run"
    stage("train", done, why)
    if "export" in sections:
        options["export"] = resolve_options(path, "export", sections["export"])
        fresh = status["train"] == "skipped" and export_is_complete(options["export"])
        stage("export", fresh, "complete" if fresh else "train ran or the output is missing")
    stage("eval", False, "always measured")

    dump = dump_summary_from_disk(options["dump-teacher"]["out"])
    train = results.get("train") or jsonlib.loads((Path(options["train"]["out"]) / "train_summary.json").read_text())
    report = results["eval"]
    return {
        "data": [str(d) for d in options["dump-teacher"]["data"]],
        "sequences": dump["sequences"], "tokens": dump["tokens"], "supervised_tokens": dump["supervised_tokens"],
        "teacher_dir": dump["out"], "teacher_bytes": dump["bytes"], "teacher_bytes_per_token": dump["bytes_per_token"],
        "training_seconds": train.get("wall_time_s"), "training_steps": train.get("steps"),
        "draft": options["eval"]["draft"], "run_dir": options["train"]["out"],
        "eval_report": options["eval"].get("report"),
        "acceptance_length": report["acceptance_length"], "per_position_acceptance": report["per_position_acceptance"],
        "simulated_acceptance_length": report["simulated_acceptance_length"], "draft_tokens": report["draft_tokens"],
        "lossless": report["lossless"], "tokens_per_s": report["tokens_per_s"],
        "baseline_tokens_per_s": report["baseline_tokens_per_s"],
        "per_category": report.get("per_category"), "per_turn": report.get("per_turn"),
        "num_prompts": report.get("num_prompts"), "num_turns": report.get("num_turns"),
        "max_new_tokens": report.get("max_new_tokens"), "eval_dtype": report.get("dtype"),
        "final_eval": train.get("final_eval"), "stage_seconds": seconds,
        "stages": status, "seconds": time.perf_counter() - started,
    }


def has_partial_run(run_dir: str) -> bool:
    """A train run directory with a complete checkpoint but no train_summary.json (interrupted)."""
    from stages.train.checkpoint import latest_checkpoint

    run = Path(run_dir)
    return not (run / "train_summary.json").exists() and latest_checkpoint(run / "checkpoints") is not None


def format_summary(summary: dict) -> str:
    def num(v, spec):
        return "-" if v is None else format(v, spec)

    rows = [
        ("data", ", ".join(summary["data"])),
        ("teacher dump", f"{summary['teacher_dir']}: {summary['sequences']} sequences, {summary['tokens']} tokens "
                         f"({summary['supervised_tokens']} supervised), "
                         f"{num(summary['teacher_bytes_per_token'], '.0f')} bytes/token"),
        ("training time", f"{num(summary['training_seconds'], '.1f')} s"),
        ("acceptance length", f"{num(summary['acceptance_length'], '.2f')} at K={summary['draft_tokens']} "
                              f"(simulated in training: {num(summary['simulated_acceptance_length'], '.2f')})"),
        ("tokens/s", f"{num(summary['tokens_per_s'], '.1f')} speculative, "
                     f"{num(summary['baseline_tokens_per_s'], '.1f')} target alone"),
        ("lossless", "yes" if summary["lossless"] else "NO"),
        ("draft", summary["draft"]),
        ("eval report", summary.get("eval_report") or "-"),
        ("stages", ", ".join(f"{k} {v}" for k, v in summary["stages"].items())),
        ("total", f"{summary['seconds']:.1f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


@click.command("run")
@click.argument("pipeline", default="pipeline.yaml", type=click.Path(dir_okay=False))
@click.option("--json", "json", is_flag=True, help="Make the last line of the output the summary as JSON.")
@click.option("--force", is_flag=True, help="Run every stage even when its outputs are complete.")
@click.pass_context
def command(ctx, pipeline, json, force):
    """Run (regenerate ->) dump-teacher -> train -> export -> eval as configured in PIPELINE (default pipeline.yaml)."""
    summary = run_pipeline(ctx, pipeline, force=force)
    click.echo("== summary")
    click.echo(format_summary(summary))
    if json:
        click.echo(jsonlib.dumps(summary))
    return summary
