"""Stage `export`: turn any training checkpoint into the serving layout vLLM and SGLang load as-is.

    eagle-pipe export RUN/checkpoints/step-00001000 OUT

The checkpoint's meta.json carries the draft config, so neither the target nor the dump is needed; the
exported directory omits the embedding (both engines use the target's). A DFlash checkpoint (draft_arch "dflash")
is exported in vLLM's DFlashDraftModel layout (eagle/dflash_export.py).
"""
from __future__ import annotations

from pathlib import Path

import click

from stages.errors import StageError


def export_checkpoint(checkpoint: str | Path, out: str | Path) -> Path:
    """Build the draft from the checkpoint's config and weights and write its serving layout (the exporter its
    draft config's architecture names: stages/train/drafters.py exporter_for)."""
    from stages.train.checkpoint import latest_checkpoint, load_model_tensors, read_meta
    from stages.train.drafters import exporter_for

    checkpoint = Path(checkpoint)
    if checkpoint.is_dir() and not (checkpoint / "meta.json").exists():
        # a run directory or its checkpoints/ folder: take the newest complete checkpoint
        for root in (checkpoint / "checkpoints", checkpoint):
            found = latest_checkpoint(root)
            if found is not None:
                checkpoint = found
                break
    if not checkpoint.is_dir():
        raise StageError(f"{checkpoint}: no such checkpoint directory")
    meta = read_meta(checkpoint)
    try:
        model, write = exporter_for(meta["draft_config"])
    except (KeyError, TypeError, ValueError) as e:
        raise StageError(f"{checkpoint / 'meta.json'}: bad draft_config ({e})") from None
    load_model_tensors(checkpoint, model)
    try:
        return Path(write(model, Path(out)))
    except OSError as e:
        raise StageError(f"{out}: could not write the export ({e.strerror or e})") from None


@click.command("export")
@click.argument("checkpoint", type=click.Path(exists=True))
@click.argument("out", type=click.Path())
def command(checkpoint: str, out: str) -> dict:
    """Export CHECKPOINT (a checkpoint directory, or a run directory: its newest checkpoint) to OUT."""
    path = export_checkpoint(checkpoint, out)
    click.echo(f"exported {checkpoint} -> {path}")
    return {"checkpoint": str(checkpoint), "export_dir": str(path)}
