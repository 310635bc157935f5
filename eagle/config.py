"""Draft configuration, derived from the target's `config.json` (a plain dict) — no target model is loaded.

The draft layer works at the target's width H, copies its attention geometry and RMSNorm epsilon, and predicts
over a draft vocabulary of Vd <= V tokens. Its RoPE is the draft's own choice, written in the exported
config.json that vLLM and SGLang apply (`choose_draft_rope`): the target's RoPE when the draft reproduces it
exactly as the engines compute it (default, linear, llama3, and YaRN without engine-specific attention-factor
keys), else plain RoPE with the target's rope_theta. Both the transformers-5 layout (`rope_parameters`
{rope_theta, rope_type, ...}, or one such dict per layer type) and the older one (`rope_theta` + `rope_scaling`)
are read; rope_type "default" is normalised to `rope_scaling=None`. Every setting is validated when the config
is built, so a bad value fails with one clear ValueError before any tensor is allocated.

The architecture is EAGLE-3 or EAGLE-3.1, as two switches both engines read from config.json under the same
names (docs/checkpoint-format.md, "EAGLE-3.1 switches"): `fc_norm` (one RMSNorm per aux state
before fc) and `norm_output` (the next draft step receives norm(out), not out). `DRAFT_ARCHS` names the
combinations a user picks ("eagle3": both off; "eagle3.1": both on, the one 3.1 form vLLM and SGLang serve
alike). The switches are written by `to_dict` only when on, so an EAGLE-3 draft's dict, checkpoints and
exports are exactly what they were before the switches existed, and older ones read back as EAGLE-3.

API: `DraftConfig` (fields documented on the class), `DraftConfig.from_target_config(target_dict,
draft_vocab_size=32000, ttt_steps=7, aux_layer_ids=None, draft_rope="auto", draft_arch="eagle3", **overrides)`
(default aux ids (2, N//2, N-3), evenly spread for N < 7; draft vocab capped at V), `DraftConfig.draft_arch`
(the name of its switches), `choose_draft_rope(target_dict, mode)`,
`to_dict` / `from_dict`, `default_aux_layer_ids(n)`, and `load_target_dir(path)` which reads
OUT/target/config.json and weights.safetensors (embed_tokens, lm_head, norm), naming a missing file or field.
"""
from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from eagle.rope import engine_mismatch, normalise_rope_scaling, rope_type_of

DRAFT_ROPE_MODES = ("auto", "target", "default")
# user-facing architecture name -> the DraftConfig switches it sets (the engines' config.json keys)
DRAFT_ARCHS = {"eagle3": {"fc_norm": False, "norm_output": False},
               "eagle3.1": {"fc_norm": True, "norm_output": True}}
ARCH_SWITCHES = ("fc_norm", "norm_output")
TARGET_WEIGHTS = ("embed_tokens.weight", "lm_head.weight", "norm.weight")


@dataclass(frozen=True)
class DraftConfig:
    """Shape and hyper-parameters of one EAGLE-3 draft head (one decoder layer at the target's width)."""

    hidden_size: int
    """H: width of the draft layer, equal to the target's hidden size (the embedding is the target's)."""
    num_attention_heads: int
    """Query heads of the draft attention (the target's by default)."""
    num_key_value_heads: int
    """Key/value heads (grouped-query attention); divides num_attention_heads."""
    head_dim: int
    """Per-head width; q_proj maps 2*H -> num_attention_heads * head_dim."""
    intermediate_size: int
    """I: SwiGLU MLP width."""
    rms_norm_eps: float
    """Epsilon of every RMSNorm in the draft."""
    rope_theta: float
    """RoPE base frequency (the target's)."""
    rope_scaling: dict | None
    """HF rope_scaling dict with "rope_type" in ("linear", "llama3", "yarn") and its parameters, one the
    engines compute exactly like training (eagle.rope.engine_mismatch); None = plain RoPE."""
    max_position_embeddings: int
    """The target's context length (exported for the engines)."""
    vocab_size: int
    """V: the target vocabulary size."""
    draft_vocab_size: int
    """Vd <= V: the draft's lm_head width; d2t maps draft ids back to target ids."""
    target_hidden_size: int
    """Width of each aux hidden state of the target; fc maps 3 * this -> H."""
    num_target_layers: int
    """N: decoder layers of the target (bounds the aux layer ids)."""
    aux_layer_ids: tuple[int, int, int]
    """Three strictly ascending ids in [0, N-1]; k = residual stream entering layer k (HF hidden_states[k])."""
    ttt_steps: int = 7
    """K: draft steps unrolled by training-time test (>= 1)."""
    fc_norm: bool = False
    """EAGLE-3.1: one RMSNorm(target_hidden_size) per aux state (weights `fc_norm.{i}.weight`) before fc."""
    norm_output: bool = False
    """EAGLE-3.1: the next draft step receives norm(out) instead of the pre-norm out (logits always norm(out))."""

    @property
    def draft_arch(self) -> str:
        """The architecture's name: "eagle3", "eagle3.1", or "eagle3+<switches on>" for another combination."""
        switches = {k: getattr(self, k) for k in ARCH_SWITCHES}
        for name, arch in DRAFT_ARCHS.items():
            if arch == switches:
                return name
        return "eagle3+" + "+".join(k for k, on in switches.items() if on)

    def __post_init__(self):
        # Normalise containers so equality and to_dict round-trips are exact (JSON gives lists).
        object.__setattr__(self, "aux_layer_ids", _as_int_tuple(self.aux_layer_ids, "aux_layer_ids"))
        object.__setattr__(self, "rope_scaling", normalise_rope_scaling(self.rope_scaling))
        self._validate()

    def _validate(self) -> None:
        for name in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size",
                     "max_position_embeddings", "vocab_size", "target_hidden_size", "num_target_layers"):
            _require_positive_int(getattr(self, name), name)
        for name in ARCH_SWITCHES:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if not isinstance(self.ttt_steps, int) or isinstance(self.ttt_steps, bool) or self.ttt_steps < 1:
            raise ValueError(f"ttt_steps must be an integer >= 1, got {self.ttt_steps!r}")
        if (not isinstance(self.draft_vocab_size, int) or isinstance(self.draft_vocab_size, bool)
                or self.draft_vocab_size < 1):
            raise ValueError(f"draft_vocab_size must be an integer >= 1, got {self.draft_vocab_size!r}")
        if self.draft_vocab_size > self.vocab_size:
            raise ValueError(f"draft_vocab_size {self.draft_vocab_size} is larger than the target vocab_size "
                             f"{self.vocab_size}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")
        if not (isinstance(self.rms_norm_eps, (int, float)) and self.rms_norm_eps > 0):
            raise ValueError(f"rms_norm_eps must be a positive number, got {self.rms_norm_eps!r}")
        if not (isinstance(self.rope_theta, (int, float)) and self.rope_theta > 0):
            raise ValueError(f"rope_theta must be a positive number, got {self.rope_theta!r}")
        validate_aux_layer_ids(self.aux_layer_ids, self.num_target_layers)
        why = engine_mismatch(self.rope_scaling)
        if why:
            raise ValueError(f"rope_scaling {self.rope_scaling} would not be served as trained: {why}")

    @classmethod
    def from_target_config(cls, target: dict, *, draft_vocab_size: int = 32000, ttt_steps: int = 7,
                           aux_layer_ids=None, draft_rope: str = "auto", draft_arch: str = "eagle3",
                           **overrides) -> "DraftConfig":
        """Derive the draft config from the target's config.json dict.

        draft_vocab_size is capped at the target vocab V; draft_rope picks the RoPE (`choose_draft_rope`);
        draft_arch ("eagle3" or "eagle3.1", DRAFT_ARCHS) sets fc_norm and norm_output.
        `overrides` replace any derived field by name (e.g. intermediate_size=...); unknown names raise ValueError.
        """
        if not isinstance(target, dict):
            raise ValueError(f"target config must be a dict (parsed config.json), got {type(target).__name__}")
        if "hidden_size" not in target and isinstance(target.get("text_config"), dict):
            target = target["text_config"]  # multimodal wrappers keep the language model's config here
        hidden = _field(target, "hidden_size")
        heads = _field(target, "num_attention_heads")
        num_layers = _field(target, "num_hidden_layers")
        vocab = _field(target, "vocab_size")
        _require_positive_int(hidden, "hidden_size")
        _require_positive_int(heads, "num_attention_heads")
        _require_positive_int(num_layers, "num_hidden_layers")
        _require_positive_int(vocab, "vocab_size")
        head_dim = target.get("head_dim")
        if head_dim is None:
            if hidden % heads:
                raise ValueError(f"target config has no head_dim and hidden_size {hidden} is not divisible by "
                                 f"num_attention_heads {heads}")
            head_dim = hidden // heads
        rope = choose_draft_rope(target, draft_rope)
        if draft_arch not in DRAFT_ARCHS:
            raise ValueError(f"draft_arch must be one of {', '.join(DRAFT_ARCHS)}, got {draft_arch!r}")
        if not isinstance(draft_vocab_size, int) or isinstance(draft_vocab_size, bool) or draft_vocab_size < 1:
            raise ValueError(f"draft_vocab_size must be an integer >= 1, got {draft_vocab_size!r}")
        fields = dict(
            hidden_size=hidden,
            num_attention_heads=heads,
            num_key_value_heads=target.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            intermediate_size=_field(target, "intermediate_size"),
            rms_norm_eps=_field(target, "rms_norm_eps"),
            rope_theta=rope.rope_theta,
            rope_scaling=rope.rope_scaling,
            max_position_embeddings=_field(target, "max_position_embeddings"),
            vocab_size=vocab,
            draft_vocab_size=min(draft_vocab_size, vocab),
            target_hidden_size=hidden,
            num_target_layers=num_layers,
            aux_layer_ids=default_aux_layer_ids(num_layers) if aux_layer_ids is None else aux_layer_ids,
            ttt_steps=ttt_steps,
            **DRAFT_ARCHS[draft_arch],
        )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown DraftConfig override(s) {unknown}; known fields: {sorted(known)}")
        fields.update(overrides)
        return cls(**fields)

    def to_dict(self) -> dict:
        """JSON-ready dict (aux ids as a list, rope_scaling copied; the EAGLE-3.1 switches only when on)."""
        d = dataclasses.asdict(self)
        d["aux_layer_ids"] = list(self.aux_layer_ids)
        d["rope_scaling"] = copy.deepcopy(self.rope_scaling)
        for name in ARCH_SWITCHES:
            if not d[name]:
                del d[name]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DraftConfig":
        """Inverse of to_dict; unknown or missing keys raise ValueError."""
        if not isinstance(d, dict):
            raise ValueError(f"DraftConfig.from_dict needs a dict, got {type(d).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(fields))
        if unknown:
            raise ValueError(f"unknown DraftConfig field(s) {unknown}")
        missing = [n for n, f in fields.items() if n not in d and f.default is dataclasses.MISSING]
        if missing:
            raise ValueError(f"DraftConfig dict is missing field(s) {missing}")
        return cls(**copy.deepcopy(d))


def export_tensor_shapes(cfg: DraftConfig) -> dict[str, tuple[tuple[int, ...], str]]:
    """Every tensor of the serving layout (eagle/export.py) -> (shape, kind), kind "float", "int64" or "bool" (the
    "Tensors" table of docs/checkpoint-format.md); eagle/draft_formats.py checks other trainers' files against the same table."""
    H, I, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    return {
        "fc.weight": ((H, 3 * cfg.target_hidden_size), "float"),
        **({f"fc_norm.{i}.weight": ((cfg.target_hidden_size,), "float") for i in range(3)} if cfg.fc_norm else {}),
        "midlayer.self_attn.q_proj.weight": ((q, 2 * H), "float"),
        "midlayer.self_attn.k_proj.weight": ((kv, 2 * H), "float"),
        "midlayer.self_attn.v_proj.weight": ((kv, 2 * H), "float"),
        "midlayer.self_attn.o_proj.weight": ((H, q), "float"),
        "midlayer.mlp.gate_proj.weight": ((I, H), "float"),
        "midlayer.mlp.up_proj.weight": ((I, H), "float"),
        "midlayer.mlp.down_proj.weight": ((H, I), "float"),
        "midlayer.input_layernorm.weight": ((H,), "float"),
        "midlayer.hidden_norm.weight": ((H,), "float"),
        "midlayer.post_attention_layernorm.weight": ((H,), "float"),
        "norm.weight": ((H,), "float"),
        "lm_head.weight": ((cfg.draft_vocab_size, H), "float"),
        "d2t": ((cfg.draft_vocab_size,), "int64"),
        "t2d": ((cfg.vocab_size,), "bool"),
    }


EAGLE3_AUX_LAYERS = 3  # EAGLE-3 / 3.1 fuse exactly three target layers (fc: [H, 3H])


def drafters_served(aux_layer_count: int) -> list[str]:
    """The `train --draft-arch` values a dump of this many aux layers trains (recorded in its manifest):
    EAGLE-3 / 3.1 fuse exactly three layers, DFlash any number (its fc is [H, n*H])."""
    return (["eagle3", "eagle3.1"] if aux_layer_count == EAGLE3_AUX_LAYERS else []) + ["dflash"]


def default_aux_layer_ids(num_layers: int) -> tuple[int, int, int]:
    """EAGLE-3's low/mid/high features: (2, N//2, N-3) for N >= 7; evenly spread ids for 3 <= N < 7."""
    _require_positive_int(num_layers, "num_hidden_layers")
    if num_layers >= 7:
        return (2, num_layers // 2, num_layers - 3)
    if num_layers >= 3:  # (2, N//2, N-3) is not strictly ascending for such shallow targets
        return (0 if num_layers == 3 else 1, num_layers // 2, num_layers - 1)
    raise ValueError(f"a target with {num_layers} layer(s) has fewer than 3 distinct aux layers in [0, N-1]")


def validate_aux_layer_ids(ids, num_layers: int) -> tuple[int, int, int]:
    """Three strictly ascending ints in [0, N-1], else ValueError naming the problem."""
    ids = _as_int_tuple(ids, "aux_layer_ids")
    if len(ids) != 3:
        raise ValueError(f"aux_layer_ids must hold exactly 3 layer ids, got {len(ids)}: {list(ids)}")
    for k in ids:
        if not 0 <= k <= num_layers - 1:
            raise ValueError(f"aux layer id {k} is outside the target's layers [0, {num_layers - 1}] "
                             f"(num_hidden_layers={num_layers}); got aux_layer_ids={list(ids)}")
    if not ids[0] < ids[1] < ids[2]:
        raise ValueError(f"aux_layer_ids must be strictly ascending, got {list(ids)}")
    return ids


def load_target_dir(path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read OUT/target/{config.json, weights.safetensors} written by stage one.

    Returns (config dict, {embed_tokens.weight [V, H], lm_head.weight [V, H], norm.weight [H]}).
    Raises FileNotFoundError naming a missing file, ValueError naming a missing field or tensor.
    """
    path = Path(path)
    cfg_path, w_path = path / "config.json", path / "weights.safetensors"
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise FileNotFoundError(f"target dir {path} lacks {p.name} (expected {p}); "
                                    "it is written by `eagle-pipe dump-teacher` into OUT/target/")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{cfg_path}: expected a JSON object, got {type(config).__name__}")
    text = config.get("text_config") if "hidden_size" not in config else config
    for name in ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size", "intermediate_size",
                 "rms_norm_eps", "max_position_embeddings"):
        if not isinstance(text, dict) or text.get(name) is None:
            raise ValueError(f"{cfg_path}: target config has no field '{name}' needed for the draft")
    weights = {}
    with safe_open(str(w_path), framework="pt") as f:
        keys = set(f.keys())
        for name in TARGET_WEIGHTS:
            if name not in keys:
                raise ValueError(f"{w_path}: missing tensor '{name}' (has {sorted(keys)})")
            weights[name] = f.get_tensor(name)
    V, H = text["vocab_size"], text["hidden_size"]
    expected = {"embed_tokens.weight": (V, H), "lm_head.weight": (V, H), "norm.weight": (H,)}
    for name, shape in expected.items():
        if tuple(weights[name].shape) != shape:
            raise ValueError(f"{w_path}: tensor '{name}' has shape {list(weights[name].shape)}, "
                             f"config.json implies {list(shape)}")
    return config, weights


# --------------------------------------------------------------------------------------------- helpers


def _field(target: dict, name: str):
    value = target.get(name)
    if value is None:
        raise ValueError(f"target config has no field '{name}' (needed to build the draft config)")
    return value


def _require_positive_int(value, name: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _as_int_tuple(ids, name: str) -> tuple[int, ...]:
    if isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):
        raise ValueError(f"{name} must be a sequence of 3 integers, got {ids!r}")
    ids = tuple(ids)
    if not all(isinstance(k, int) and not isinstance(k, bool) for k in ids):
        raise ValueError(f"{name} must hold integers, got {list(ids)}")
    return ids


def _target_rope(target: dict) -> tuple[float, dict | None, str]:
    """(rope_theta, raw rope_scaling, which of the target's RoPEs) from either `rope_parameters` (transformers 5;
    for per-layer-type dicts the full-attention entry) or rope_theta/rope_scaling (older layout)."""
    params, which = target.get("rope_parameters"), "RoPE"
    if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        # Gemma-3 style {full_attention: {...}, sliding_attention: {...}}: the draft attends over the whole
        # context, as the full-attention layers do (published Gemma-3 drafts use their rope_theta too)
        layer_type = "full_attention" if "full_attention" in params else sorted(params)[0]
        params, which = params[layer_type], f"{layer_type} RoPE (of {', '.join(sorted(params))})"
    if isinstance(params, dict) and params:
        theta = params.get("rope_theta", target.get("rope_theta"))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta, scaling = target.get("rope_theta"), target.get("rope_scaling")
        if "rope_local_base_freq" in target:  # Gemma-3 in the older layout: rope_theta is the global one
            which = "global-attention RoPE (rope_theta; its sliding layers use rope_local_base_freq)"
    if theta is None:
        raise ValueError("target config has no field 'rope_theta' (neither top level nor in rope_parameters)")
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or theta <= 0:
        raise ValueError(f"target rope_theta must be a positive number, got {theta!r}")
    partial = target.get("partial_rotary_factor")
    if partial not in (None, 1, 1.0) and (not isinstance(scaling, dict) or "partial_rotary_factor" not in scaling):
        scaling = {**(scaling if isinstance(scaling, dict) else {"rope_type": "default"}),
                   "partial_rotary_factor": partial}
    return float(theta), scaling, which


@dataclass(frozen=True)
class DraftRope:
    """The RoPE a draft trains and is served with, and a one-line reason for the choice."""

    rope_theta: float
    rope_scaling: dict | None
    reason: str


def choose_draft_rope(target: dict, mode: str = "auto") -> DraftRope:
    """The draft's RoPE from the target's config dict.

    mode "auto": the target's RoPE when the draft reproduces it exactly as vLLM and SGLang compute it for a
    LlamaForCausalLMEagle3 draft, else plain RoPE with the target's rope_theta (never refused). "target": the
    target's RoPE or a ValueError saying why it cannot be. "default": plain RoPE with the target's rope_theta.
    """
    if mode not in DRAFT_ROPE_MODES:
        raise ValueError(f"draft_rope must be one of {', '.join(DRAFT_ROPE_MODES)}, got {mode!r}")
    if "hidden_size" not in target and isinstance(target.get("text_config"), dict):
        target = target["text_config"]
    theta, raw, which = _target_rope(target)
    kind = rope_type_of(raw) if raw is None or isinstance(raw, dict) else f"{raw!r} (not a dict)"
    plain = f"plain RoPE, rope_theta {theta:g}"
    if mode == "default":
        return DraftRope(theta, None, f"{plain} (draft_rope=default; the target's {which} is {kind})")
    try:
        scaling = normalise_rope_scaling(raw)
        why = engine_mismatch(scaling)
    except ValueError as e:
        scaling, why = None, str(e)
    if why is None:
        detail = ", ".join(f"{k} {v}" for k, v in (scaling or {}).items() if k != "rope_type")
        return DraftRope(theta, scaling, f"the target's {which}: {kind}, rope_theta {theta:g}"
                                         f"{', ' + detail if detail else ''} (vLLM and SGLang compute it as "
                                         "training does)")
    # name the target's own problem (e.g. partial rotary) rather than a side effect of normalising it
    why = (engine_mismatch(raw) if isinstance(raw, dict) else None) or why
    if mode == "target":
        raise ValueError(f"draft_rope=target: the draft cannot take the target's {which} ({kind}): {why}; "
                         "use draft_rope auto or default")
    return DraftRope(theta, None, f"{plain} (the target's {which} is {kind}, not taken: {why})")
