"""Rotary position embedding (RoPE) with Hugging Face semantics, for the draft's one attention layer.

The draft must rotate queries and keys exactly as the serving engines do for the RoPE written in its exported
config.json, so this follows transformers' Llama implementation: inverse frequencies theta**(-2i/d),
`rotate_half` (the two halves of the head dim are the pairs, not interleaved), cos/sin in float32 and scaled
by the RoPE's attention factor (YaRN's mscale; 1 for the others).

`rope_scaling` types the draft computes (the legacy key "type" is read too): "default" / None, "linear",
"llama3" and "yarn" (transformers' `_compute_yarn_parameters`: factor, original_max_position_embeddings,
beta_fast / beta_slow, truncate, and the attention factor from attention_factor or mscale / mscale_all_dim).
`engine_mismatch(scaling)` says why vLLM's and SGLang's `get_rope` would rotate a `LlamaForCausalLMEagle3`
draft differently from this code for a given dict (None when they agree): which RoPE a draft takes is decided
with it (eagle/config.py `choose_draft_rope`). Other types (dynamic, longrope, ...) raise a ValueError.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
# keys each scaling needs besides rope_type (what vLLM / SGLang / HF read)
REQUIRED_KEYS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("factor", "original_max_position_embeddings"),
}
# YaRN keys that transformers, every vLLM release with YaRN and SGLang read the same way
YARN_PORTABLE_KEYS = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "truncate")
# YaRN keys read differently: vLLM's get_rope passed only attn_factor/extrapolation_factor for years (mscale,
# mscale_all_dim ignored), newer vLLM reads attention_factor/mscale/mscale_all_dim, SGLang attn_factor and
# mscale/mscale_all_dim but not attention_factor; transformers reads attention_factor/mscale/mscale_all_dim
YARN_ENGINE_SPECIFIC_KEYS = ("attention_factor", "mscale", "mscale_all_dim", "attn_factor", "extrapolation_factor",
                             "apply_yarn_scaling")


def rope_type_of(rope_scaling: dict | None) -> str:
    """The rope type named by an HF `rope_scaling` / `rope_parameters` dict ("default" when absent)."""
    if not rope_scaling:
        return "default"
    return rope_scaling.get("rope_type", rope_scaling.get("type", "default")) or "default"


def normalise_rope_scaling(scaling) -> dict | None:
    """None for plain RoPE; else a copy with "rope_type" set (no "type", no "rope_theta"), validated:
    a supported type with its required keys. Raises ValueError naming the problem."""
    if scaling is None:
        return None
    if not isinstance(scaling, dict):
        raise ValueError(f"rope_scaling must be a dict or null, got {scaling!r}")
    scaling = copy.deepcopy(scaling)
    scaling.pop("rope_theta", None)
    rope_type = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
    scaling.pop("type", None)
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"unsupported rope_type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    partial = scaling.get("partial_rotary_factor", 1.0)
    if partial not in (None, 1.0, 1):
        raise ValueError(f"partial_rotary_factor={partial} is not supported (the draft rotates the full head)")
    scaling.pop("partial_rotary_factor", None)
    if rope_type == "default":
        return None
    missing = [k for k in REQUIRED_KEYS[rope_type] if scaling.get(k) is None]
    if missing:
        raise ValueError(f"rope_scaling of type {rope_type!r} is missing {missing}")
    for key in REQUIRED_KEYS[rope_type]:
        _positive(scaling, key, rope_type)
    if rope_type == "llama3" and scaling["high_freq_factor"] < scaling["low_freq_factor"]:
        # equal factors (Llama-4) make the blend a hard step, as in transformers and the engines
        raise ValueError(f"llama3 rope_scaling needs high_freq_factor >= low_freq_factor, got "
                         f"{scaling['high_freq_factor']} < {scaling['low_freq_factor']}")
    if rope_type == "yarn":
        for key in ("beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim"):
            if scaling.get(key) is not None:
                _positive(scaling, key, rope_type)
        if "truncate" in scaling and not isinstance(scaling["truncate"], bool):
            raise ValueError(f"rope_scaling of type 'yarn' needs a boolean 'truncate', got {scaling['truncate']!r}")
    return {"rope_type": rope_type, **scaling}


def engine_mismatch(scaling: dict | None) -> str | None:
    """Why vLLM or SGLang would rotate a Llama-architecture draft with this rope_scaling differently from
    `RotaryEmbedding` (a short phrase), or None when all of them compute the same cos/sin."""
    kind = rope_type_of(scaling)
    partial = (scaling or {}).get("partial_rotary_factor", 1.0)
    if partial not in (None, 1.0, 1):
        return f"it rotates only part of each head (partial_rotary_factor={partial})"
    if kind not in SUPPORTED_ROPE_TYPES:
        return {
            "longrope": "longrope switches between short and long factors by sequence length in transformers "
                        "but by position in vLLM and SGLang",
            "dynamic": "dynamic NTK rescales only past max_position_embeddings in transformers, always in vLLM "
                       "and SGLang",
        }.get(kind, f"the draft does not implement rope_type {kind!r}")
    if kind == "yarn":
        specific = sorted(k for k in scaling if k in YARN_ENGINE_SPECIFIC_KEYS and scaling[k] is not None)
        if specific:
            return (f"its YaRN sets {', '.join(specific)}, which transformers, vLLM releases and SGLang read "
                    "differently")
        unknown = sorted(set(scaling) - set(YARN_PORTABLE_KEYS) - {"rope_type", "type", "rope_theta",
                                                                   "partial_rotary_factor"})
        if unknown:
            return f"its YaRN sets {', '.join(unknown)}, which not every engine reads"
    return None


def rope_inv_freq(head_dim: int, theta: float, rope_scaling: dict | None = None) -> torch.Tensor:
    """Inverse frequencies, float32 [head_dim // 2], as transformers' ROPE_INIT_FUNCTIONS compute them."""
    return _rope_init(head_dim, theta, rope_scaling)[0]


def rope_attention_factor(head_dim: int, theta: float, rope_scaling: dict | None = None) -> float:
    """The factor cos and sin are multiplied by (transformers' `attention_scaling`): YaRN's mscale, else 1."""
    return _rope_init(head_dim, theta, rope_scaling)[1]


def _rope_init(head_dim: int, theta: float, rope_scaling: dict | None) -> tuple[torch.Tensor, float]:
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    if not theta or theta <= 0:
        raise ValueError(f"rope_theta must be positive, got {theta!r}")
    kind = rope_type_of(rope_scaling)
    if kind not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"unsupported rope type {kind!r} (supported: {', '.join(SUPPORTED_ROPE_TYPES)}); the draft must "
            "rotate exactly like the serving engine, so other scalings are refused rather than approximated")
    scaling = normalise_rope_scaling(rope_scaling)
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if kind == "linear":
        return inv_freq / float(scaling["factor"]), 1.0
    if kind == "llama3":
        return _llama3_inv_freq(inv_freq, scaling), 1.0
    if kind == "yarn":
        return _yarn_inv_freq(head_dim, theta, scaling), _yarn_attention_factor(scaling)
    return inv_freq, 1.0


def _positive(rope_scaling: dict, key: str, kind: str) -> float:
    value = rope_scaling.get(key)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"rope_scaling of type {kind!r} needs a positive {key!r}, got {value!r}")
    return float(value)


def _llama3_inv_freq(inv_freq: torch.Tensor, rs: dict) -> torch.Tensor:
    """Llama-3.1 frequency scaling: long wavelengths / factor, short kept, a smooth blend in between."""
    factor, low, high, old_len = (float(rs[k]) for k in REQUIRED_KEYS["llama3"])
    low_freq_wavelen = old_len / low
    high_freq_wavelen = old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    # equal factors (Llama-4): no blend band; smooth 0 as vLLM sets it (transformers would divide by zero)
    smooth = (old_len / wavelen - low) / (high - low) if high != low else torch.zeros_like(inv_freq)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn_inv_freq(dim: int, base: float, rs: dict) -> torch.Tensor:
    """YaRN (Peng et al. 2023): interpolate (divide by factor) the low frequencies, keep the high ones, blend
    linearly over the dims whose wavelength makes beta_fast..beta_slow rotations in the original context."""
    factor, old_len = float(rs["factor"]), rs["original_max_position_embeddings"]
    beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(old_len / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # prevents a division by zero, as transformers and the engines do
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).to(dtype=torch.float) / dim)
    extrapolation = 1 - ramp  # 1: keep the frequency, 0: interpolate it
    return (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation


def _yarn_attention_factor(rs: dict) -> float:
    """attention_factor if given, else get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim) when both
    are set, else 0.1 ln(factor) + 1 (1 for factor <= 1), as transformers computes it."""
    factor = float(rs["factor"])

    def get_mscale(scale: float, mscale: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    if rs.get("attention_factor") is not None:
        return float(rs["attention_factor"])
    if rs.get("mscale") and rs.get("mscale_all_dim"):
        return float(get_mscale(factor, rs["mscale"]) / get_mscale(factor, rs["mscale_all_dim"]))
    return get_mscale(factor)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for integer positions; `inv_freq` is a non-persistent buffer (never exported)."""

    def __init__(self, head_dim: int, theta: float, rope_scaling: dict | None = None):
        super().__init__()
        inv_freq, self.attention_scaling = _rope_init(head_dim, theta, rope_scaling)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions int [B, T] -> (cos, sin) each float32 [B, 1, T, head_dim] (broadcast over heads)."""
        freqs = positions[..., None].float() * self.inv_freq.float()  # (B, T, D/2), float32 like HF
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, D)
        return (emb.cos() * self.attention_scaling)[:, None], (emb.sin() * self.attention_scaling)[:, None]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, heads, T, D) rotated by position: x*cos + rotate_half(x)*sin."""
    return x * cos + rotate_half(x) * sin
