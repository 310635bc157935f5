"""Test helpers for the draft model tests (test_model, test_ttt, test_inference, test_compile) and eval's
speculative loops (test_evaluate, test_dflash_eval).

Tiny draft configs, random-weight drafts with non-trivial norms and vocab maps, packed TTT batches written by
the test, the engine-style chain-drafting reference built on eagle.inference, and the check that a speculative
loop proposes, round by round, what a from-scratch recomputation proposes.
"""
from __future__ import annotations

import torch

from eagle.config import DraftConfig
from eagle.inference import DraftCache, draft_step
from eagle.model import Eagle3Draft



def tiny_cfg(**overrides) -> DraftConfig:
    fields = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=48,
                  rms_norm_eps=1e-6, rope_theta=10000.0, rope_scaling=None, max_position_embeddings=256,
                  vocab_size=50, draft_vocab_size=40, target_hidden_size=24, num_target_layers=8,
                  aux_layer_ids=(2, 4, 5), ttt_steps=4)
    fields.update(overrides)
    return DraftConfig(**fields)


def random_draft(cfg: DraftConfig, seed: int = 0) -> Eagle3Draft:
    """A draft with O(1) activations, norm weights != 1 and a scattered vocab map (float32)."""
    torch.manual_seed(seed)
    model = Eagle3Draft(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:  # RMSNorm weights
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            else:
                p.normal_(0.0, 1.5 / p.shape[1] ** 0.5)
        model.embed_tokens.weight.normal_()
        kept = torch.sort(torch.randperm(cfg.vocab_size)[: cfg.draft_vocab_size]).values
        model.d2t.copy_(kept - torch.arange(cfg.draft_vocab_size))
        model.t2d.zero_()
        model.t2d[kept] = True
    return model


def packed_batch(cfg: DraftConfig, doc_lengths: list[int], T: int, rows: int = 1, seed: int = 0,
                 topk: int = 4) -> dict:
    """Rows of length T, each packing documents of `doc_lengths` positions, then padding (its own document id).

    Row r rotates the document order by r so rows differ. Includes a top-k teacher.
    """
    g = torch.Generator().manual_seed(seed)
    assert sum(doc_lengths) <= T
    doc = torch.empty(rows, T, dtype=torch.int64)
    pos = torch.zeros(rows, T, dtype=torch.int64)
    for r in range(rows):
        order = doc_lengths[r % len(doc_lengths):] + doc_lengths[: r % len(doc_lengths)]
        a = 0
        for i, length in enumerate(order):
            doc[r, a:a + length] = i
            pos[r, a:a + length] = torch.arange(length)
            a += length
        doc[r, a:] = 1000  # padding: one id of its own, positions 0
    pad = doc == 1000
    loss_mask = (torch.rand(rows, T, generator=g) < 0.8) & ~pad
    logprobs = torch.log_softmax(3 * torch.randn(rows, T, topk, generator=g), -1).sort(-1, descending=True).values
    return dict(
        aux_hidden_states=torch.randn(rows, T, 3 * cfg.target_hidden_size, generator=g),
        input_ids=torch.randint(0, cfg.vocab_size, (rows, T), generator=g),
        position_ids=pos,
        document_ids=doc,
        loss_mask=loss_mask,
        teacher_topk_ids=torch.stack([torch.randperm(cfg.vocab_size, generator=g)[:topk] for _ in range(rows * T)])
        .view(rows, T, topk),
        teacher_topk_logprobs=logprobs,
    )


def documents(batch: dict, row: int = 0) -> list[tuple[int, int]]:
    """(start, length) of every non-padding document in a row."""
    doc = batch["document_ids"][row].tolist()
    spans, a = [], 0
    while a < len(doc):
        b = a
        while b < len(doc) and doc[b] == doc[a]:
            b += 1
        if doc[a] != 1000:
            spans.append((a, b - a))
        a = b
    return spans


def engine_chain_logits(model, cfg, aux, ids, n: int, steps: int, position_shift: int = 0) -> list[torch.Tensor]:
    """Chain drafting on one document as the engines run it, for n verified positions (0..n).

    aux (1, L, 3Ht) and ids (1, L) of the document (ids[p] = x_{p+1}). Step 0 is a prefill over positions 0..n;
    step j >= 1 feeds the ground-truth token ids[n + j] and the previous step's pre-norm output at position
    n + j (+ position_shift, for the test that proves the comparison is sensitive). Returns the logits
    [Vd] of steps 0..min(steps, L - n) - 1.
    """
    length = ids.shape[1]
    cache = DraftCache(cfg, 1, n + steps)
    logits, out = draft_step(model, cache, ids[:, : n + 1], aux[:, : n + 1], torch.arange(n + 1)[None], fused=False)
    result, h = [logits[0, -1]], out[:, -1:]
    for j in range(1, steps):
        if n + j >= length:
            break
        logits, h = draft_step(model, cache, ids[:, n + j:n + j + 1], h,
                               torch.tensor([[n + j + position_shift]]), fused=True)
        result.append(logits[0, -1])
    return result


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    return ((a - b).abs().max() / b.abs().max()).item()


def check_rounds_against_recomputation(monkeypatch, model, tokenizer, draft, generate, fresh_proposal,
                                       draft_tokens: int = 3, new_tokens: int = 24) -> None:
    """Run the speculative loop `generate` (stages/evaluate: the EAGLE or the DFlash one) on a chat prompt,
    recording each round's proposal where `verify_draft` sees it; its output must be the target's greedy one
    over more than 3 rounds, and every round must propose `fresh_proposal(seq, L)`: what a from-scratch
    recomputation over the verified tokens seq[:L] (bonus seq[L]) drafts, with no incremental cache."""
    import stages.evaluate.speculative as spec

    rounds, real_verify = [], spec.verify_draft

    def recording_verify(logits, draft_ids):
        rounds.append(list(draft_ids))
        return real_verify(logits, draft_ids)

    monkeypatch.setattr(spec, "verify_draft", recording_verify)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is a list?"}],
                                           add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    wrapped = spec.TargetWithAux(model, draft.cfg.aux_layer_ids)
    try:
        result = generate(wrapped, draft, prompt, max_new_tokens=new_tokens, draft_tokens=draft_tokens,
                          eos_ids=[-1])
    finally:
        wrapped.remove()
    reference, _ = spec.greedy_generate(model, prompt, max_new_tokens=new_tokens, eos_ids=[-1], pad_id=0)
    assert result.tokens == reference and len(rounds) == len(result.accepted) > 3
    seq, L = list(prompt) + reference, len(prompt)
    for proposal, accepted in zip(rounds, result.accepted):
        assert proposal == fresh_proposal(seq, L)
        L += accepted + 1
