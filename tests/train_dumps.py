"""Test helper: small real teacher dumps made by `eagle-pipe dump-teacher` on the conftest tiny models.

Dumps are cached under pytest's session base temp dir, so test files in one session build each dump once.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from click.testing import CliRunner

from conftest import corpus_text


def text_records(path: Path, n: int, words: int = 30, offset: int = 0) -> Path:
    """n plain-text records of `words` words from the Python help topics."""
    text = " ".join(corpus_text(200_000)).split()
    with open(path, "w") as f:
        for i in range(n):
            start = (offset + i) * words
            f.write(json.dumps({"text": " ".join(text[start:start + words])}) + "\n")
    return path


def cached_dump(tmp_path_factory, name: str, target: Path, records: int, extra: list[str] = ()) -> Path:
    """A dump of `records` text records through `target` (supervising every token, top-8 teacher)."""
    from stages.cli import main

    base = tmp_path_factory.getbasetemp() / "train-dumps"
    out = base / name
    if (out / "manifest.json").exists() and list(out.glob("shards/*/done.json")):
        return out
    shutil.rmtree(out, ignore_errors=True)
    base.mkdir(parents=True, exist_ok=True)
    data = text_records(base / f"{name}.jsonl", records)
    result = CliRunner().invoke(main, ["dump-teacher", "--target", str(target), "--data", str(data), "--out",
                                       str(out), "--loss-on", "all", "--top-k", "8", "--num-shards", "1",
                                       "--device", "cpu", *extra])
    assert result.exit_code == 0, result.output
    return out
