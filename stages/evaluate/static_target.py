"""The target of `eagle-pipe eval` on one preallocated KV cache, with a compiled fixed-shape verification step.

Speculative decoding calls the target with a handful of shapes per prompt: a prefill of the prompt (any length)
and then one verification forward of exactly K+1 tokens per round. gpt-fast's recipe for that is a static KV
cache (preallocated once, written in place; a rejected draft is dropped by moving the write position back) and
a compiled step whose shapes never change, so it compiles once per K and never again across prompts.

Here the cache is transformers' own `StaticCache` (its write position is a tensor, its `crop` moves it back, and
the causal mask hides every slot past the queries, so stale rejected entries are never read), with every
sliding-window / chunked layer replaced by a full-length layer (as `full_history_cache` does for the dynamic
cache: a window buffer that rolled cannot be cropped; the mask still applies the window). The K+1-token
verification forward (the model's own forward plus the aux pre-hooks of `TargetWithAux`) runs through
`torch.compile(fullgraph=True, dynamic=False)`; the prefill runs eagerly on the same cache (one call per prompt,
arbitrary length: compiling it would compile once per prompt length).

Models whose cache is not plain attention (linear attention, KV sharing, indexers) are refused with
UncroppableCache; `eval` then falls back to the dynamic cache.
"""
from __future__ import annotations

import itertools
import types

import torch

from stages.evaluate.speculative import TargetWithAux


RECOMPILE_LIMIT = 64


class UncroppableCache(ValueError):
    """The model's cache has layers that a static cache cannot move back after a rejected draft."""


def static_full_cache(config, max_len: int):
    """A StaticCache of `max_len` positions whose every layer is a full-length StaticLayer."""
    from transformers import StaticCache
    from transformers.cache_utils import StaticLayer, StaticSlidingWindowLayer

    cache = StaticCache(config=config, max_cache_len=max_len)
    layers = []
    for layer in cache.layers:
        if type(layer) is StaticSlidingWindowLayer:
            layer = StaticLayer(max_cache_len=max_len)
        if type(layer) is not StaticLayer:
            raise UncroppableCache(f"a static KV cache layer of type {type(layer).__name__} cannot be cropped after "
                             "a rejected draft")
        layers.append(layer)
    cache.layers = layers
    return cache


POSITION_DEPENDENT_ROPE = ("longrope", "dynamic")


def position_dependent_rope(config) -> bool:
    """Whether transformers picks the target's RoPE frequencies per forward from its largest position (longrope:
    Phi-3.5 / Phi-4-mini; dynamic NTK): a data-dependent branch that a fullgraph compile cannot trace (transformers
    5.19), so such a target verifies eagerly on the same static cache."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    params = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {}
    if not isinstance(params, dict):
        return False
    per_layer = [v for v in params.values() if isinstance(v, dict)]  # {layer type: parameters}
    kinds = {p.get("rope_type") or p.get("type") for p in (per_layer or [params])}
    return bool(kinds & set(POSITION_DEPENDENT_ROPE))


def rewind(cache, length: int) -> None:
    """Move every layer's write position of a static cache back to `length` (entries past it stay, masked).

    transformers < 5.19 crops a StaticLayer itself; 5.19 dropped `StaticLayer.crop`, so the position tensor is
    set in place (it is the static address the compiled step reads)."""
    if all(hasattr(layer, "crop") for layer in cache.layers):
        extra = int(cache.get_seq_length()) - length
        if extra:
            cache.crop(-extra)
        return
    for layer in cache.layers:
        if layer.is_initialized:
            layer.cumulative_length.fill_(length)


class StaticTarget(TargetWithAux):
    """TargetWithAux on one static cache of `max_len` positions, reused prompt after prompt.

    forward(input_ids [1, T], cache, logits_to_keep) runs the compiled step when T is one of `compiled_tokens`
    (and every logit is kept), otherwise the model eagerly; both write the same cache.
    """

    def __init__(self, model, aux_layer_ids, max_len: int, compiled_tokens=(), compile_options=None):
        super().__init__(model, aux_layer_ids)
        self.max_len = max_len
        self.cache = static_full_cache(model.config, max_len)
        self._whole_cache_mask = torch.ones(1, max_len, dtype=torch.long, device=model.device)
        self.compiled_tokens = frozenset(int(t) for t in compiled_tokens)
        self._compiled = None
        if self.compiled_tokens:
            # dynamo keeps compiled graphs per code object, and with fullgraph=True running past its recompile
            # limit (8) is a hard error, not a fallback. So each StaticTarget compiles its own copy of `_step` (its
            # graphs go with it, never pile up across models), and the limit is raised for the shapes one
            # instance meets (one per K; `eval` makes a new instance when a turn outgrows the cache)
            dynamo_config = torch._dynamo.config
            dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, RECOMPILE_LIMIT)
            self._compiled = torch.compile(self._own_step(), fullgraph=True, dynamic=False,
                                           **(compile_options or {}))

    _instances = itertools.count()

    def _own_step(self):
        """`_step` bound to this instance through a code object of its own (a renamed copy)."""
        step = StaticTarget._step
        code = step.__code__.replace(co_name=f"_step_{next(StaticTarget._instances)}")
        return types.MethodType(types.FunctionType(code, step.__globals__, code.co_name, step.__defaults__,
                                                   step.__closure__), self)

    def new_cache(self, length: int):
        """The cache, emptied (write position 0; old entries stay but are masked until overwritten)."""
        if length > self.max_len:
            raise ValueError(f"a prompt needs {length} cache positions, the static cache has {self.max_len}")
        rewind(self.cache, 0)
        return self.cache

    def crop(self, cache, length: int) -> None:
        extra = int(cache.get_seq_length()) - length
        if extra < 0:
            raise ValueError(f"cannot crop a target cache of length {int(cache.get_seq_length())} to {length}")
        if extra:
            rewind(cache, length)

    def _step(self, input_ids: torch.Tensor, cache):
        """The forward the compiled step traces: logits of every position and the aux features (pre-hooks)."""
        self._captured.clear()
        self._capturing = True
        # an all-ones mask over the whole cache (the causal mask still hides the slots past the queries): with no
        # mask, transformers 5.19 branches on the cache's write position (a tensor) and fullgraph cannot trace it
        out = self.model(input_ids=input_ids, attention_mask=self._whole_cache_mask, use_cache=True,
                         **{self._cache_kwarg: cache})
        self._capturing = False
        aux = torch.cat([self._captured[k] for k in self.aux_layer_ids], dim=-1)  # (1, T, 3*H)
        self._captured.clear()
        return out.logits, aux

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, cache, logits_to_keep: int = 0):
        if self._compiled is not None and logits_to_keep == 0 and input_ids.shape[1] in self.compiled_tokens:
            return self._compiled(input_ids, cache)
        return super().forward(input_ids, cache, logits_to_keep=logits_to_keep)
