"""Stage `export`: turn any training checkpoint into the serving layout vLLM and SGLang load as-is.

    eagle-pipe export RUN/checkpoints/step-00001000 OUT
    eagle-pipe export PEER_DRAFT OUT --target TARGET

The checkpoint's meta.json carries the draft config, so neither the target nor the dump is needed; the
exported directory omits the embedding (both engines use the target's). A DFlash checkpoint (draft_arch "dflash")
is exported in vLLM's DFlashDraftModel layout (eagle/dflash_export.py).

An EAGLE-3 draft another trainer exported (Model-Optimizer, speculators, a plain LlamaForCausalLMEagle3 directory:
eagle/draft_formats.py reads them, given the target's config.json for its layer count) is rewritten in
eagle-pipe's layout, the same weights under one unambiguous config. Why: vLLM 0.32 takes Model-Optimizer's
eagle_config aux layer ids (layer outputs) as layer inputs and serves such a draft one layer early
(docs/eval.md#served-by-vllm); the rewritten draft states its layers in both engines' conventions.
"""
from __future__ import annotations

from pathlib import Path

import click
import torch
from safetensors import safe_open

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


def export_peer_draft(draft: str | Path, target: str | Path, out: str | Path) -> Path:
    """Rewrite another trainer's EAGLE-3 draft directory in eagle-pipe's layout (module docstring). A draft that
    ships its own embedding is taken only if it is the target's (speculators' frozen copy, possibly rounded to
    bf16): the layout has none."""
    from eagle.draft_formats import DraftFormatError, read_peer_draft
    from eagle.export import export_draft, load_draft
    from stages.target import read_target_config

    draft, target_config = Path(draft), read_target_config(target)
    try:
        fmt, _, tensors = read_peer_draft(draft, target_config)
        model = load_draft(draft, target_config=target_config)
    except (DraftFormatError, ValueError, OSError) as e:
        raise StageError(str(e)) from None
    own = tensors.get("embed_tokens.weight")  # compared in its own dtype: speculators saves a bf16 copy
    if own is not None and not torch.equal(own, target_embedding(target).to(own.dtype)):
        raise StageError(f"{draft}: a {fmt} draft with its own embedding, not the target's; eagle-pipe's layout has "
                         "none (serve this draft as it is)")
    try:
        return Path(export_draft(model, Path(out)))
    except OSError as e:
        raise StageError(f"{out}: could not write the export ({e.strerror or e})") from None


def target_embedding(target: str | Path) -> torch.Tensor:
    """The target's input embedding [V, H], read alone from its safetensors (no model is built)."""
    from eagle.draft_formats import weight_files

    files = weight_files(Path(target))
    names = sorted((n for n in files if n.endswith("embed_tokens.weight")), key=len)
    if not names:
        raise StageError(f"{target}: no embed_tokens.weight among the target's tensors")
    with safe_open(str(files[names[0]]), framework="pt") as f:
        return f.get_tensor(names[0])


@click.command("export")
@click.argument("source", metavar="CHECKPOINT", type=click.Path(exists=True, file_okay=False))
@click.argument("out", type=click.Path())
@click.option("--target", type=click.Path(exists=True, file_okay=False), default=None,
              help="The target's HF directory, when CHECKPOINT is another trainer's exported EAGLE-3 draft "
                   "(Model-Optimizer, speculators, LlamaForCausalLMEagle3): its config gives the layer count.")
def command(source: str, out: str, target: str | None) -> dict:
    """Export CHECKPOINT (a checkpoint directory, or a run directory: its newest checkpoint; or, with --target,
    another trainer's exported draft) to OUT."""
    is_checkpoint = (Path(source) / "meta.json").exists() or not (Path(source) / "config.json").exists()
    if is_checkpoint and target is not None:
        raise StageError(f"{source}: a training checkpoint, whose meta.json holds the draft config; --target is for "
                         "another trainer's exported draft")
    if is_checkpoint:
        path = export_checkpoint(source, out)
    elif target is None:
        raise StageError(f"{source}: an exported draft, not a checkpoint; rewriting another trainer's draft needs "
                         "--target (the target's HF directory)")
    else:
        path = export_peer_draft(source, target, out)
    click.echo(f"exported {source} -> {path}")
    return {"checkpoint": str(source), "export_dir": str(path)}
