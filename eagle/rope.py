"""Rotary position embedding (RoPE) with Hugging Face semantics, for the draft's one attention layer.

The draft must rotate queries and keys exactly as the serving engines do for the target's rope settings,
so this follows transformers' Llama implementation: inverse frequencies theta**(-2i/d), `rotate_half`
(the two halves of the head dim are the pairs, not interleaved), cos/sin computed in float32.
Supported `rope_scaling["rope_type"]` (or the legacy key "type"): "default" / None, "linear", "llama3".
Anything else (yarn, dynamic, longrope, ...) raises a ValueError when the model is built, because training
with a different rotation than the engine uses would silently produce a useless draft.
"""
from __future__ import annotations

import math

import torch
from torch import nn

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def rope_type_of(rope_scaling: dict | None) -> str:
    """The rope type named by an HF `rope_scaling` / `rope_parameters` dict ("default" when absent)."""
    if not rope_scaling:
        return "default"
    return rope_scaling.get("rope_type", rope_scaling.get("type", "default")) or "default"


def rope_inv_freq(head_dim: int, theta: float, rope_scaling: dict | None = None) -> torch.Tensor:
    """Inverse frequencies, float32 [head_dim // 2], as transformers' ROPE_INIT_FUNCTIONS compute them."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    if not theta or theta <= 0:
        raise ValueError(f"rope_theta must be positive, got {theta!r}")
    kind = rope_type_of(rope_scaling)
    if kind not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"unsupported rope type {kind!r} (supported: {', '.join(SUPPORTED_ROPE_TYPES)}); the draft must "
            "rotate exactly like the serving engine, so other scalings are refused rather than approximated")
    partial = (rope_scaling or {}).get("partial_rotary_factor", 1.0)
    if partial not in (None, 1.0, 1):
        raise ValueError(f"partial_rotary_factor={partial} is not supported (only full rotary)")
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if kind == "linear":
        factor = _positive(rope_scaling, "factor", kind)
        inv_freq = inv_freq / factor
    elif kind == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, rope_scaling)
    return inv_freq


def _positive(rope_scaling: dict, key: str, kind: str) -> float:
    value = rope_scaling.get(key)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"rope_scaling of type {kind!r} needs a positive {key!r}, got {value!r}")
    return float(value)


def _llama3_inv_freq(inv_freq: torch.Tensor, rs: dict) -> torch.Tensor:
    """Llama-3.1 frequency scaling: long wavelengths / factor, short kept, a smooth blend in between."""
    factor, low, high, old_len = (_positive(rs, key, "llama3") for key in LLAMA3_KEYS)
    if high <= low:
        raise ValueError(f"llama3 rope_scaling needs high_freq_factor > low_freq_factor, got {high} <= {low}")
    low_freq_wavelen = old_len / low
    high_freq_wavelen = old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for integer positions; `inv_freq` is a non-persistent buffer (never exported)."""

    def __init__(self, head_dim: int, theta: float, rope_scaling: dict | None = None):
        super().__init__()
        self.register_buffer("inv_freq", rope_inv_freq(head_dim, theta, rope_scaling), persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions int [B, T] -> (cos, sin) each float32 [B, 1, T, head_dim] (broadcast over heads)."""
        freqs = positions[..., None].float() * self.inv_freq.float()  # (B, T, D/2), float32 like HF
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, D)
        return emb.cos()[:, None], emb.sin()[:, None]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, heads, T, D) rotated by position: x*cos + rotate_half(x)*sin."""
    return x * cos + rotate_half(x) * sin
