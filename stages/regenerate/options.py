"""The options of `eagle-pipe regenerate` as given: one typed field each, whose docstring is its `--help` text
and whose default is the only one (stages/options.py generates the click options; the shared vLLM flags come
from stages/vllm_runtime.py). A "(hf)", "(vllm)" or "(openai)" prefix names the engines an option is for.

`--target`, `--data` and `--out` are not click-required so that `regenerate` refuses a missing one in the same
one-line form as every other mistake.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import click

from stages.dtypes import DTYPE_CHOICES
from stages.options import option

Turns = Literal["all", "first"]
TURNS = get_args(Turns)


@dataclass(frozen=True)
class RegenerateOptions:
    target: str | None = None
    """The target model (local Hugging Face directory or hub id) whose answers to train on."""
    data: tuple[str, ...] = ()
    """Input, anything dump-teacher reads (JSONL/JSON/Parquet, dataset dir or name); repeatable."""
    out: str | None = option(None, type=click.Path(file_okay=False))
    """Output directory (manifest.json, shard-*/)."""
    turns: Turns = "all"
    """Answer every user turn, or stop after the first answer."""
    engine: Literal["hf", "vllm", "openai"] = "hf"
    """hf: transformers in-process; vllm: vLLM's offline engine in-process (same prompts and stop rule as hf);
    openai: a chat-completions server."""
    base_url: str | None = None
    """(openai) Server URL up to /v1, e.g. http://localhost:8000/v1."""
    served_model: str | None = None
    """(openai) The name the server serves the target under (default: --target)."""
    api_key_env: str | None = None
    """(openai) Environment variable holding the API key (sent as a Bearer token)."""
    concurrency: int = 16
    """(openai) Requests in flight."""
    request_timeout: float = 600.0
    """(openai) Seconds per request before it is retried."""
    max_retries: int = 3
    """(openai) Retries per request (backoff 1, 2, 4 s ...) before the record counts as engine_error."""
    dtype: str | None = option(None, type=click.Choice(DTYPE_CHOICES, case_sensitive=False))
    """(hf, vllm) Default: bfloat16 on GPU, float32 on CPU."""
    device: str | None = None
    """(hf) Default: cuda:LOCAL_RANK if available, else cpu."""
    device_map: str | None = None
    """(hf) Hugging Face device_map (e.g. auto) to spread a large target over GPUs."""
    trust_remote_code: bool = False
    """(hf) Allow the target's own modelling code to run."""
    batch_size: int = 64
    """(hf) Prompts per generate() batch."""
    batch_tokens: int = 262144
    """(hf) Rows x (longest prompt + max new tokens) per batch, at most."""
    compile: bool = option(False, negatable=True)
    """(hf) A static KV cache and a compiled decode step (once per batch rows and cache-length bucket; same
    greedy text in fp32). Off by default: slower than the dynamic cache on the CPUs measured
    (docs/regenerate.md#measured)."""
    max_new_tokens: int = 1024
    """Tokens per answer; an answer that hits it finishes as 'length'."""
    temperature: float = 0.0
    """0 = greedy (default); > 0 samples, seeded per record and turn."""
    top_p: float = 1.0
    """Nucleus sampling threshold (with --temperature > 0)."""
    seed: int = 0
    """Base seed for sampling (each record and turn derives its own)."""
    chat_template_kwargs: str | None = None
    """JSON object passed to the chat template, e.g. '{"enable_thinking": false}'."""
    drop_truncated: bool = False
    """Drop records with an answer that hit --max-new-tokens (counted as 'truncated')."""
    shard_index: int | None = None
    """This job's shard (default: SLURM_ARRAY_TASK_ID, RANK, or 0)."""
    num_shards: int | None = None
    """Number of shards (default: SLURM_ARRAY_TASK_COUNT, WORLD_SIZE, or 1)."""
    part_records: int = 256
    """Records per part file (the unit of resume)."""
    limit: int | None = None
    """Use only the first N records of the input."""
    overwrite: bool = False
    """Replace regenerated data made with another target or settings in --out."""
    strict: bool = False
    """Stop at the first bad record instead of skipping it."""
