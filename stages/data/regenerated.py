"""The output of `eagle-pipe regenerate`: the contract between it (writer) and every stage reading data.

Layout of OUT::

    OUT/manifest.json                          format, schema_version, target, engine {kind, ...}, endpoint (the
                                               server's URL, not compared), settings {every option that changes
                                               the text}, data {sources, fingerprint}, num_shards
    OUT/shard-IIIII-of-NNNNN/part-PPPPP.jsonl  one regenerated record per line, in sample_index order:
                                               {"messages": [...], "source": {"sample_index", "location"},
                                                "generation": {"finish_reasons": [...], "num_tokens": [...]}}
    OUT/shard-IIIII-of-NNNNN/part-PPPPP.json   the part's bookkeeping (planned and written sample indices,
                                               skips with reason and location, turns, tokens), written after it
    OUT/shard-IIIII-of-NNNNN/done.json         written last: parts {file, sha256, bytes, num_records},
                                               manifest_sha256, num_records, records {assigned, written,
                                               skipped}, written/skipped sample indices, skipped_examples,
                                               turns, generated_tokens, finish_reasons; no timings

Records go to shard `sample_index % num_shards`. `read_regenerated` is the record reader that
stages/data/sources.py uses for such a directory: all shards merged by the original sample_index.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

from stages import shards
from stages.errors import StageError

FORMAT = "eagle-pipe-regenerated"
SCHEMA_VERSION = 1
MANIFEST_UNCOMPARED = ("endpoint",)   # where the server was: a restarted server elsewhere may resume the run


def shard_dir(out: Path, shard_index: int, num_shards: int) -> Path:
    return Path(out) / f"shard-{shard_index:05d}-of-{num_shards:05d}"


def part_name(part_index: int) -> str:
    return f"part-{part_index:05d}.jsonl"


def bookkeeping_name(part_index: int) -> str:
    return f"part-{part_index:05d}.json"


def is_regenerated_dir(path: Path) -> bool:
    manifest = Path(path) / "manifest.json"
    if not manifest.is_file():
        return False
    try:
        return shards.read_json(manifest).get("format") == FORMAT
    except (ValueError, AttributeError):
        return False


def read_regenerated(out: Path, start: int, select) -> Iterator:
    """A record reader (stages/data/sources.py) over a complete OUT: the written records of every shard,
    merged by their original sample_index, so the order does not depend on the number of shards. `where` is
    `part.jsonl:LINE`; returns the number of records."""
    import heapq

    out = Path(out)
    try:
        num_shards = int(shards.read_json(out / "manifest.json")["num_shards"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StageError(f"{out}/manifest.json: unreadable ({exc})") from None
    streams = []
    for i in range(num_shards):
        directory = shard_dir(out, i, num_shards)
        if not (directory / "done.json").is_file():
            raise StageError(f"{directory}: not complete (no done.json); finish `eagle-pipe regenerate` for "
                             f"shard {i} of {num_shards} first")
        files = [directory / p["file"] for p in shards.read_json(directory / "done.json")["parts"]]
        streams.append(_part_lines(files))
    n = 0
    for _, where, record in heapq.merge(*streams, key=lambda item: item[0]):
        if select is None or select(start + n):
            yield start + n, where, record
        n += 1
    return n


def _part_lines(files: list[Path]):
    from stages.data.sources import parse_json_line

    for path in files:
        with open(path, "rb") as f:
            for line_no, raw in enumerate(f, 1):
                record = parse_json_line(raw)
                try:
                    index = int(record["source"]["sample_index"])
                except (KeyError, TypeError, ValueError):
                    raise StageError(f"{path}:{line_no}: not a regenerated record (no source.sample_index)") \
                        from None
                yield index, f"{path}:{line_no}", record


def compared_manifest(manifest: dict) -> dict:
    return {k: v for k, v in manifest.items() if k not in MANIFEST_UNCOMPARED}


def manifest_identity_sha256(manifest: dict) -> str:
    return shards.manifest_sha256(compared_manifest(manifest))
