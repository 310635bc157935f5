"""The EAGLE-3 draft head: fc + one decoder layer over cat(embed, hidden) + norm + lm_head.

Parameter names are the export layout of docs/checkpoint-format.md (no `model.` prefix): fc,
midlayer.{self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj, input_layernorm, hidden_norm,
post_attention_layernorm}, norm, lm_head; with cfg.fc_norm also fc_norm.{0,1,2}.weight [Ht]; buffers d2t [Vd]
int64, t2d [V] bool; the frozen embedding `embed_tokens.weight` [V, H] (requires_grad=False, never exported).

The forward is the one vLLM and SGLang run (docs/checkpoint-format.md, "The forward both engines run" and "EAGLE-3.1 switches"):
    g   = fc(cat(h_a, h_b, h_c))                              step 0 only; later steps feed the previous step's
          fc(cat(n_0(h_a), n_1(h_b), n_2(h_c)))               state; with fc_norm, one RMSNorm(Ht) per aux state
    x   = cat(input_layernorm(embed(token)), hidden_norm(g))  # (B, T, 2H)
    out = g + o_proj(attention(x))                            residual from the hidden stream, not from x
    out = out + mlp(post_attention_layernorm(out))
    logits = lm_head(norm(out))
    next step's g = out (pre-norm), or norm(out) with norm_output (EAGLE-3.1)
There is deliberately no second norm on the hidden stream. Attention is supplied by the caller (`attend`), so
the same layer serves the training-time test (eagle/ttt.py) and the cached inference step (eagle/inference.py).

API:
    class Eagle3Draft(nn.Module):
        def __init__(self, cfg: DraftConfig)
        cfg: DraftConfig
        def init_from_target(self, weights: dict[str, Tensor], d2t: Tensor, t2d: Tensor, init_lm_head=True)
            # copies embed_tokens (frozen), sets d2t/t2d, optionally lm_head = target lm_head rows of the draft vocab
        def fuse(self, aux_hidden_states)  -> Tensor   # [fc_norm +] fc: (.., 3*Ht) -> (.., H)
        def embed(self, input_ids) -> Tensor
        def layer(self, embeds, hidden, positions, attend) -> Tensor  # pre-norm output `out`
        def logits(self, out) -> Tensor                # lm_head(norm(out)) over the draft vocab (.., Vd)
        def head(self, out) -> (Tensor, Tensor)        # (logits(out), the next step's hidden: out or norm(out))
        def draft_to_target(self, draft_ids) -> Tensor # draft_ids + d2t[draft_ids]
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from eagle.rope import RotaryEmbedding, apply_rope

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (q, k, v) -> (B, nH, T, D)


class RMSNorm(nn.Module):
    """Llama RMSNorm: normalise in float32, cast back, then multiply by the weight."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Attention(nn.Module):
    """Projections of the draft attention: 2H -> heads -> H, no biases (SGLang hard-codes none)."""

    def __init__(self, cfg):
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, d
        self.q_proj = nn.Linear(2 * h, self.n_heads * d, bias=False)
        self.k_proj = nn.Linear(2 * h, self.n_kv * d, bias=False)
        self.v_proj = nn.Linear(2 * h, self.n_kv * d, bias=False)
        self.o_proj = nn.Linear(self.n_heads * d, h, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: Attend) -> torch.Tensor:
        b, t, _ = x.shape  # (B, T, 2H)
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nH, T, D)
        k = self.k_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)  # (B, nKV, T, D)
        v = self.v_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)  # (B, nKV, T, D)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)  # q's dtype, also under autocast (like HF)
        a = attend(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v)  # (B, nH, T, D)
        return self.o_proj(a.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))  # (B, T, H)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DraftLayer(nn.Module):
    """The one decoder layer ("midlayer") over cat(input_layernorm(embed), hidden_norm(g))."""

    def __init__(self, cfg):
        super().__init__()
        h, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.input_layernorm = RMSNorm(h, eps)
        self.hidden_norm = RMSNorm(h, eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.mlp = MLP(h, cfg.intermediate_size)

    def forward(self, embeds, hidden, cos, sin, attend: Attend) -> torch.Tensor:
        x = torch.cat([self.input_layernorm(embeds), self.hidden_norm(hidden)], dim=-1)  # (B, T, 2H)
        out = hidden + self.self_attn(x, cos, sin, attend)  # (B, T, H)
        return out + self.mlp(self.post_attention_layernorm(out))  # (B, T, H), pre-norm


class Eagle3Draft(nn.Module):
    """EAGLE-3 draft head; see the module docstring for the forward and the parameter layout."""

    def __init__(self, cfg):
        super().__init__()
        if cfg.num_attention_heads % cfg.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({cfg.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({cfg.num_key_value_heads})")
        if not 0 < cfg.draft_vocab_size <= cfg.vocab_size:
            raise ValueError(f"draft_vocab_size must be in 1..vocab_size={cfg.vocab_size}, "
                             f"got {cfg.draft_vocab_size}")
        self.cfg = cfg
        h, vd = cfg.hidden_size, cfg.draft_vocab_size
        self.embed_tokens = nn.Embedding(cfg.vocab_size, h)
        self.embed_tokens.weight.requires_grad_(False)
        # EAGLE-3.1: each aux state normalised on its own before fc (vLLM/SGLang `fc_norm`, eps rms_norm_eps)
        self.fc_norm = nn.ModuleList(RMSNorm(cfg.target_hidden_size, cfg.rms_norm_eps) for _ in range(3)) \
            if cfg.fc_norm else None
        self.fc = nn.Linear(3 * cfg.target_hidden_size, h, bias=False)
        self.midlayer = DraftLayer(cfg)
        self.norm = RMSNorm(h, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(h, vd, bias=False)
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)  # raises on types it lacks
        self.register_buffer("d2t", torch.zeros(vd, dtype=torch.int64))  # identity map until set
        t2d = torch.zeros(cfg.vocab_size, dtype=torch.bool)
        t2d[:vd] = True
        self.register_buffer("t2d", t2d)

    @torch.no_grad()
    def init_from_target(self, weights: dict[str, torch.Tensor], d2t: torch.Tensor, t2d: torch.Tensor,
                         init_lm_head: bool = True) -> None:
        """Copy the target's embedding (frozen), set the vocab map, optionally start lm_head/norm from the target.

        `weights`: "embed_tokens.weight" [V, H], optionally "lm_head.weight" [V, H] (falls back to the
        embedding for tied targets) and "norm.weight" [H]. lm_head row i = target lm_head row d2t-mapped(i).
        """
        vd, v = self.cfg.draft_vocab_size, self.cfg.vocab_size
        if tuple(d2t.shape) != (vd,) or tuple(t2d.shape) != (v,):
            raise ValueError(f"vocab map shapes d2t {tuple(d2t.shape)}, t2d {tuple(t2d.shape)} do not match "
                             f"draft vocab {vd} / vocab {v}")
        embed = weights["embed_tokens.weight"]
        if tuple(embed.shape) != tuple(self.embed_tokens.weight.shape):
            raise ValueError(f"embed_tokens.weight has shape {tuple(embed.shape)}, expected "
                             f"{tuple(self.embed_tokens.weight.shape)}")
        self.embed_tokens.weight.copy_(embed)
        self.d2t.copy_(d2t)
        self.t2d.copy_(t2d)
        if init_lm_head:
            head = weights.get("lm_head.weight", embed)
            self.lm_head.weight.copy_(head[self.draft_to_target(torch.arange(vd, device=self.d2t.device))])
            if "norm.weight" in weights:
                self.norm.weight.copy_(weights["norm.weight"])

    def fuse(self, aux_hidden_states: torch.Tensor) -> torch.Tensor:
        if self.fc_norm is not None:  # the engines chunk the concatenation into the 3 aux states of width Ht
            chunks = aux_hidden_states.chunk(3, dim=-1)  # 3 x (.., Ht)
            aux_hidden_states = torch.cat([n(c) for n, c in zip(self.fc_norm, chunks)], dim=-1)
        return self.fc(aux_hidden_states)  # (.., 3*Ht) -> (.., H)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)  # (B, T) -> (B, T, H)

    def layer(self, embeds: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor,
              attend: Attend) -> torch.Tensor:
        """embeds, hidden (B, T, H); positions (B, T) RoPE positions -> pre-norm out (B, T, H)."""
        cos, sin = self.rope(positions)  # (B, 1, T, D) float32
        return self.midlayer(embeds, hidden, cos, sin, attend)

    def logits(self, out: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(out))  # (.., H) -> (.., Vd)

    def head(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (.., Vd), the hidden state the next draft step receives (.., H)) from the pre-norm out."""
        normed = self.norm(out)
        return self.lm_head(normed), (normed if self.cfg.norm_output else out)

    def draft_to_target(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return draft_ids + self.d2t[draft_ids]
