"""Output directories and input identity, shared by the stages that write a sharded output from data.

`local_or_name` and `data_fingerprint` are what a manifest records about its inputs, so that a job started from
another directory agrees with the others and a rerun over changed data is refused instead of mixed in.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from stages import shards
from stages.errors import StageError


def ensure_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise StageError(f"--out {out}: not writable ({exc.strerror or exc})") from None


def local_or_name(source: str) -> str:
    """Absolute path for a local file/dir (so jobs started from other directories agree), else as given."""
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else source


def data_fingerprint(sources: list[str]) -> str:
    """sha256 over every local data file's name and content; a hub dataset name counts by its name."""
    h = hashlib.sha256()
    for source in sources:
        path = Path(source)
        files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
        h.update(f"source\0{source}\n".encode())
        for f in files:
            if f.is_file():
                h.update(f"{f.relative_to(path) if path.is_dir() else f.name}\0{shards.sha256_file(f)}\n".encode())
    return h.hexdigest()
