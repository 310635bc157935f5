"""transformers' own `generate()` on a static KV cache with a compiled decode step (gpt-fast's recipe, HF's code).

A dynamic cache grows by concatenation: every decode step copies every layer's whole K/V, and every step is a
fresh set of Python calls. A static cache is allocated once per `generate()` call and written in place, and
with a static cache transformers compiles its one-token decode step (the prefill stays eager: its length
changes with every prompt). The text is the same greedy `generate()` text: only where the K/V live and how the
step is dispatched change.

Compiled graphs are keyed by shape: the decode step's shapes are (batch rows, cache length). So the cache
length is a bucket (a multiple of `CACHE_BUCKET` that holds the longest prompt plus the new tokens), passed as
`generation_config.max_cache_len`; a run compiles once per (rows, bucket) it meets, not once per prompt.

transformers compiles only on accelerators unless `CompileConfig._compile_all_devices` is set, and its default
mode ("reduce-overhead": CUDA graphs) means nothing on a CPU; both are set here. Used by
`regenerate --engine hf --compile` (opt-in: on the CPUs measured the compiled decode step was slower than the
dynamic cache; docs/regenerate.md, "Measured"). `eval` compiles its own verification step instead
(stages/evaluate/static_target.py).
"""
from __future__ import annotations

CACHE_BUCKET = 256


def bucket(length: int, step: int | None = None) -> int:
    """The smallest multiple of `step` (default CACHE_BUCKET) that is >= length (and >= step)."""
    step = step or CACHE_BUCKET
    return max(step, -(-length // step) * step)


def supports_static_cache(model) -> bool:
    """Whether transformers can run this model's generate() on a static cache with a compiled step."""
    return bool(getattr(model, "_can_compile_fullgraph", False))


def compile_config(**options):
    """A CompileConfig for a full-graph, fixed-shape decode step on any device (CPU included)."""
    from transformers import CompileConfig

    config = CompileConfig(fullgraph=True, dynamic=False, mode="default", **options)
    config._compile_all_devices = True  # otherwise transformers compiles only on cuda/xpu/...
    return config


def static_generation_options(max_cache_len: int, compile: bool) -> dict:
    """GenerationConfig fields for generate() on a static cache of `max_cache_len`, compiled or eager."""
    options = {"cache_implementation": "static", "max_cache_len": int(max_cache_len)}
    if compile:
        options["compile_config"] = compile_config()
    else:
        options["disable_compile"] = True
    return options
