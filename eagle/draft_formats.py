"""Read the EAGLE-3 drafts other trainers export, as the draft vLLM would serve, or refuse them in one line.

A draft directory holds config.json and model.safetensors (or model.safetensors.index.json + shards). Its format
is read from config.json (`detect_format`):
  eagle-pipe    eagle-pipe's own export (config.json has "eagle_pipe"); read by eagle/export.py `load_draft`.
  llama-eagle3  architectures ["LlamaForCausalLMEagle3"] or ["Eagle3LlamaForCausalLM"], a flat Llama config:
                what vLLM's and SGLang's llama_eagle3.py load (SpecForge writes it); also ["LlamaForCausalLM"]
                with a draft_vocab_size (EAGLE's own EAGLE-3 checkpoints, which vLLM's eagle3 method renames).
  modelopt      the same architecture with Model-Optimizer's eagle_config switches (use_last_layernorm, ...):
                nvidia-modelopt's export_hf_checkpoint (torch/export/plugins/hf_spec_export.py,
                hf_spec_configs.py).
  speculators   "speculators_model_type": "eagle3", the layer's Llama config nested in transformer_layer_config
                (speculators/models/eagle3/config.py), converted for vLLM by its speculators/algos.py.

Every format maps to eagle-pipe's `DraftConfig` and state dict (tensor names of eagle/model.py): the decoder
layer's `layers.0.` prefix becomes `midlayer.`; fc, norm, lm_head, d2t, t2d and embed_tokens keep their names.
A missing d2t means the identity map (draft vocab = target vocab); a missing t2d is derived from d2t; a draft's
own embed_tokens [V, H] is kept (vLLM keeps distinct draft embeddings), else the caller supplies the target's.
Absent Llama keys take transformers' LlamaConfig defaults, as the trainers and vLLM build that config.

Aux layer ids, in eagle-pipe's convention k = the residual stream entering target layer k (HF hidden_states[k]):
  top-level eagle_aux_hidden_state_layer_ids (llama-eagle3, speculators): that convention already (vLLM's
      runner reads it verbatim; speculators' default is [2, N//2, N-3], speculators/models/utils.py);
  eagle_config.eagle_aux_hidden_state_layer_ids (modelopt, SpecForge): the *output* of layer k (Model-Optimizer
      and SpecForge capture with forward hooks on layers[k], SGLang adds 1 when it reads them) -> k + 1;
  none: vLLM's and SGLang's default (2, N//2, N-3) for a target of N layers.
The ids are taken in ascending order, as both engines concatenate the captured layers.

Refused, in one line naming the key and its value: what the draft layer cannot run exactly (more than one layer,
biases, another activation, sliding-window attention, norm_before_residual, norm_before_fc, Model-Optimizer's
parallel draft heads / no final norm / MTP norm, quantized weights, a LoRA-adapted target), what the engines read
ambiguously (tie_word_embeddings, a null target_hidden_size, speculators configs without norm_before_residual or
draft_vocab_size, top-level and eagle_config ids that disagree), missing or unexpected tensors and wrong shapes.
EAGLE-3.1's `fc_norm` (SGLang: `use_aux_norm`) and `norm_output` are read into the DraftConfig switches of the
same names.

API:
    class DraftFormatError(ValueError)
    def detect_format(config: dict, where="config.json") -> str         # one of FORMATS
    def peer_draft_config(config: dict, target_config: dict, where="config.json") -> tuple[str, DraftConfig]
        # target_config: the target's config.json dict (its num_hidden_layers bounds and defaults the aux ids)
    def read_peer_draft(path, target_config: dict) -> tuple[str, DraftConfig, dict[str, Tensor]]
        # (format, config, state dict in eagle-pipe names, with embed_tokens.weight only if the draft has one)
    def weight_files(path) -> dict[str, Path]      # tensor name -> its safetensors file (single or sharded)
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from eagle.config import DraftConfig, export_tensor_shapes
from eagle.rope import engine_mismatch, normalise_rope_scaling

FORMATS = ("eagle-pipe", "llama-eagle3", "modelopt", "speculators")
LLAMA_EAGLE3_ARCHITECTURES = ("LlamaForCausalLMEagle3", "Eagle3LlamaForCausalLM")
# keys only Model-Optimizer's template writes into eagle_config (torch/export/plugins/hf_spec_configs.py)
MODELOPT_EAGLE_CONFIG_KEYS = ("use_input_layernorm_in_first_layer", "use_last_layernorm", "use_mtp_layernorm",
                              "next_layer_regular", "parallel_draft_step", "parallel_draft_heads_num_layers")
# transformers' LlamaConfig defaults for the keys read here: what vLLM and the trainers use when a key is absent
LLAMA_DEFAULTS = {"num_hidden_layers": 32, "hidden_act": "silu", "max_position_embeddings": 2048,
                  "rms_norm_eps": 1e-6, "rope_theta": 10000.0}
LAYER_PREFIXES = ("midlayer.", "layers.0.")  # vLLM's llama_eagle3.py renames midlayer. to layers.0.
# EAGLE-3.1 switches: a true value sets the DraftConfig field of the same name (fc_norm.{i}.weight tensors are
# then expected through export_tensor_shapes(cfg))
EAGLE31_SWITCHES = {"fc_norm": "per-aux RMSNorm before fc", "norm_output": "post-norm feedback to the next step"}
OPTIONAL_TENSORS = ("t2d", "embed_tokens.weight")  # d2t too when the draft vocab is the whole vocab


class DraftFormatError(ValueError):
    """A draft directory eagle-pipe cannot run exactly; the message is one line naming the file and key."""


def detect_format(config: dict, where: str = "config.json") -> str:
    """The exporter of a parsed draft config.json, from the keys each one writes."""
    if not isinstance(config, dict):
        raise DraftFormatError(f"{where}: expected a JSON object, got {type(config).__name__}")
    if "eagle_pipe" in config:
        return "eagle-pipe"
    if "speculators_model_type" in config:
        return "speculators"
    arch = config.get("architectures")
    if "target_vocab_size" in config:  # a research layout whose vocab_size is the draft's; vLLM reads neither
        raise _refusal(where, "target_vocab_size", config["target_vocab_size"],
                       "vocab_size is then the draft's vocabulary, which vLLM and eagle-pipe read as the target's")
    # EAGLE's own EAGLE-3 checkpoints say LlamaForCausalLM: vLLM's eagle3 method renames it Eagle3LlamaForCausalLM
    # (transformers_utils/configs/eagle.py); draft_vocab_size tells them from EAGLE-1/2 drafts
    eagle3_llama = arch == ["LlamaForCausalLM"] and "draft_vocab_size" in config
    if eagle3_llama or isinstance(arch, list) and len(arch) == 1 and arch[0] in LLAMA_EAGLE3_ARCHITECTURES:
        nested = config.get("eagle_config")
        if isinstance(nested, dict) and any(k in nested for k in MODELOPT_EAGLE_CONFIG_KEYS):
            return "modelopt"
        return "llama-eagle3"
    raise DraftFormatError(f"{where}: architectures={json.dumps(arch)}: not an EAGLE-3 draft eagle-pipe reads "
                           f"(expected {' or '.join(LLAMA_EAGLE3_ARCHITECTURES)}, LlamaForCausalLM with a "
                           "draft_vocab_size, a speculators eagle3 config or an eagle-pipe export; a LlamaForCausalLM "
                           "without draft_vocab_size is an EAGLE-1/2 draft)")


def peer_draft_config(config: dict, target_config: dict, where: str = "config.json") -> tuple[str, DraftConfig]:
    """(format, DraftConfig) of a llama-eagle3 / modelopt / speculators config.json, or DraftFormatError."""
    fmt = detect_format(config, where)
    if fmt == "eagle-pipe":
        raise DraftFormatError(f"{where}: already an eagle-pipe export, not another trainer's draft "
                               "(eagle.export.load_draft reads it)")
    if not isinstance(target_config, dict):
        raise DraftFormatError(f"{where}: reading a {fmt} draft needs the target's config.json (its layer count "
                               "decides the aux layer ids)")
    text = target_config.get("text_config") if "num_hidden_layers" not in target_config else target_config
    n_layers = text.get("num_hidden_layers") if isinstance(text, dict) else None
    if not isinstance(n_layers, int) or n_layers < 1:
        raise DraftFormatError(f"{where}: the target config has no num_hidden_layers")
    _refuse_if(config, where, "quantization_config", lambda v: v is not None,
               "a quantized draft; eagle-pipe runs float weights only")
    if fmt == "speculators":
        layer_key, layer = "transformer_layer_config.", config.get("transformer_layer_config")
        if not isinstance(layer, dict):
            raise _refusal(where, "transformer_layer_config", layer, "the speculators layer config must be a dict")
        fields = _speculators_fields(config, where)
    else:
        layer_key, layer = "", config
        fields = _llama_eagle3_fields(config, fmt, where)
    fields.update(_llama_layer_fields(layer, where, layer_key))
    fields["aux_layer_ids"] = _aux_layer_ids(*fields.pop("aux_source"), n_layers, where)
    fields["draft_vocab_size"] = fields["draft_vocab_size"] or fields["vocab_size"]
    fields["target_hidden_size"] = fields["target_hidden_size"] or fields["hidden_size"]
    fields.update(_eagle31_switches(config, where))
    try:
        return fmt, DraftConfig(num_target_layers=n_layers, **fields)
    except ValueError as e:
        raise DraftFormatError(f"{where}: {e}") from None


def read_peer_draft(path, target_config: dict) -> tuple[str, DraftConfig, dict[str, torch.Tensor]]:
    """Parse a peer draft directory: (format, DraftConfig, state dict in eagle-pipe's names)."""
    path = Path(path)
    cfg_path = path / "config.json"
    try:
        config = json.loads(cfg_path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"draft dir {path} lacks config.json (expected {cfg_path})") from None
    except json.JSONDecodeError as e:
        raise DraftFormatError(f"{cfg_path}: not valid JSON ({e})") from None
    for name in ("adapter_config.json", "adapter_model.safetensors"):  # Model-Optimizer's eagle_base_lora export
        if (path / name).exists():
            raise DraftFormatError(f"{path / name}: the draft was trained against a LoRA-adapted target; "
                                   "eval runs the plain target")
    fmt, cfg = peer_draft_config(config, target_config, str(cfg_path))
    return fmt, cfg, _read_tensors(path, cfg)


# --------------------------------------------------------------------------------------------- config fields


def _refusal(where: str, key: str, value, why: str) -> DraftFormatError:
    return DraftFormatError(f"{where}: {key}={json.dumps(value, default=str)}: {why}")


def _refuse_if(config: dict, where: str, key: str, bad, why: str, prefix: str = "") -> None:
    if key in config and bad(config[key]):
        raise _refusal(where, prefix + key, config[key], why)


def _llama_eagle3_fields(config: dict, fmt: str, where: str) -> dict:
    """Top-level and eagle_config keys of a llama-eagle3 / modelopt config (vLLM's and SGLang's llama_eagle3.py)."""
    nested = config.get("eagle_config")
    if nested is not None and not isinstance(nested, dict):
        raise _refusal(where, "eagle_config", nested, "must be a dict")
    nested = nested or {}
    _refuse_if(nested, where, "use_aux_hidden_state", lambda v: v is False,
               "an EAGLE-1/2 draft without fc over aux layers", "eagle_config.")
    if fmt == "modelopt":  # hf_eagle.py / modeling_eagle.py: what each switch changes in the draft
        _refuse_if(nested, where, "use_last_layernorm", lambda v: v is not True,
                   "no final norm before lm_head; the engines always apply one", "eagle_config.")
        _refuse_if(nested, where, "use_mtp_layernorm", lambda v: v not in (None, False),
                   "an MTP-style norm the draft layer does not have", "eagle_config.")
        _refuse_if(nested, where, "use_input_layernorm_in_first_layer", lambda v: v not in (None, True),
                   "a first layer without input_layernorm", "eagle_config.")
        _refuse_if(nested, where, "parallel_draft_step", lambda v: v not in (None, 1),
                   "parallel draft heads (EagleMedusa); eagle-pipe drafts one token per step", "eagle_config.")
    _refuse_if(config, where, "tie_word_embeddings", lambda v: v not in (None, False),
               "SGLang then aliases lm_head to embed_tokens, vLLM does not")
    _refuse_if(config, where, "target_hidden_size", lambda v: v is None,
               "vLLM and SGLang compute None * 3 for fc's width; write an int or omit it")
    top = config.get("eagle_aux_hidden_state_layer_ids") or None
    hooked = nested.get("eagle_aux_hidden_state_layer_ids") or None
    if top is not None and hooked is not None:
        top = _int_list(top, where, "eagle_aux_hidden_state_layer_ids")
        shifted = [k + 1 for k in _int_list(hooked, where, "eagle_config.eagle_aux_hidden_state_layer_ids")]
        if sorted(shifted) != sorted(top):
            raise _refusal(where, "eagle_aux_hidden_state_layer_ids", top,
                           f"disagrees with eagle_config.eagle_aux_hidden_state_layer_ids={hooked} + 1 (vLLM reads "
                           "the first, SGLang the second)")
    for key in ("norm_before_residual", "norm_before_fc"):
        _refuse_if(config, where, key, lambda v: v not in (None, False),
                   "a vLLM-only draft variant eagle-pipe's draft layer does not run")
    source = ("eagle_aux_hidden_state_layer_ids", top, 0) if top is not None else \
        ("eagle_config.eagle_aux_hidden_state_layer_ids", hooked, 1)  # layer-output ids: + 1
    return {"aux_source": source,
            "draft_vocab_size": _optional_int(config, "draft_vocab_size", where),  # null: vLLM uses vocab_size
            "target_hidden_size": _optional_int(config, "target_hidden_size", where)}


def _speculators_fields(config: dict, where: str) -> dict:
    """Top-level keys of a speculators eagle3 config (speculators/models/eagle3/config.py, vLLM's algos.py)."""
    _refuse_if(config, where, "speculators_model_type", lambda v: v != "eagle3",
               "not an EAGLE-3 speculator (eagle-pipe reads speculators_model_type eagle3)")
    if "norm_before_residual" not in config:
        raise DraftFormatError(f"{where}: no norm_before_residual: speculators reads its absence as false, vLLM's "
                               "speculators converter as true")
    _refuse_if(config, where, "norm_before_residual", lambda v: v is not False,
               "the residual would take the normed hidden state; eagle-pipe's draft layer adds the raw one")
    _refuse_if(config, where, "norm_before_fc", lambda v: v not in (None, False),
               "one RMSNorm over the concatenated aux states before fc, which eagle-pipe's draft does not have")
    if not isinstance(config.get("draft_vocab_size"), int):
        raise _refusal(where, "draft_vocab_size", config.get("draft_vocab_size"),
                       "must be an int (speculators defaults an absent one to 32000, vLLM to vocab_size)")
    ids = config.get("eagle_aux_hidden_state_layer_ids") or None  # null: speculators, vLLM use (2, N//2, N-3)
    return {"aux_source": ("eagle_aux_hidden_state_layer_ids", ids, 0),
            "draft_vocab_size": config["draft_vocab_size"],
            "target_hidden_size": _optional_int(config, "target_hidden_size", where)}


def _llama_layer_fields(c: dict, where: str, prefix: str) -> dict:
    """The draft layer's shape and RoPE from a Llama config dict (flat, or speculators' transformer_layer_config)."""
    if c.get("model_type") != "llama":
        raise _refusal(where, prefix + "model_type", c.get("model_type"),
                       "eagle-pipe reads Llama-config draft layers only (another config class changes the "
                       "defaults, and qwen3 adds q/k norms)")
    get = lambda key: c[key] if c.get(key) is not None else LLAMA_DEFAULTS[key]  # noqa: E731
    if get("num_hidden_layers") != 1:
        raise _refusal(where, prefix + "num_hidden_layers", c.get("num_hidden_layers"),
                       f"eagle-pipe's draft has exactly one layer (absent means {LLAMA_DEFAULTS['num_hidden_layers']})")
    _refuse_if(c, where, "hidden_act", lambda v: v not in (None, "silu"), "the draft's MLP is SwiGLU (silu)", prefix)
    for key in ("attention_bias", "mlp_bias", "bias", "qkv_bias"):
        _refuse_if(c, where, key, lambda v: v not in (None, False), "the draft layer has no biases", prefix)
    _refuse_if(c, where, "use_sliding_window", lambda v: v not in (None, False),
               "the draft attends over the whole context", prefix)
    _refuse_if(c, where, "layer_types", lambda v: v is not None and (not isinstance(v, list)
                                                                      or set(v) != {"full_attention"}),
               "the draft attends over the whole context", prefix)
    fields = {}
    for key in ("hidden_size", "num_attention_heads", "intermediate_size", "vocab_size"):
        if not isinstance(c.get(key), int):
            raise _refusal(where, prefix + key, c.get(key), "must be an int")
        fields[key] = c[key]
    fields["num_key_value_heads"] = c.get("num_key_value_heads") or c["num_attention_heads"]
    fields["head_dim"] = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    fields["rms_norm_eps"] = get("rms_norm_eps")
    fields["max_position_embeddings"] = get("max_position_embeddings")
    fields["rope_theta"], fields["rope_scaling"] = _layer_rope(c, where, prefix)
    return fields


def _layer_rope(c: dict, where: str, prefix: str) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from rope_parameters (transformers 5) or rope_theta + rope_scaling."""
    params = c.get("rope_parameters")
    key, scaling = ("rope_parameters", params) if isinstance(params, dict) and params else \
        ("rope_scaling", c.get("rope_scaling"))
    theta = c.get("rope_theta")
    inner = scaling.get("rope_theta") if isinstance(scaling, dict) else None
    if theta is not None and inner is not None and float(theta) != float(inner):
        raise _refusal(where, prefix + key, scaling, f"its rope_theta disagrees with rope_theta={theta}")
    theta = inner if inner is not None else theta if theta is not None else LLAMA_DEFAULTS["rope_theta"]
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or theta <= 0:
        raise _refusal(where, prefix + "rope_theta", theta, "must be a positive number")
    try:
        normal = normalise_rope_scaling(scaling)
        why = engine_mismatch(normal)
    except ValueError as e:
        why = str(e)
    if why:
        raise _refusal(where, prefix + key, scaling, why)
    return float(theta), normal


def _eagle31_switches(config: dict, where: str) -> dict:
    """DraftConfig overrides for EAGLE-3.1's switches (a non-boolean value is refused)."""
    values = {key: config.get(key) for key in EAGLE31_SWITCHES}
    if config.get("use_aux_norm") not in (None, False):  # SGLang's alias of fc_norm
        values["fc_norm"] = config["use_aux_norm"]
    overrides = {}
    for key, value in values.items():
        if value in (None, False):
            continue
        if value is not True:
            raise _refusal(where, key, value, "must be a boolean")
        overrides[key] = True
    return overrides


def _aux_layer_ids(key: str, value, shift: int, n_layers: int, where: str) -> tuple[int, int, int]:
    """eagle-pipe's aux ids (HF hidden_states numbering, ascending) from `value` in its key's numbering."""
    if value is None:
        key = f"eagle_aux_hidden_state_layer_ids (absent: the engines' default for {n_layers} target layers)"
        value, shift = [2, n_layers // 2, n_layers - 3], 0
    ids = [k + shift for k in _int_list(value, where, key)]
    if len(ids) != 3 or len(set(ids)) != 3:
        raise _refusal(where, key, value, "eagle-pipe's fc takes exactly 3 distinct aux layers")
    bad = [k for k in ids if not 0 <= k < n_layers]
    if bad:
        raise _refusal(where, key, value, f"HF hidden_states id(s) {bad} are outside the target's {n_layers} "
                                          "decoder layers")
    return tuple(sorted(ids))


def _int_list(value, where: str, key: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(k, int) and not isinstance(k, bool) for k in value):
        raise _refusal(where, key, value, "must be a list of ints")
    return value


def _optional_int(config: dict, key: str, where: str) -> int | None:
    value = config.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise _refusal(where, key, value, "must be a positive int")
    return value


# --------------------------------------------------------------------------------------------- tensors


def weight_files(path: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file: model.safetensors, or the shards of model.safetensors.index.json."""
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.is_file():
        with safe_open(str(single), framework="pt") as f:
            return {name: single for name in f.keys()}
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise DraftFormatError(f"{index}: no weight_map")
        return {name: path / file for name, file in weight_map.items()}
    raise FileNotFoundError(f"{path} lacks model.safetensors (expected {single} or {index})")


def _read_tensors(path: Path, cfg: DraftConfig) -> dict[str, torch.Tensor]:
    """The state dict in eagle-pipe names: every tensor the draft needs, nothing it cannot run."""
    files = weight_files(path)
    prefixes = {p for p in LAYER_PREFIXES if any(n.startswith(p) for n in files)}
    if len(prefixes) > 1:
        raise DraftFormatError(f"{path}: tensors use both {' and '.join(sorted(prefixes))} names")
    prefix = prefixes.pop() if prefixes else "midlayer."
    shapes = {**export_tensor_shapes(cfg), "embed_tokens.weight": ((cfg.vocab_size, cfg.hidden_size), "float")}
    theirs = {(prefix + name[len("midlayer."):] if name.startswith("midlayer.") else name): name for name in shapes}
    optional = set(OPTIONAL_TENSORS) | ({"d2t"} if cfg.draft_vocab_size == cfg.vocab_size else set())
    missing = sorted(p for p, ours in theirs.items() if p not in files and ours not in optional)
    unexpected = sorted(set(files) - set(theirs))
    if missing or unexpected:
        raise DraftFormatError(f"{path}: tensors do not match the draft layout: missing {missing}, unexpected "
                               f"{unexpected} (eagle-pipe runs one bias-free layer; see eagle/draft_formats.py)")
    tensors = {}
    for peer_name, ours in theirs.items():
        if peer_name not in files:
            continue
        with safe_open(str(files[peer_name]), framework="pt") as f:
            t = f.get_tensor(peer_name)
        shape, kind = shapes[ours]
        ok = {"float": t.dtype.is_floating_point, "int64": not t.dtype.is_floating_point and t.dtype != torch.bool,
              "bool": t.dtype == torch.bool or not t.dtype.is_floating_point}[kind]
        if tuple(t.shape) != shape or not ok:
            raise DraftFormatError(f"{files[peer_name]}: '{peer_name}' is {t.dtype} {list(t.shape)}, the draft "
                                   f"needs {kind} {list(shape)}")
        tensors[ours] = t.to(torch.int64) if kind == "int64" else t.to(torch.bool) if kind == "bool" else t
    vd, v = cfg.draft_vocab_size, cfg.vocab_size
    d2t = tensors.setdefault("d2t", torch.zeros(vd, dtype=torch.int64))
    target_ids = torch.arange(vd) + d2t
    if bool((target_ids < 0).any() | (target_ids >= v).any()) or target_ids.unique().numel() != vd:
        raise DraftFormatError(f"{path}: d2t maps draft ids outside the target vocab [0, {v}) or twice")
    derived = torch.zeros(v, dtype=torch.bool)
    derived[target_ids] = True
    if "t2d" in tensors and not torch.equal(tensors["t2d"], derived):
        raise DraftFormatError(f"{path}: t2d marks {int(tensors['t2d'].sum())} target ids, not the {vd} that d2t "
                               "maps to")
    tensors["t2d"] = derived
    return tensors
