"""The options of `eagle-pipe train` as one typed, frozen value: what each one means, in one place.

The fields are the command's options: `stages.options.click_options(TrainSettings)` makes one `--field-name`
per field, its help the field's docstring, its default the field's, so `TrainSettings(**options)` takes the
click command's keyword arguments (or a `train:` section of pipeline.yaml, whose keys are checked against
them). `record(world_size)` is the JSON dict written into every checkpoint's meta.json and into
train_summary.json, and compared on `--resume` and by `eagle-pipe run`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import click

from stages.options import option


@dataclass(frozen=True)
class TrainSettings:
    teacher_dir: str = option(type=click.Path(file_okay=False))
    """Teacher dump written by `eagle-pipe dump-teacher` (DIR/manifest.json, DIR/target/, shards)."""
    out: str = option(type=click.Path(file_okay=False))
    """Run directory: checkpoints/, metrics.jsonl, tensorboard/, export/, train_summary.json."""
    seq_len: int = 2048
    """Positions per packed row; every batch has this one shape, so the compiled step never recompiles."""
    batch_size: int = 8
    """Rows per micro-batch per rank."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    max_steps: int | None = None
    """Optimizer steps (default: `epochs` passes over the data); with `epochs` too, a cap on them."""
    epochs: int | None = None
    """Passes over the data (default: 1, or `max_steps` steps when that is given)."""
    lr: float = 1e-4
    """Peak learning rate (AdamW, betas 0.9 / 0.95)."""
    min_lr_ratio: float = 0.1
    """Floor of the cosine decay, as a fraction of `lr`."""
    warmup_steps: int = 100
    """Linear warmup steps before the cosine decay."""
    weight_decay: float = 0.0
    """AdamW weight decay of the matrices (never of norms)."""
    grad_clip: float = 0.5
    """Maximum global gradient norm."""
    ttt_steps: int = 7
    """K: draft steps unrolled by training-time test."""
    draft_vocab_size: int | None = option(None, type=click.IntRange(min=1))
    """Vd: the draft's vocabulary, the most frequent supervised target ids of the dump, capped at the target's V.
    Default: 32000 for eagle3 / eagle3.1, the full vocabulary for dflash (given, a DFlash draft's lm_head is the
    target's rows of those ids, frozen)."""
    decay: float = 0.8
    """Loss weight decay**j of TTT step j."""
    long_sequences: Literal["split", "truncate"] = "split"
    """Documents longer than `seq_len`: "split" into independent chunks or "truncate"."""
    attention: Literal["auto", "dense", "flex"] = "auto"
    """TTT attention kernel: "auto" (flex on CUDA, else dense), "dense" or "flex"."""
    init_lm_head: bool = option(False, negatable=True)
    """Start the draft's lm_head rows and final norm from the target's. Off by default: on SmolLM2 a random
    lm_head trained drafts whose TTT steps 2-3 accept 10-40% more (docs/quality.md, "Recipe")."""
    draft_rope: Literal["auto", "target", "default"] = "auto"
    """The draft's RoPE: "auto" (the target's when the engines compute it exactly as training does, else plain
    RoPE with the target's rope_theta), "target" (the target's or an error) or "default" (plain RoPE)."""
    draft_arch: Literal["eagle3", "eagle3.1", "dflash"] = "eagle3"
    """"eagle3", or "eagle3.1": per-aux-state fc_norm and post-norm feedback (norm_output), exported with the
    switches vLLM and SGLang both run; or "dflash": a block drafter (eagle/dflash.py) that vLLM serves as
    method "dflash" with K = block_size - 1."""
    block_size: int = option(8, type=click.IntRange(min=2))
    """DFlash: tokens per block, the verified token plus block_size - 1 drafted slots."""
    draft_layers: int = option(1, type=click.IntRange(min=1))
    """DFlash: decoder layers of the draft."""
    anchors_per_row: int | None = option(None, type=click.IntRange(min=1))
    """DFlash: anchor blocks drawn per packed row (default seq_len // block_size: about one drafted token per
    position)."""
    loss_gamma: float | None = None
    """DFlash: slot k's loss weight is exp(-(k-1)/gamma); default 7 / 5 / 4 for blocks 16 / 10 / 8, else
    block_size / 2."""
    mask_token_id: int | None = None
    """DFlash: the target vocab id whose embedding fills the masked slots (default: an unused special token of
    the target's tokenizer, stages/train/setup.py choose_mask_token_id)."""
    device: str = "auto"
    """auto, cpu, cuda or cuda:N (under torchrun: the local rank's GPU)."""
    seed: int = 0
    """Seeds the draft's initialisation, the held-out split and the data order."""
    save_every: int = 1000
    """Optimizer steps between checkpoints (and one at the end)."""
    keep_checkpoints: int = 2
    """Newest step checkpoints kept (plus checkpoints/best/)."""
    log_every: int = 10
    """Optimizer steps between metrics.jsonl records: the one host sync of the metrics."""
    eval_every: int = 500
    """Optimizer steps between held-out evaluations (0: only at the end)."""
    eval_fraction: float = 0.01
    """Fraction of documents held out of `teacher_dir` (by a hash of their record index)."""
    eval_teacher_dir: str | None = option(None, type=click.Path(file_okay=False))
    """A separate held-out dump of the same target; then nothing is held out of `teacher_dir`."""
    resume: bool = False
    """Continue from the newest complete checkpoint in `out` (weights, optimizer, schedule, RNG, data position)."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """Matmuls of the step: "bf16" autocast (fp32 master weights, optimizer and loss) or "fp32"; "auto": bf16
    on CUDA and on CPUs with AMX bf16 units, fp32 elsewhere."""
    compile: bool = True
    """torch.compile(fullgraph=True) the TTT forward + loss (off: eager)."""
    num_workers: int = 2
    """Threads building batches in the background."""
    max_bad_steps: int = 10
    """Stop after this many optimizer steps in a row with a non-finite loss or gradient."""

    def record(self, world_size: int) -> dict:
        """The settings as written into checkpoints and train_summary.json (plus the world size)."""
        return dataclasses.asdict(self) | {"world_size": world_size}
