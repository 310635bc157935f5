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

Records go to shard `sample_index % num_shards`. stages/data/sources.py reads a complete OUT as a data source
(`read_regenerated`): all shards merged by the original sample_index.
"""
from __future__ import annotations

from pathlib import Path

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


def compared_manifest(manifest: dict) -> dict:
    return {k: v for k, v in manifest.items() if k not in MANIFEST_UNCOMPARED}


def manifest_identity_sha256(manifest: dict) -> str:
    return shards.manifest_sha256(compared_manifest(manifest))
