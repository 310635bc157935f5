"""`pipeline.yaml`: one section per stage whose keys are that stage's CLI options; flags override the file.

    dump-teacher: {target: ..., data: [...], out: ...}
    train:        {teacher_dir: ..., out: ...}
    eval:         {...}

Keys may use dashes or underscores. Unknown sections and unknown keys are rejected with the file named.
Relative paths are taken relative to the current directory (run from the directory holding the file).
"""
from __future__ import annotations

from pathlib import Path

import click
import yaml

from stages.errors import StageError


def load_pipeline_file(path: str | Path) -> dict[str, dict]:
    """Read the YAML file into {section: {param_name: value}} with keys normalised to underscores."""
    path = Path(path)
    if not path.is_file():
        raise StageError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise StageError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise StageError(f"{path}: expected a mapping of stage sections, got {type(raw).__name__}")
    out = {}
    for section, values in raw.items():
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise StageError(f"{path}: section '{section}' must be a mapping")
        out[str(section)] = {str(k).replace("-", "_"): v for k, v in values.items()}
    return out


def check_section(path, section: str, values: dict, command: click.Command) -> None:
    """Reject keys that are not options of the command (typos must not be silently ignored)."""
    known = {p.name for p in command.params}
    unknown = sorted(set(values) - known)
    if unknown:
        raise StageError(
            f"{path}: unknown key(s) in section '{section}': {', '.join(unknown)} "
            f"(known: {', '.join(sorted(known))})"
        )
