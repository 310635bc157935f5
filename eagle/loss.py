"""Draft loss against cached teacher outputs, and on-device accuracy / simulated acceptance metrics.

The draft predicts over Vd draft ids; the teacher speaks target ids. The teacher is mapped into the draft
vocabulary (mass on ids outside it is dropped) and renormalised over what is kept, then the loss is the
soft cross-entropy  -sum_i q_i log p_draft(i)  with log p_draft from a float32 log-softmax.
Everything is tensors in, tensors out: no `.item()`, no data-dependent Python branches, so the whole function
compiles with `torch.compile(fullgraph=True)`. The top-k path gathers k columns of the logits, never
materialising a [B, T, V] one-hot.

API:

    def draft_cross_entropy(logits, batch, valid, target_to_draft, d2t, teacher_kind) -> tuple[Tensor, Tensor, Tensor]
        # logits [B,T,Vd] (any float dtype; computed in float32); valid bool [B,T]
        # topk: teacher top-k log-probs -> probs, keep ids inside the draft vocab, renormalise over kept;
        #       positions with zero kept mass drop out of `valid`.
        # argmax: hard CE on the teacher argmax mapped into the draft vocab (drops out if outside).
        # softmax: full distribution restricted to the draft vocab, renormalised.
        # returns (ce_sum scalar, correct_count scalar, valid_count scalar); "correct" = draft argmax mapped
        # through d2t equals the teacher's argmax (target id), over the valid positions.
    def simulated_acceptance_length(acc: Tensor) -> Tensor
        # acc [K] per-step accuracies -> 1 + sum_k prod_{j<=k} acc_j (tokens per target forward incl. bonus)

All three returned scalars are float32 (counts are exact below 2**24 positions per call). `valid_count` and
`correct_count` are over the positions that contribute to `ce_sum` (after the drop-outs above).
Batch keys read per kind: topk: teacher_topk_ids [B,T,k] + teacher_topk_logprobs [B,T,k]; argmax:
teacher_argmax [B,T]; softmax: teacher_probs [B,T,V].
"""
from __future__ import annotations

import torch
from torch import Tensor

TEACHER_KINDS = ("topk", "argmax", "softmax")


def draft_cross_entropy(logits: Tensor, batch: dict, valid: Tensor, target_to_draft: Tensor, d2t: Tensor,
                        teacher_kind: str) -> tuple[Tensor, Tensor, Tensor]:
    """(ce_sum, correct_count, valid_count) of one draft step; see the module docstring."""
    if teacher_kind not in TEACHER_KINDS:
        raise ValueError(f"unknown teacher_kind {teacher_kind!r}; expected one of {TEACHER_KINDS}")
    # log_softmax, not logits - logsumexp: its backward is one fused kernel (eager logsumexp's is several passes)
    logp = torch.log_softmax(logits.float(), dim=-1)                 # (B, T, Vd) float32
    if teacher_kind == "topk":
        ce, kept_valid, teacher_argmax = _topk_ce(logp, batch, target_to_draft)
    elif teacher_kind == "argmax":
        ce, kept_valid, teacher_argmax = _argmax_ce(logp, batch, target_to_draft)
    else:
        ce, kept_valid, teacher_argmax = _softmax_ce(logp, batch, d2t)
    valid = valid & kept_valid                                       # (B, T)
    ce_sum = torch.where(valid, ce, torch.zeros_like(ce)).sum()

    draft_argmax = logits.argmax(dim=-1)                             # (B, T) draft ids
    predicted = draft_argmax + d2t.to(torch.int64)[draft_argmax]     # (B, T) target ids
    correct = (predicted == teacher_argmax) & valid
    return ce_sum, correct.sum().float(), valid.sum().float()


def simulated_acceptance_length(acc: Tensor) -> Tensor:
    """1 + sum_k prod_{j<=k} acc_j: expected tokens per target forward (incl. the bonus) if steps were independent."""
    return 1.0 + torch.cumprod(acc.float(), dim=0).sum()


def _topk_ce(logp_all: Tensor, batch: dict, target_to_draft: Tensor):
    ids = batch["teacher_topk_ids"].long()                           # (B, T, k) target ids
    probs = batch["teacher_topk_logprobs"].float().exp()             # (B, T, k)
    draft_ids = target_to_draft[ids]                                 # (B, T, k), -1 outside the draft vocab
    kept = draft_ids >= 0
    kept_probs = torch.where(kept, probs, torch.zeros_like(probs))
    mass = kept_probs.sum(dim=-1)                                    # (B, T); NaN padding fails `> 0`
    kept_valid = mass > 0
    q = torch.where(kept & kept_valid.unsqueeze(-1), kept_probs / mass.clamp_min(1e-30).unsqueeze(-1),
                    torch.zeros_like(probs))                         # (B, T, k), sums to 1 where kept_valid
    logp = logp_all.gather(-1, draft_ids.clamp_min(0))              # (B, T, k)
    ce = -(q * logp).sum(dim=-1)                                     # (B, T)
    return ce, kept_valid, ids[..., 0]


def _argmax_ce(logp_all: Tensor, batch: dict, target_to_draft: Tensor):
    target = batch["teacher_argmax"].long()                          # (B, T) target ids
    draft_ids = target_to_draft[target]                              # (B, T), -1 outside
    kept_valid = draft_ids >= 0
    logp = logp_all.gather(-1, draft_ids.clamp_min(0).unsqueeze(-1)).squeeze(-1)  # (B, T)
    return -logp, kept_valid, target


def _softmax_ce(logp_all: Tensor, batch: dict, d2t: Tensor):
    probs = batch["teacher_probs"]                                   # (B, T, V), any float dtype
    Vd = d2t.shape[0]
    draft_targets = torch.arange(Vd, device=d2t.device, dtype=torch.int64) + d2t.to(torch.int64)  # (Vd,)
    kept_probs = probs.index_select(-1, draft_targets).float()       # (B, T, Vd)
    kept_probs = torch.where(kept_probs > 0, kept_probs, torch.zeros_like(kept_probs))  # NaN/negatives -> 0
    mass = kept_probs.sum(dim=-1)                                    # (B, T)
    kept_valid = mass > 0
    q = kept_probs / mass.clamp_min(1e-30).unsqueeze(-1)             # (B, T, Vd)
    ce = -(q * logp_all).sum(dim=-1)                                 # (B, T)
    return ce, kept_valid, probs.argmax(dim=-1)
