"""The options of `eagle-pipe dump-teacher` as given (before `plan_dump` checks and resolves them into
`DumpSettings`): one typed field each, whose docstring is its `--help` text and whose default is the only one
(stages/options.py generates the click options; the shared vLLM flags come from stages/vllm_runtime.py).

`--target`, `--data` and `--out` are not click-required so that `plan_dump` refuses a missing one in the same
one-line form as every other mistake.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import click

from stages.dtypes import AUX_DTYPE_CHOICES, DTYPE_CHOICES
from stages.options import option

ENGINE_CHOICES = ["hf", "vllm"]


@dataclass(frozen=True)
class DumpOptions:
    target: str | None = None
    """Target model: a local Hugging Face directory or a hub id."""
    engine: str = option("hf", type=click.Choice(ENGINE_CHOICES))
    """Where the target runs: hf (transformers, in this process) or vllm (vLLM's offline LLM: tensor/expert
    parallel, the --tensor-parallel-size ... flags; same dump format)."""
    data: tuple[str, ...] = ()
    """Data file (JSONL/JSON/Parquet), saved dataset dir or dataset name; repeatable."""
    out: str | None = option(None, type=click.Path(file_okay=False))
    """Dump directory (manifest.json, target/, shards/)."""
    dtype: str | None = option(None, type=click.Choice(DTYPE_CHOICES, case_sensitive=False))
    """Target dtype (default: bfloat16 on GPU, float32 on CPU)."""
    device: str | None = None
    """Device (default: cuda:LOCAL_RANK if available, else cpu)."""
    device_map: str | None = None
    """(hf) Hugging Face device_map (e.g. auto) to spread a large target over GPUs."""
    trust_remote_code: bool = False
    """Allow the target's own modelling code to run."""
    aux_layers: str | None = None
    """Ascending layer ids whose input residual stream is stored: three for EAGLE-3 drafts, any number for DFlash
    (default 2,N//2,N-3)."""
    aux_dtype: str = option("model", type=click.Choice(AUX_DTYPE_CHOICES, case_sensitive=False))
    """Stored aux hidden states: the target's dtype, a cast, or fp8 (e4m3 with one float32 scale per token and
    aux layer: about half the disk of bf16)."""
    teacher: Literal["topk", "argmax", "softmax"] = "topk"
    """Teacher output kind."""
    top_k: int = 64
    """k for --teacher topk."""
    batch_tokens: int = 16384
    """Padded tokens per forward batch."""
    max_seq_len: int = 2048
    """Truncate records to this many tokens (counted)."""
    loss_on: Literal["assistant", "all"] = "assistant"
    """Which tokens are supervised."""
    shard_index: int | None = None
    """This job's shard (default: SLURM_ARRAY_TASK_ID, RANK, or 0)."""
    num_shards: int | None = None
    """Number of shards (default: SLURM_ARRAY_TASK_COUNT, WORLD_SIZE, or 1)."""
    part_tokens: int = 32768
    """Tokens per part file (whole sequences)."""
    overwrite: bool = False
    """Replace a dump from another target/tokenizer/settings in --out."""
    strict: bool = False
    """Stop at the first bad record instead of skipping it."""
    allow_large_softmax: bool = False
    """Allow --teacher softmax beyond 8 GiB per part / 1 TiB in all."""
    limit: int | None = None
    """Use only the first N records of the input (for trial runs)."""
