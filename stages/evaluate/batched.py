"""Batched greedy chain speculative decoding: `eagle-pipe eval --batch-size N` decodes N turns together.

On a CPU a verification forward at batch 1 is memory-bound (each round reads every weight for K+1 tokens), so
N rows verified in one forward cost far less than N forwards. The rows then diverge: each accepts its own
number of drafts per round. Rather than one cache per row, all rows write the same cache slots, and a slot a
row did not keep (a draft it rejected, the left padding of a shorter prompt) is a hole that the row's later
queries never attend: a per-row `kept` mask over the slots becomes the attention mask. RoPE positions are per
row (its own token count), independent of the slots. After a round the write position moves on by the longest
accepted run in the batch, so the cache grows by at most K+1 slots per round. The rows are sorted by prompt
length and prefilled a few at a time (`prefill`), each group padded only to its own longest prompt. A row that
finishes leaves the batch after its round (`keep_rows` on both caches), so later forwards compute only rows
still decoding.

Target side: the model's own forward on transformers' StaticCache (one write position for the batch) with the
4D mask, which transformers passes through as given, to `ragged_attention`, an attention function registered
with transformers and switched on for these forwards only: grouped-query heads read their kv head in place and
only the slots written so far are read (with SDPA, repeating the batch's whole K/V per layer and forward cost
several times the matmuls). Only targets whose every layer is plain full attention take this path (a sliding
window or attention sinks would need more than one mask); `BatchedTarget` refuses the others with
`Unbatchable`, and eval then decodes one turn at a time.

Draft side: eagle/inference.py's `draft_step`, on a RaggedDraftCache (the same holes), exactly as
`speculative_generate` runs it row by row: step 0 over each row's newly verified positions, steps 1..K-1 from the
draft's own state, verification of [x_L, d_1..d_K] by `speculative.verify_draft` per row.

Lossless: eval compares each row with the target's own batched greedy `generate()`; a row that differs is rerun
alone (`speculative_generate` against `greedy_generate`), as for batched references, and counted.
"""
from __future__ import annotations

import contextlib
import time

import torch

from stages.evaluate import speculative
from stages.evaluate.speculative import SpeculativeResult, TargetWithAux, _finish, _sync
from stages.evaluate.static_target import rewind, static_full_cache

ATTENTION_NAME = "eagle_pipe_ragged"
PREFILL_ROWS = 8  # rows per prefill forward (sorted by length, so each group pads only to its own longest)
FINISHED_ROWS_LEAVE = True  # False: they ride along to the end of the batch (bench/perf/eval_batch.py compares)


class Unbatchable(ValueError):
    """The target has layers that one ragged attention mask cannot express."""


def ragged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention-function signature: (B, nH, T, D) queries over the static cache's (B, nKV, S, D)
    keys/values where `attention_mask` (B, 1, T, L <= S, bool) allows -> (B, T, nH, D)."""
    from eagle.attention import masked_attention

    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None or kwargs.get("sliding_window"):
        raise Unbatchable("ragged attention runs plain full attention only (no softcap, sinks or window)")
    used = attention_mask.shape[-1]
    out = masked_attention(query, key[:, :, :used], value[:, :, :used], attention_mask, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def _register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, ragged_attention)


class BatchedTarget(TargetWithAux):
    """TargetWithAux for B rows on one static cache with holes (see the module docstring).

    new_batch(rows, max_len) empties it; forward(input_ids [B, T], positions [B, T]) writes T slots at the write
    position, every row keeping them, and returns (logits, aux [B, T, 3*H]); keep_first(counts) then keeps only
    the first counts[r] of those T entries in row r and moves the write position to just past the longest.
    """

    def __init__(self, model, aux_layer_ids):
        if not supports_batched(model):
            raise Unbatchable(f"{type(model).__name__}: batched speculative decoding needs a static cache whose every "
                              "layer is full attention, without logit softcapping")
        super().__init__(model, aux_layer_ids)
        _register_attention()
        self.cache, self.kept, self.length, self.last_write = None, None, 0, 0

    def new_batch(self, rows: int, max_len: int) -> None:
        self.cache = static_full_cache(self.model.config, max_len)
        config = self.model.config.get_text_config()
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.cache.early_initialization(rows, config.num_key_value_heads, head_dim, self.model.dtype,
                                        self.model.device)  # allocated now: prefill writes groups of rows
        self.kept = torch.zeros(rows, max_len, dtype=torch.bool, device=self.model.device)
        self.length = 0

    @contextlib.contextmanager
    def _ragged(self):
        """The model's attention switched to `ragged_attention` for one forward, then back (the references and
        the batch-1 path run the model's own)."""
        config = self.model.config
        before = config._attn_implementation
        config._attn_implementation = ATTENTION_NAME
        try:
            yield
        finally:
            config._attn_implementation = before

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kept: torch.Tensor | None = None,
                logits_to_keep: int = 0):
        """kept (B, T) bool: which of the new entries each row keeps (default all: a verification, whose holes
        `keep_first` makes after it)."""
        from eagle.attention import ragged_mask

        start, t = self.length, input_ids.shape[1]
        if start + t > self.kept.shape[1]:
            raise ValueError(f"target cache overflow: {start} + {t} tokens > {self.kept.shape[1]} slots")
        if int(self.cache.get_seq_length()) != start:  # the write position of transformers' cache must follow
            raise RuntimeError(f"target cache at {int(self.cache.get_seq_length())}, expected {start}")
        self.kept[:, start:start + t] = True if kept is None else kept
        logits, aux = self._run(input_ids, positions, ragged_mask(self.kept[:, :start + t], start), logits_to_keep)
        self.length = start + t
        self.last_write = start
        return logits, aux

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]], width: int, rows_per_forward: int | None = None):
        """Row r's prompt at slots width-len..width-1 (the slots before it are holes), with RoPE positions from 0.

        Rows go through the target `rows_per_forward` at a time, each group padded only to its own longest
        prompt (the batch's rows are sorted by length, so a group pads little): padding the whole batch to its
        longest prompt computed 2.9x the real positions on MT-bench's first turns. Returns (logits of each row's
        last token (B, V), aux (B, width, 3*H), zero at the holes)."""
        from eagle.attention import ragged_mask

        if self.length != 0 or max(map(len, prompts)) > width:
            raise ValueError(f"prefill needs an empty cache and prompts of at most {width} tokens")
        device, layers = self.model.device, self.cache.layers
        rows_per_forward = rows_per_forward or PREFILL_ROWS
        whole = [(layer.keys, layer.values) for layer in layers]
        logits, aux = [], None
        try:
            for r0 in range(0, len(prompts), rows_per_forward):
                group = prompts[r0:r0 + rows_per_forward]
                t = max(map(len, group))
                ids = torch.zeros(len(group), t, dtype=torch.long)
                for r, p in enumerate(group):
                    ids[r, t - len(p):] = torch.tensor(p, dtype=torch.long)
                lengths = torch.tensor([len(p) for p in group])
                positions = (torch.arange(t)[None] - (t - lengths)[:, None]).clamp(min=0)
                kept = self.kept[r0:r0 + len(group), :width]  # a view: the group's rows of the batch's mask
                kept[:] = torch.arange(width)[None].to(device) >= (width - lengths)[:, None].to(device)
                for layer, (keys, values) in zip(layers, whole):  # the group's rows of the cache, as views
                    layer.keys, layer.values = keys[r0:r0 + len(group)], values[r0:r0 + len(group)]
                    layer.cumulative_length.fill_(width - t)
                group_logits, group_aux = self._run(ids.to(device), positions.to(device),
                                                    ragged_mask(kept, width - t), logits_to_keep=1)
                logits.append(group_logits[:, -1])
                if aux is None:
                    aux = group_aux.new_zeros(len(prompts), width, group_aux.shape[-1])
                aux[r0:r0 + len(group), width - t:] = group_aux * kept[:, width - t:, None]
        finally:
            for layer, (keys, values) in zip(layers, whole):
                layer.keys, layer.values = keys, values
                layer.cumulative_length.fill_(width)
        self.length, self.last_write = width, 0
        return torch.cat(logits), aux

    def _run(self, input_ids, positions, allowed, logits_to_keep):
        """One forward of the model's own layers with ragged attention under `allowed`; (logits, aux)."""
        with self._ragged():
            return self.captured_forward(input_ids=input_ids, position_ids=positions, attention_mask=allowed,
                                         use_cache=True, logits_to_keep=logits_to_keep,
                                         **{self._cache_kwarg: self.cache})

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only these rows (indices into the batch), in this order: finished turns leave the batch."""
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[rows], layer.values[rows]
            layer.batch_size = len(rows)
        self.kept = self.kept[rows]

    def keep_first(self, counts: torch.Tensor) -> None:
        """Row r keeps the first counts[r] entries of the last write; the write position moves to the end of the
        longest kept run (the slots after it are overwritten by the next write)."""
        start, end = self.last_write, self.length
        offset = torch.arange(end - start, device=self.kept.device)
        self.kept[:, start:end] = offset[None] < counts[:, None]
        keep_to = start + int(counts.max())
        if end > keep_to:
            rewind(self.cache, keep_to)
        self.length = keep_to


def supports_batched(model) -> bool:
    """Whether every layer of the target's static cache is plain full attention (no sliding window, chunked
    attention or other layer kinds) and its attention has no logit softcapping."""
    from transformers import StaticCache
    from transformers.cache_utils import StaticLayer

    from stages.static_cache import supports_static_cache

    config = model.config.get_text_config()
    if not supports_static_cache(model) or getattr(config, "attn_logit_softcapping", None):
        return False
    try:
        layers = StaticCache(config=model.config, max_cache_len=8).layers
    except Exception:  # a cache transformers cannot build for this config
        return False
    return all(type(layer) is StaticLayer for layer in layers)


@torch.inference_mode()
def speculative_generate_batch(target: BatchedTarget, draft, prompts: list[list[int]], *, max_new_tokens: int,
                               draft_tokens: int, eos_ids, pad_id: int, device="cpu"
                               ) -> tuple[list[SpeculativeResult], float]:
    """Greedy speculative decoding of several prompts at once; per prompt the new tokens and acceptance counts
    (as `speculative_generate` returns them), and the seconds of the whole batch."""
    from eagle import inference

    verify = speculative.verify_draft  # looked up per call, so a test can replace it
    eos_ids = set(eos_ids)
    K, B = draft_tokens, len(prompts)
    draft_dtype = next(draft.parameters()).dtype
    width = max(len(p) for p in prompts)
    max_len = width + (K + 1) * (max_new_tokens + 1)  # each round keeps >= 1 token of every live row
    _sync(device)
    start = time.perf_counter()

    # rows sorted by prompt length (prefill groups pad little); every prompt ends at slot width-1
    order = sorted(range(B), key=lambda i: len(prompts[i]))             # the prompt of each batch row
    ids = torch.full((B, width), pad_id, dtype=torch.long)
    for r, i in enumerate(order):
        ids[r, width - len(prompts[i]):] = torch.tensor(prompts[i], dtype=torch.long)
    lengths = torch.tensor([len(prompts[i]) for i in order])
    positions = (torch.arange(width)[None] - (width - lengths)[:, None]).clamp(min=0)  # (B, width) RoPE positions
    ids, positions = ids.to(device), positions.to(device)
    target.new_batch(B, max_len)
    logits, feats = target.prefill([prompts[i] for i in order], width)
    kept = target.kept[:, :width].clone()                              # each row's prompt slots
    bonus = logits.argmax(-1)                                           # (B,) x_L of every row
    seqs = {i: list(prompts[i]) + [b] for i, b in zip(order, bonus.tolist())}
    results, done = [None] * B, [False] * B
    for i, seq in seqs.items():
        tokens, done[i] = _finish(seq[len(prompts[i]):], eos_ids, max_new_tokens)
        results[i] = SpeculativeResult(tokens=tokens)

    dcache = inference.RaggedDraftCache(draft.cfg, B, max_len + K, device=device, dtype=draft_dtype)
    # step 0 over the prompts: feature f_p with token x_{p+1} at RoPE position p (x_P is the bonus)
    dcache.keep_next(kept)
    step_ids = torch.cat([ids[:, 1:], bonus[:, None]], dim=1)
    d_logits, h = inference.draft_step(draft, dcache, step_ids, feats.to(draft_dtype), positions, fused=False)
    last = torch.full((B,), width - 1, device=device)                  # each row's last kept step-0 entry
    L = lengths.to(device)                                              # position of x_L in each row
    while not all(done):
        rows = torch.arange(len(order), device=device)
        drafted = [draft.draft_to_target(d_logits[rows, last].argmax(-1))]  # (rows,) target ids
        h = h[rows, last][:, None]                                           # (rows, 1, H)
        verified_length = dcache.length
        for j in range(1, K):
            d_logits_j, h = inference.draft_step(draft, dcache, drafted[-1][:, None], h, (L - 1 + j)[:, None],
                                                 fused=True)
            drafted.append(draft.draft_to_target(d_logits_j[:, -1].argmax(-1)))
        verify_in = torch.stack([bonus] + drafted, dim=1)                    # (rows, K+1): x_L, d_1..d_K
        t_logits, t_feats = target.forward(verify_in, L[:, None] + torch.arange(K + 1, device=device))
        proposals = verify_in[:, 1:].tolist()
        accepted, bonuses = [], []
        for r, i in enumerate(order):
            if done[i]:  # a finished row that stays (FINISHED_ROWS_LEAVE off): one token per round, unrecorded
                accepted.append(0)
                bonuses.append(int(t_logits[r, 0].argmax()))
                continue
            a, b = verify(t_logits[r], proposals[r])
            accepted.append(a)
            bonuses.append(b)
            results[i].accepted.append(a)
            seqs[i] += proposals[r][:a] + [b]
            results[i].tokens, done[i] = _finish(seqs[i][len(prompts[i]):], eos_ids, max_new_tokens)
        counts = torch.tensor(accepted, device=device)
        target.keep_first(counts + 1)                     # x_L and the accepted drafts of each row
        dcache.crop(verified_length)                      # drop the speculative steps 1..K-1
        # step 0 over each row's newly verified positions L..L+a: (f_p, x_{p+1}); entries past a are holes
        top = int(counts.max()) + 1
        new_tokens = torch.full((len(order), top), pad_id, dtype=torch.long)
        for r, a in enumerate(accepted):
            new_tokens[r, :a + 1] = torch.tensor(proposals[r][:a] + [bonuses[r]], dtype=torch.long)
        offset = torch.arange(top, device=device)
        dcache.keep_next(offset[None] <= counts[:, None])
        d_logits, h = inference.draft_step(draft, dcache, new_tokens.to(device), t_feats[:, :top].to(draft_dtype),
                                           L[:, None] + offset, fused=False)
        last = counts
        L = L + counts + 1
        bonus = torch.tensor(bonuses, dtype=torch.long, device=device)
        live = [r for r, i in enumerate(order) if not done[i]]
        if FINISHED_ROWS_LEAVE and live and len(live) < len(order):
            # a forward costs about rows x tokens; copying the caches' rows costs far less (bench/perf/eval_batch.py)
            keep = torch.tensor(live, device=device)
            target.keep_rows(keep)
            dcache.keep_rows(keep)
            d_logits, h, last, L, bonus = d_logits[keep], h[keep], last[keep], L[keep], bonus[keep]
            order = [order[r] for r in live]
    _sync(device)
    return results, time.perf_counter() - start
