"""The options of `eagle-pipe eval` as given: one typed field each, whose docstring is its `--help` text and
whose default is the only one (stages/options.py generates the click options; the shared vLLM flags come from
stages/vllm_runtime.py)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import click

from stages.errors import StageError
from stages.options import ParsedType, option


def parse_draft_tokens(value) -> list[int]:
    """--draft-tokens: one K (3) or several (3,5 / [3, 5]); each >= 1, in the order given, no repeats."""
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    try:
        counts = [int(str(k).strip()) for k in items]
    except ValueError:
        raise StageError(f"--draft-tokens {value}: expected an integer or a comma-separated list (3,5)") from None
    if not counts or any(k < 1 for k in counts) or len(set(counts)) != len(counts):
        raise StageError(f"--draft-tokens {value}: each K must be at least 1, no K twice")
    return counts


@dataclass(frozen=True)
class EvalOptions:
    target: str
    """Target model: a local Hugging Face directory or hub id."""
    draft: str = option(type=click.Path(file_okay=False))
    """Draft directory (config.json + model.safetensors), e.g. RUN/export, or a Model-Optimizer, speculators or
    LlamaForCausalLMEagle3 export."""
    data: tuple[str, ...] = option()
    """Conversations (prompt: up to the first user turn) or benchmark questions: MT-bench / Spec-Bench / EAGLE
    question.jsonl (every turn), GSM8K, HumanEval (JSONL/JSON/Parquet/datasets)."""
    num_prompts: int = option(32, type=click.IntRange(min=1))
    """Questions to evaluate, in file order; a multi-turn question counts once, all its turns run."""
    max_new_tokens: int = option(128, type=click.IntRange(min=1))
    """New tokens per prompt at most."""
    draft_tokens: list[int] | None = option(None, type=ParsedType("K[,K...]", parse_draft_tokens))
    """K: draft tokens per target forward; several (3,5) share one greedy reference per turn [default: 3; a
    DFlash draft: its block size - 1, the only K it takes]."""
    dtype: str = "auto"
    """Target dtype: bfloat16|float16|float32 (auto: bf16 on GPU, fp32 on CPU)."""
    device: str = "auto"
    """cuda / cpu (auto: cuda if available)."""
    run_dir: str | None = option(None, type=click.Path(file_okay=False))
    """Train run directory: also report the simulated acceptance length from its metrics."""
    json: bool = False
    """Print one JSON object instead of the table."""
    report: str | None = option(None, type=click.Path(dir_okay=False))
    """Also write the full JSON report to this file (written before a failed lossless check exits)."""
    trust_remote_code: bool = False
    """Allow the target's own modelling code (only if you trust it)."""
    batch_size: int | None = option(None, type=click.IntRange(min=1))
    """Decode N questions at a time: the greedy references (one batched generate() per turn) and the speculative
    runs (one batched verification per round). A turn whose batched outputs differ is decided alone, as at 1.
    Speeds then compare both at batch N (measured: docs/eval.md#batched). [default: 1; with --engine vllm:
    vLLM's max_num_seqs, default vLLM's own]"""
    engine: Literal["hf", "vllm"] = "hf"
    """hf: eagle-pipe's own speculative decoding in transformers; vllm: the draft served in vLLM's speculative
    decoding (served acceptance from vLLM's spec-decode counters; lossless against vLLM's greedy decode without
    the draft). Both see the same prompt token ids."""
    compile: bool = True
    """Compile the batch-1 speculative run's K+1-token verification step on its static KV cache (once per K;
    same tokens). The greedy reference is always transformers' plain generate()."""
