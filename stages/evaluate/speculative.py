"""Greedy chain speculative decoding of a Hugging Face target with an EAGLE-3 draft, as the engines run it.

Used by `eagle-pipe eval`. One prompt at a time (batch 1), so cache positions equal RoPE positions.

Target side: an `AutoModelForCausalLM` with a `DynamicCache` that is cropped back to the verified length after
every verification forward (its sliding-window layers keep all past states so that they can be cropped); its aux features are captured with forward *pre*-hooks on the aux layers (vLLM
convention: id k = the residual stream entering decoder layer k = HF `hidden_states[k]`), concatenated in
ascending layer order, exactly as `dump-teacher` stores them.

Draft side (see docs/checkpoint-format.md, "How the engines draft"). Verified tokens are
x_0..x_L: x_0..x_{L-1} are in the target cache (their features f_p known), x_L is the last bonus token.
  - step 0 runs over every newly verified position p (features f_p, token x_{p+1}, RoPE position p) and
    writes their cache entries; its output at the last position proposes d_1;
  - steps 1..K-1 feed (previous pre-norm output, d_j) at the next positions and propose d_2..d_K;
  - the target verifies [x_L, d_1..d_K] in one forward (`verify_draft`), the longest agreeing prefix plus one
    target token (the bonus) is kept, both caches are cropped to what is verified.
Draft ids are mapped to target ids through the draft's d2t.

`verify_draft` is a module-level function on purpose: the lossless test replaces it with a broken one and
checks that `eagle-pipe eval` catches the difference against the target's own `generate()`.
"""
from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field

import torch


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder layers of a HF causal LM's text decoder (stages/target.py finds it)."""
    from stages.target import decoder_parts

    return decoder_parts(model).layers


class TargetWithAux:
    """A causal LM whose forward also returns the aux hidden states [B, T, 3*H] (pre-hooks, ascending ids)."""

    def __init__(self, model, aux_layer_ids):
        self.model = model
        layers = decoder_layers(model)
        self.aux_layer_ids = tuple(sorted(int(k) for k in aux_layer_ids))
        for k in self.aux_layer_ids:
            if not 0 <= k < len(layers):
                raise ValueError(f"aux layer id {k} is outside the target's {len(layers)} decoder layers")
        self._captured: dict[int, torch.Tensor] = {}
        # transformers renamed `past_key_values` to `cache` (5.2x); passing the wrong name would silently run
        # without a cache, so ask the model which one it takes
        params = inspect.signature(model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self._hooks = [layers[k].register_forward_pre_hook(self._hook(k), with_kwargs=True)
                       for k in self.aux_layer_ids]

    def _hook(self, k: int):
        def capture(module, args, kwargs):
            if self._capturing:
                self._captured[k] = args[0] if args else kwargs["hidden_states"]
        return capture

    _capturing = False

    def new_cache(self, length: int):
        """An empty cache for a prompt that will reach `length` positions (dynamic: grows as needed)."""
        return full_history_cache(self.model.config)

    def crop(self, cache, length: int) -> None:
        """Drop every cached position >= length (rejected drafts)."""
        crop_target_cache(cache, length)

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, cache, logits_to_keep: int = 0):
        """input_ids [1, T] at cache positions cache_len..cache_len+T -> (logits [1, T', V], aux [1, T, 3*H])."""
        return self.captured_forward(input_ids=input_ids, use_cache=True, logits_to_keep=logits_to_keep,
                                     **{self._cache_kwarg: cache})

    def captured_forward(self, **model_kwargs):
        """One model forward with the aux layers captured -> (logits, aux [B, T, 3*H])."""
        self._captured.clear()
        self._capturing = True
        try:
            out = self.model(**model_kwargs)
        finally:
            self._capturing = False
        aux = torch.cat([self._captured[k] for k in self.aux_layer_ids], dim=-1)
        self._captured.clear()
        return out.logits, aux


def verify_draft(target_logits: torch.Tensor, draft_ids: list[int]) -> tuple[int, int]:
    """Greedy chain verification.

    target_logits [K+1, V]: the target's logits at [x_L, d_1..d_K]; row i predicts the token after input i.
    Returns (number of accepted draft tokens a, the target's own token after them: the bonus).
    """
    greedy = target_logits.argmax(dim=-1).tolist()  # (K+1,)
    accepted = 0
    while accepted < len(draft_ids) and draft_ids[accepted] == greedy[accepted]:
        accepted += 1
    return accepted, greedy[accepted]


def full_history_cache(config):
    """A DynamicCache for `config` whose sliding-window / chunked layers keep every past state.

    Rejected drafts must be cropped away, and a sliding layer that already dropped states past its window
    cannot be cropped (transformers refuses). The model still applies its window: the attention masks come from
    config.sliding_window / attention_chunk_size, not from what the cache holds, so the output is the same.
    """
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    cache = DynamicCache(config=config)
    cache.layers = [DynamicLayer() if isinstance(layer, DynamicSlidingWindowLayer) else layer
                    for layer in cache.layers]
    return cache


def crop_target_cache(cache, length: int) -> None:
    """Cut a HF DynamicCache back to `length` positions (transformers 5 crops by a negative count)."""
    extra = cache.get_seq_length() - length
    if extra < 0:
        raise ValueError(f"cannot crop a target cache of length {cache.get_seq_length()} to {length}")
    if extra:
        cache.crop(-extra)


@dataclass
class SpeculativeResult:
    tokens: list[int]                                    # new tokens, cut after the first EOS / at max_new_tokens
    accepted: list[int] = field(default_factory=list)    # accepted draft tokens per decode-phase target forward
    seconds: float = 0.0


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _finish(tokens: list[int], eos_ids: set[int], max_new_tokens: int) -> tuple[list[int], bool]:
    """Cut after the first EOS or at max_new_tokens; say whether generation is over."""
    for i, t in enumerate(tokens[:max_new_tokens]):
        if t in eos_ids:
            return tokens[: i + 1], True
    return tokens[:max_new_tokens], len(tokens) >= max_new_tokens


@torch.inference_mode()
def speculative_generate(target: TargetWithAux, draft, prompt_ids: list[int], *, max_new_tokens: int,
                         draft_tokens: int, eos_ids, device="cpu") -> SpeculativeResult:
    """Greedy speculative decoding of one prompt; returns the new tokens and per-forward acceptance counts."""
    from eagle import inference

    verify = globals()["verify_draft"]  # looked up per call, so a test can replace it
    eos_ids = set(eos_ids)
    K = draft_tokens
    draft_dtype = next(draft.parameters()).dtype
    _sync(device)
    start = time.perf_counter()

    prompt = torch.tensor([prompt_ids], dtype=torch.long, device=device)  # (1, P)
    cache = target.new_cache(len(prompt_ids) + max_new_tokens + K + 1)
    logits, feats = target.forward(prompt, cache, logits_to_keep=1)
    seq = list(prompt_ids) + [int(logits[0, -1].argmax())]  # x_0..x_L; x_L (the bonus) not yet in the target
    new, done = _finish(seq[len(prompt_ids):], eos_ids, max_new_tokens)
    result = SpeculativeResult(tokens=new)
    if done:
        _sync(device)
        result.seconds = time.perf_counter() - start
        return result

    P = len(prompt_ids)
    dcache = inference.DraftCache(draft.cfg, 1, P + max_new_tokens + K + 2, device=device, dtype=draft_dtype)
    drafted_from = 0  # draft cache holds step-0 entries for positions < drafted_from
    while True:
        L = len(seq) - 1  # verified positions 0..L-1 are in the target cache, features `feats` for drafted_from..L-1
        # step 0 over the newly verified positions: (f_p, x_{p+1}) at RoPE position p
        pos = torch.arange(drafted_from, L, device=device)[None]                       # (1, T)
        ids = torch.tensor([seq[drafted_from + 1: L + 1]], dtype=torch.long, device=device)  # (1, T)
        d_logits, h = inference.draft_step(draft, dcache, ids, feats.to(draft_dtype), pos, fused=False)
        drafted = [draft.draft_to_target(d_logits[:, -1].argmax(-1, keepdim=True))]     # (1, 1) target ids
        h = h[:, -1:]                                                                    # (1, 1, H)
        for j in range(1, K):  # later steps from the draft's own hidden state (eagle/inference.py)
            pos = torch.tensor([[L - 1 + j]], device=device)
            d_logits, h = inference.draft_step(draft, dcache, drafted[-1], h, pos, fused=True)
            drafted.append(draft.draft_to_target(d_logits[:, -1].argmax(-1, keepdim=True)))
        # the proposals stay on the device until here: one host sync for all K, not one per draft step
        verify_in = torch.cat([torch.tensor([[seq[L]]], dtype=torch.long, device=device)] + drafted, dim=1)
        proposal = verify_in[0, 1:].tolist()                                              # (K+1,) -> K ids
        t_logits, t_feats = target.forward(verify_in, cache)
        accepted, bonus = verify(t_logits[0], proposal)
        result.accepted.append(accepted)
        target.crop(cache, L + 1 + accepted)  # keep x_L and the accepted drafts
        dcache.crop(L)                      # drop the speculative steps 1..K-1 entries
        feats = t_feats[:, : accepted + 1]  # features of the newly verified positions L..L+accepted
        drafted_from = L
        seq += proposal[:accepted] + [bonus]
        new, done = _finish(seq[P:], eos_ids, max_new_tokens)
        if done:
            break
    _sync(device)
    result.tokens = new
    result.seconds = time.perf_counter() - start
    return result


@torch.inference_mode()
def greedy_generate(model, prompt_ids: list[int], *, max_new_tokens: int, eos_ids, pad_id,
                    device="cpu", generation_options=None) -> tuple[list[int], float]:
    """The target's own greedy `generate()` (the lossless reference and the baseline speed).

    `generation_options`: more GenerationConfig fields, e.g. transformers' static cache and compiled decode step
    (stages/static_cache.py): still transformers' own generation loop, independent of speculative_generate."""
    from transformers import GenerationConfig

    config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=list(eos_ids),
                              pad_token_id=pad_id, **(generation_options or {}))
    prompt = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    _sync(device)
    start = time.perf_counter()
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=config)
    _sync(device)
    return out[0, len(prompt_ids):].tolist(), time.perf_counter() - start


@torch.inference_mode()
def greedy_generate_batch(model, prompts: list[list[int]], *, max_new_tokens: int, eos_ids, pad_id,
                          device="cpu", generation_options=None) -> tuple[list[list[int]], float]:
    """The target's own greedy `generate()` over several prompts at once (left-padded, one batch): per prompt the
    new tokens up to and including its first end-of-sequence token, as `greedy_generate` returns them, and the
    seconds of the whole call. Decode on a CPU reads the weights once per step for every row, so a batch of 16
    costs little more than one prompt."""
    from transformers import GenerationConfig

    config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=list(eos_ids),
                              pad_token_id=pad_id, **(generation_options or {}))
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for r, p in enumerate(prompts):  # left padding: every prompt ends where generation starts
        ids[r, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[r, width - len(p):] = 1
    _sync(device)
    start = time.perf_counter()
    out = model.generate(ids.to(device), attention_mask=mask.to(device), generation_config=config)
    _sync(device)
    seconds = time.perf_counter() - start
    eos, rows = set(eos_ids), []
    for row in out[:, width:].tolist():  # a finished row goes on with padding: cut after its first EOS
        end = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        rows.append(row[:end])
    return rows, seconds
