"""The resumable sharded job that dump-teacher and regenerate both are: one implementation of its mechanics.

Jobs, one per shard (--shard-index/--num-shards, a SLURM array, torchrun ranks), write into one OUT, each into its
own shard directory, in this order:

1. `claim_manifest`: OUT/manifest.json records what changes the output; every job writes it or accepts an equal
   one; a different one is refused in one line unless --overwrite, which removes the old job's outputs. Equal
   content and an atomic rename make concurrent jobs safe.
2. `open_shard`: the shard directory, cleared of a crashed run's temporaries; a shard whose done.json was written
   under this manifest is complete and skipped.
3. `reusable_part`: a planned part already on disk is kept when it holds what the plan says (the stage's own
   check); one that does not is removed, with one line, and computed again. Parts are written atomically, so a
   rerun after a crash or a preemption computes only what is missing.
4. `done_record`, `write_done` (last: it marks the shard complete), `summary_from_done`, `print_summary`: the
   records accounting every job keeps (records in the input, read, written, skipped by reason) next to the
   stage's own, and this run's rate.

What a part holds and how the stage checks it are the stage's: the teacher dump's format is stages/shards, the
regenerated data's stages/data/regenerated.py.
"""
from __future__ import annotations

import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

import click

from stages import shards
from stages.errors import StageError

DONE = "done.json"
T = TypeVar("T")


# ------------------------------------------------------------------------------------------------ manifest
def _identity(manifest: dict) -> dict:
    return manifest


def claim_manifest(out: Path, manifest: dict, *, overwrite: bool, outputs: Iterable[Path], kind: str,
                   compared: Callable[[dict], dict] = _identity) -> None:
    """Write OUT/manifest.json, or accept one equal to `manifest` in its `compared` part (regenerate leaves out
    where its server was). Another manifest, or `outputs` (the paths a job of this kind writes in OUT) without
    one, is refused naming the first differing field, unless `overwrite`, which removes those outputs. `kind`
    names the output in messages ("dump": "OUT holds another dump")."""
    path = Path(out) / "manifest.json"
    present = [p for p in outputs if p.exists()]
    if path.is_file() or present:
        existing, diff = _read_manifest(path)
        if diff is None:
            diff = shards.manifest_difference(compared(existing), compared(manifest))
        if diff is None:
            if existing != manifest:   # equal where it counts: record this run's uncompared fields
                shards.atomic_write_json(path, manifest)
            return
        if not overwrite:
            raise StageError(f"{out} holds another {kind} ({diff}); pass --overwrite to replace it, or another --out")
        click.echo(f"--overwrite: removing the previous {kind} in {out} ({diff})", err=True)
        for p in present:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
    shards.atomic_write_json(path, manifest)
    written, diff = _read_manifest(path)
    if diff is None:
        diff = shards.manifest_difference(compared(written), compared(manifest))
    if diff is not None:
        raise StageError(f"{out}: another job wrote a different manifest at the same time ({diff})")


def _read_manifest(path: Path) -> tuple[dict | None, str | None]:
    """(the manifest, None), or (None, why it cannot be compared)."""
    try:
        manifest = shards.read_json(path)
    except FileNotFoundError:
        return None, "manifest.json is missing"
    except (OSError, ValueError):
        return None, "manifest.json is not valid JSON"
    if not isinstance(manifest, dict):
        return None, "manifest.json is not a JSON object"
    return manifest, None


# ------------------------------------------------------------------------------------------------ shard
def open_shard(directory: Path, manifest_sha256: str) -> dict | None:
    """Make the shard directory and remove a crashed run's temporaries. Returns done.json when the shard was
    completed under this manifest (and says so on stderr); otherwise removes a stale or unreadable done.json
    and returns None."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shards.remove_stale_temporaries(directory)
    path = directory / DONE
    try:
        done = shards.read_json(path)
    except (OSError, ValueError):
        done = None
    if isinstance(done, dict) and done.get("manifest_sha256") == manifest_sha256:
        click.echo(f"shard {done['shard_index']}/{done['num_shards']} is already complete in {directory}", err=True)
        return done
    path.unlink(missing_ok=True)
    return None


def reusable_part(path: Path, holds_plan: Callable[[Path], T | None], *, marker: Path | None = None) -> T | None:
    """A finished part that holds what the plan says: what `holds_plan(path)` returns for it (the stage's check:
    the planned records, a checksum; None, or any error, when the part fails it). A part that was never finished
    (`path`, or `marker`, the file whose presence marks it finished, missing) gives None silently; one that fails
    the check is removed, with its marker, in one line on stderr, and gives None: the caller computes it again."""
    path = Path(path)
    if not path.is_file() or (marker is not None and not Path(marker).is_file()):
        return None
    try:
        found = holds_plan(path)
    except Exception:  # a torn or foreign file raises whatever its reader raises (safetensors has its own errors)
        found = None
    if found is not None:
        return found
    click.echo(f"{path}: does not match the plan; recomputing it", err=True)
    for p in (marker, path):
        if p is not None:
            Path(p).unlink(missing_ok=True)
    return None


# ------------------------------------------------------------------------------------------------ done, summary
def done_record(*, shard_index: int, num_shards: int, manifest_sha256: str, num_records: int, parts: list[dict],
                assigned: int, written: Iterable[int], skipped: dict[str, list[int]], **fields) -> dict:
    """done.json: the records accounting of every sharded job, then the stage's own `fields`. `assigned`: this
    shard's records (written or skipped); `written`: their sample indices; `skipped`: {reason: sample indices};
    `num_records`: records in the whole input (all shards). Holds no timings, so a rerun writes the same bytes."""
    written = sorted(written)
    return {"shard_index": shard_index, "num_shards": num_shards, "manifest_sha256": manifest_sha256,
            "num_records": num_records, "parts": parts,
            "records": {"assigned": assigned, "written": len(written),
                        "skipped": {r: len(v) for r, v in sorted(skipped.items())}},
            "written_sample_indices": written,
            "skipped_sample_indices": {r: sorted(v) for r, v in sorted(skipped.items())}, **fields}


def write_done(directory: Path, done: dict) -> None:
    """Write done.json, atomically and last: its presence marks the shard complete."""
    shards.atomic_write_json(Path(directory) / DONE, done)


def summary_from_done(out: Path, done: dict, *, tokens_now_key: str, tokens_now: int, seconds: float,
                      **fields) -> dict:
    """A shard's summary: which shard, its records (in the input, read, skipped by reason), the stage's `fields`,
    and this run's work: `tokens_now` tokens made (under `tokens_now_key`) in `seconds` (0 and 0.0 for a shard
    found complete)."""
    return {"out": str(out), "shard_index": done["shard_index"], "num_shards": done["num_shards"],
            "records_in_input": done["num_records"], "records_read": done["records"]["assigned"],
            "skipped": done["records"]["skipped"], **fields, tokens_now_key: tokens_now, "seconds": seconds,
            "tokens_per_s": tokens_now / seconds if tokens_now and seconds else None}


def counts(by_name: dict[str, int]) -> str:
    """{"a": 1, "b": 2} -> "a 1, b 2"; "none" when empty."""
    return ", ".join(f"{name} {n}" for name, n in by_name.items()) or "none"


def print_summary(summary: dict, details: list[str], *, tokens_now_key: str, verb: str) -> None:
    """The summary on stderr: the records line every job prints, the stage's `details` lines, then this run's
    work ("  {verb} N tokens in S s (R tokens/s)")."""
    rate = f" ({summary['tokens_per_s']:,.1f} tokens/s)" if summary["tokens_per_s"] else ""
    click.echo("\n".join([
        f"shard {summary['shard_index']}/{summary['num_shards']}: records read {summary['records_read']} "
        f"(of {summary['records_in_input']} in the input), skipped: {counts(summary['skipped'])}",
        *details,
        f"  {verb} {summary[tokens_now_key]} tokens in {summary['seconds']:.1f} s{rate}"]), err=True)
