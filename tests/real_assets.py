"""Third-party files in `shared/real/` (real chat templates, vocabularies, configs, data; see its README).

They are never committed here. `.ci/run` points `EAGLE_PIPE_REAL` at the folder; a user's clone has none, so
tests that need it skip with that reason. Everything else in the suite keeps testing on files the tests make.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ENV_VAR = "EAGLE_PIPE_REAL"


def real_root() -> Path | None:
    value = os.environ.get(ENV_VAR)
    if not value:
        return None
    path = Path(value)
    return path if path.is_dir() else None


def real_path(*parts: str) -> Path:
    """A path under shared/real, skipping the calling test when the folder (or that file) is absent."""
    root = real_root()
    if root is None:
        pytest.skip(f"{ENV_VAR} is not set to the shared/real folder (set by .ci/run)")
    path = root.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is not in {ENV_VAR}")
    return path


needs_real = pytest.mark.skipif(real_root() is None,
                                reason=f"{ENV_VAR} is not set to the shared/real folder (set by .ci/run)")
