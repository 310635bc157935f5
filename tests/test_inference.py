"""Cached draft inference: prefill == incremental decode, crop + re-prefill == from scratch, batch rows independent.

The step's agreement with training (TTT) is tested in test_ttt.py; its forward against a float64 reference in
test_model.py.
"""
from __future__ import annotations

import pytest
import torch

from draft_testing import random_draft, rel_err, tiny_cfg
from eagle.inference import DraftCache, draft_step

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def inputs(cfg, T, B=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, T, 3 * cfg.target_hidden_size, generator=g),
            torch.randint(0, cfg.vocab_size, (B, T), generator=g), torch.arange(T).expand(B, T))


def test_prefill_equals_token_by_token():
    cfg = tiny_cfg()
    model = random_draft(cfg, seed=1)
    aux, ids, pos = inputs(cfg, 9)
    full, full_out = draft_step(model, DraftCache(cfg, 1, 9), ids, aux, pos, fused=False)
    cache = DraftCache(cfg, 1, 9)
    for t in range(9):
        logits, out = draft_step(model, cache, ids[:, t:t + 1], aux[:, t:t + 1], pos[:, t:t + 1], fused=False)
        assert rel_err(logits[0, 0], full[0, t]) <= 1e-5
        assert rel_err(out[0, 0], full_out[0, t]) <= 1e-5
    assert cache.length == 9


def test_fused_hidden_skips_fc():
    cfg = tiny_cfg()
    model = random_draft(cfg, seed=2)
    aux, ids, pos = inputs(cfg, 5)
    a, _ = draft_step(model, DraftCache(cfg, 1, 5), ids, aux, pos, fused=False)
    with torch.no_grad():
        b, _ = draft_step(model, DraftCache(cfg, 1, 5), ids, model.fuse(aux), pos, fused=True)
    assert rel_err(a, b) <= 1e-6


def test_crop_then_prefill_verified_tokens_equals_from_scratch():
    """The eval loop: draft K steps past n, crop back to the verified prefix, prefill the newly verified
    positions from target features; the cache then equals one built from scratch."""
    cfg = tiny_cfg()
    model = random_draft(cfg, seed=3)
    aux, ids, pos = inputs(cfg, 12)
    cache = DraftCache(cfg, 1, 16)
    logits, out = draft_step(model, cache, ids[:, :6], aux[:, :6], pos[:, :6], fused=False)
    h = out[:, -1:]
    for j in range(1, 4):  # three speculative steps write slots 6..8 with draft-state inputs
        d = model.draft_to_target(logits[:, -1].argmax(-1))[:, None]
        logits, h = draft_step(model, cache, d, h, pos[:, 5 + j:6 + j], fused=True)
    assert cache.length == 9
    cache.crop(6)  # keep the verified positions 0..5
    again, _ = draft_step(model, cache, ids[:, 6:12], aux[:, 6:12], pos[:, 6:12], fused=False)
    scratch, _ = draft_step(model, DraftCache(cfg, 1, 12), ids, aux, pos, fused=False)
    assert rel_err(again[0], scratch[0, 6:12]) <= 1e-5


def test_batch_rows_are_independent():
    cfg = tiny_cfg()
    model = random_draft(cfg, seed=4)
    aux, ids, pos = inputs(cfg, 7, B=2, seed=5)
    pos = pos + torch.tensor([[0], [3]])  # rows at different RoPE positions
    both, both_out = draft_step(model, DraftCache(cfg, 2, 8), ids, aux, pos, fused=False)
    for b in range(2):
        one, one_out = draft_step(model, DraftCache(cfg, 1, 8), ids[b:b + 1], aux[b:b + 1], pos[b:b + 1],
                                  fused=False)
        assert rel_err(both[b], one[0]) <= 1e-5 and rel_err(both_out[b], one_out[0]) <= 1e-5


def test_cache_limits_raise_clearly():
    cfg = tiny_cfg()
    model = random_draft(cfg)
    aux, ids, pos = inputs(cfg, 5)
    cache = DraftCache(cfg, 1, 4)
    with pytest.raises(ValueError, match="overflow"):
        draft_step(model, cache, ids, aux, pos, fused=False)
    draft_step(model, cache, ids[:, :3], aux[:, :3], pos[:, :3], fused=False)
    with pytest.raises(ValueError, match="crop"):
        cache.crop(4)
    cache.crop(0)
    assert cache.length == 0
