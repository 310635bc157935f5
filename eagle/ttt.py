"""Training-time test (TTT): K unrolled draft steps over packed rows, exactly imitating how engines draft.

Batch contract (produced by stages/train/loader.py; all [B, T] unless noted; rows are packed documents):
  aux_hidden_states  float [B, T, 3*Ht]  f_t, target features at position t (ascending layer order)
  input_ids          int64 [B, T]        x_{t+1}: the token fed at position t (the next token of the document)
  position_ids       int64 [B, T]        t within its document (RoPE position), restarting at 0 per document
  document_ids       int64 [B, T]        document of each position; unique within a row; padding = its own id
  loss_mask          bool  [B, T]        position t is supervised: x_{t+2} is a trained token, teacher exists
  one teacher, the target's distribution over x_{t+2} (= stored teacher of position t+1):
    teacher_topk_ids int64 [B, T, k] + teacher_topk_logprobs float [B, T, k]   (kind "topk")
    teacher_argmax   int64 [B, T]                                              (kind "argmax")
    teacher_probs    float [B, T, V]                                           (kind "softmax")
A document of n stored tokens gives n-1 positions (t = 0..n-2).

Step j at position t is the engine's draft step j with n = t - j verified tokens (see the reference):
step 0 input (fuse(f_t), x_{t+1}); step j>=1 input (h^{j-1}_{t-1}, x_{t+1}), h the state the engine feeds back
(pre-norm out, or norm(out) for EAGLE-3.1's norm_output: model.head); queries at step j attend to
step-0 keys at positions <= t-j of the same document and to step-i keys (1 <= i <= j) at position t-j+i.
Valid (counted in the loss) only where loss_mask[t] and position_ids[t] >= j.
Nothing of size T*T*K is materialised: a dense [T, T] block for step-0 keys plus j diagonals (CPU path, which
runs backward) or a FlexAttention block mask (GPU path).

API:
    def ttt_forward(model, batch, steps: int, attention="auto") -> list[Tensor]   # logits [B, T, Vd] per step
    def ttt_loss(model, batch, steps: int, normalizer: Tensor, teacher_kind: str, decay: float = 0.8,
                 attention="auto") -> tuple[Tensor, dict[str, Tensor]]
        # normalizer float [steps]: number of valid positions per step (global over ranks / accumulation)
        # loss = sum_j decay**j * ce_sum_j / normalizer_j
        # metrics (all tensors on device, no host sync): "ce_sum" [steps], "correct" [steps], "valid" [steps]
"""
from __future__ import annotations

import torch

from eagle.attention import make_ttt_attention
from eagle.loss import draft_cross_entropy
from eagle.vocab import target_to_draft_index


def iter_ttt_steps(model, batch: dict, steps: int, attention: str = "auto"):
    """Yield (j, h_j, logits_j) for j = 0..steps-1: the state step j+1 reads (B, T, H), logits (B, T, Vd)."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"TTT steps must be an integer >= 1, got {steps!r}")
    ids, pos, doc = batch["input_ids"], batch["position_ids"], batch["document_ids"]  # (B, T) each
    attend = make_ttt_attention(attention, doc)
    embeds = model.embed(ids)  # (B, T, H): x_{t+1}, the same ground-truth token at every step
    # step j >= 1 reads h^{j-1} one row back; a document's first row has no predecessor in its document
    starts = torch.ones_like(doc, dtype=torch.bool)
    starts[:, 1:] = doc[:, 1:] != doc[:, :-1]
    hidden = model.fuse(batch["aux_hidden_states"])  # (B, T, H)
    for j in range(steps):
        out = model.layer(embeds, hidden, pos, attend)  # (B, T, H) pre-norm
        logits, h = model.head(out)  # (B, T, Vd), (B, T, H): h = out, or norm(out) with norm_output
        yield j, h, logits
        prev = torch.nn.functional.pad(h, (0, 0, 1, 0))[:, :-1]  # (B, T, H): row t holds h[t-1]
        hidden = prev.masked_fill(starts[..., None], 0.0)


def ttt_forward(model, batch: dict, steps: int, attention: str = "auto") -> list[torch.Tensor]:
    """Logits [B, T, Vd] of every TTT step (index j = step j)."""
    return [logits for _, _, logits in iter_ttt_steps(model, batch, steps, attention)]


def ttt_loss(model, batch: dict, steps: int, normalizer: torch.Tensor, teacher_kind: str, decay: float = 0.8,
             attention: str = "auto") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """sum_j decay**j * ce_sum_j / normalizer_j, plus per-step metrics as device tensors (no host sync)."""
    pos, loss_mask = batch["position_ids"], batch["loss_mask"]
    t2d_index = target_to_draft_index(model.t2d)  # (V,) draft id or -1
    loss = torch.zeros((), device=pos.device, dtype=torch.float32)
    ce_sums, corrects, valids = [], [], []
    for j, _, logits in iter_ttt_steps(model, batch, steps, attention):
        valid = loss_mask & (pos >= j)  # (B, T): the engine's step j needs n = t - j >= 0 in the document
        ce_sum, correct, count = draft_cross_entropy(logits, batch, valid, t2d_index, model.d2t, teacher_kind)
        loss = loss + (decay ** j) * ce_sum / normalizer[j].clamp_min(1)
        ce_sums.append(ce_sum)
        corrects.append(correct)
        valids.append(count)
    metrics = {"ce_sum": torch.stack(ce_sums), "correct": torch.stack(corrects), "valid": torch.stack(valids)}
    return loss, metrics
