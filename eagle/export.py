"""Export a draft in the serving layout vLLM and SGLang load as-is, and load it back.

Layout: docs/checkpoint-format.md. The directory holds
  config.json        a Llama config with architectures ["LlamaForCausalLMEagle3"], num_hidden_layers 1,
                     vocab_size V, draft_vocab_size Vd, an int target_hidden_size, explicit rope_theta and
                     rope_scaling, no bias flags, aux layer ids in both engines' conventions (top level: vLLM,
                     k = HF hidden_states[k]; eagle_config: SGLang, k - 1), and under "eagle_pipe" the exact
                     DraftConfig so `load_draft` rebuilds the same model. Norm variants: an EAGLE-3.1 draft
                     writes `fc_norm: true` and `norm_output: true` (the switches both engines run alike);
                     EAGLE-3 writes none; `norm_before_fc` / `norm_before_residual` (one engine only) never
  model.safetensors  metadata {"format": "pt"}; fc, [fc_norm.{0,1,2}.weight,] midlayer.*, norm, lm_head, d2t
                     int64, t2d bool; no `model.` prefix and no embed_tokens (the engines use the target's
                     embedding). vLLM prefixes every name but lm_head with `model.`, SGLang looks both ways:
                     `fc_norm.{i}.weight` is the name both map onto their `model.fc_norm[i]`
The directory is written under a temporary name and renamed into place, so a crash never leaves a half export.

API:

    def export_draft(model, out_dir, dtype=None) -> Path   # config.json + model.safetensors (metadata {"format": "pt"})
        # dtype: cast the float weights (e.g. torch.bfloat16 for serving); default keeps the model's dtype
    def load_draft(path, embed_weight: Tensor | None = None, device="cpu", target_config=None) -> Eagle3Draft
        # embed_weight: the target's embedding [V, H] (exports omit it; engines use the target's).
        # Without it the embedding is NaN, so a forward fails loudly instead of drafting garbage.
        # Also reads Model-Optimizer / speculators / llama-eagle3 exports (eagle/draft_formats.py), given the
        # target's config.json dict as target_config; model.draft_format names the format read.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from eagle.config import ARCH_SWITCHES, DraftConfig, export_tensor_shapes

ARCHITECTURE = "LlamaForCausalLMEagle3"
FORMAT_VERSION = 1
EXPORT_FILES = ("config.json", "model.safetensors")


def serving_config(cfg: DraftConfig, dtype: torch.dtype) -> dict:
    """The config.json dict both engines read (docs/checkpoint-format.md, "config.json")."""
    aux = [int(k) for k in cfg.aux_layer_ids]
    return {
        "architectures": [ARCHITECTURE],
        "model_type": "llama",
        "num_hidden_layers": 1,
        "hidden_size": cfg.hidden_size,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "intermediate_size": cfg.intermediate_size,
        "rms_norm_eps": cfg.rms_norm_eps,
        "hidden_act": "silu",
        "vocab_size": cfg.vocab_size,
        "draft_vocab_size": cfg.draft_vocab_size,
        "tie_word_embeddings": False,
        "target_hidden_size": int(cfg.target_hidden_size),
        "rope_theta": float(cfg.rope_theta),
        "rope_scaling": None if cfg.rope_scaling is None else dict(cfg.rope_scaling),
        "max_position_embeddings": cfg.max_position_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "eagle_aux_hidden_state_layer_ids": aux,                     # vLLM: HF hidden_states[k]
        "eagle_config": {
            "eagle_aux_hidden_state_layer_ids": [k - 1 for k in aux],  # SGLang adds +1
            "use_aux_hidden_state": True,
        },
        **{name: True for name in ARCH_SWITCHES if getattr(cfg, name)},  # EAGLE-3.1: fc_norm, norm_output
        "eagle_pipe": {"format_version": FORMAT_VERSION, "draft_config": cfg.to_dict()},
    }


def export_draft(model, out_dir, dtype: torch.dtype | None = None) -> Path:
    """Write config.json + model.safetensors for `model` (an Eagle3Draft) into out_dir, atomically."""
    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper: save the plain module's names
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = getattr(model.module, "_orig_mod", model.module)
    cfg: DraftConfig = model.cfg
    out_dir = Path(out_dir)
    _check_replaceable(out_dir)
    state = model.state_dict()
    expected = export_tensor_shapes(cfg)
    extra = sorted(set(state) - set(expected) - {"embed_tokens.weight"})
    if extra:
        raise ValueError(f"model has state the export layout does not know: {extra}")
    tensors = {}
    for name, (shape, kind) in expected.items():
        if name not in state:
            raise ValueError(f"model lacks '{name}' required by the export layout")
        t = state[name].detach().to("cpu")
        if tuple(t.shape) != shape:
            raise ValueError(f"'{name}' has shape {list(t.shape)}, the layout needs {list(shape)}")
        if kind == "float" and dtype is not None:
            t = t.to(dtype)
        elif kind == "int64":
            t = t.to(torch.int64)
        elif kind == "bool":
            t = t.to(torch.bool)
        tensors[name] = t.contiguous().clone()
    if _identity_vocab(cfg):
        del tensors["d2t"], tensors["t2d"]
    return write_export_dir(out_dir, tensors, serving_config(cfg, tensors["fc.weight"].dtype))


def write_export_dir(out_dir: Path, tensors: dict[str, torch.Tensor], config: dict) -> Path:
    """model.safetensors (metadata {"format": "pt"}) + config.json into out_dir, atomically: written under a
    temporary name beside it, fsynced, then renamed into place, so a crash never leaves half an export. Every
    exporter (EAGLE-3 here, DFlash in eagle/dflash_export.py) writes through this one function."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        with open(tmp / "config.json", "w") as f:
            json.dump(config, f, indent=2)
            f.write("\n")
        for name in EXPORT_FILES:
            _fsync(tmp / name)
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _identity_vocab(cfg: DraftConfig) -> bool:
    """A draft over the whole vocabulary exports no d2t / t2d: vLLM (0.32) has no d2t parameter then and refuses
    a draft that ships one; the identity map is implied (d2t all zeros, eagle/vocab.py)."""
    return cfg.draft_vocab_size == cfg.vocab_size


def load_draft(path, embed_weight: torch.Tensor | None = None, device="cpu", target_config: dict | None = None):
    """Rebuild the exported Eagle3Draft (weights in their stored dtype), in eval mode, on `device`.

    Drafts other trainers export (eagle/draft_formats.py) are read too; they need `target_config`, the target's
    config.json dict. `model.draft_format` names the format read.
    """
    from eagle.draft_formats import detect_format, read_peer_draft
    from eagle.model import Eagle3Draft  # the model module imports the config, never this one

    path = Path(path)
    cfg_path, w_path = path / "config.json", path / "model.safetensors"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"draft dir {path} lacks {cfg_path.name} (expected {cfg_path})")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path}: not valid JSON ({e})") from None
    peer = isinstance(config, dict) and "eagle_pipe" not in config
    fmt = detect_format(config, str(cfg_path)) if peer else "eagle-pipe"
    if fmt != "eagle-pipe":
        if target_config is None:
            raise ValueError(f"{cfg_path}: no 'eagle_pipe.draft_config' (not exported by eagle-pipe): reading a "
                             f"{fmt} draft needs the target's config (target_config)")
        _, cfg, tensors = read_peer_draft(path, target_config)
        return _build(Eagle3Draft(cfg), tensors, embed_weight, device, fmt)
    if not w_path.is_file():
        raise FileNotFoundError(f"draft dir {path} lacks {w_path.name} (expected {w_path})")
    meta = config.get("eagle_pipe") if isinstance(config, dict) else None
    if not isinstance(meta, dict) or not isinstance(meta.get("draft_config"), dict):
        raise ValueError(f"{cfg_path}: no 'eagle_pipe.draft_config' (not exported by eagle-pipe)")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{cfg_path}: eagle_pipe format_version {meta.get('format_version')!r}, "
                         f"this version reads {FORMAT_VERSION}")
    try:
        cfg = DraftConfig.from_dict(meta["draft_config"])
    except ValueError as e:
        raise ValueError(f"{cfg_path}: {e}") from None
    served = {"rope_theta": config.get("rope_theta"), "rope_scaling": config.get("rope_scaling")}
    trained = {"rope_theta": float(cfg.rope_theta), "rope_scaling": cfg.rope_scaling}
    if served != trained:  # the engines read the top-level fields: they must be what the draft was trained with
        raise ValueError(f"{cfg_path}: the engines' rope fields {served} differ from the trained draft's {trained}")
    for name in ARCH_SWITCHES:  # likewise the norm switches: the engines would run another architecture
        if bool(config.get(name, False)) != getattr(cfg, name):
            raise ValueError(f"{cfg_path}: the engines' {name}={config.get(name)!r} differs from the trained "
                             f"draft's {name}={getattr(cfg, name)} ({cfg.draft_arch})")

    expected = export_tensor_shapes(cfg)
    with safe_open(str(w_path), framework="pt") as f:
        names = set(f.keys())
        if _identity_vocab(cfg) and not names & {"d2t", "t2d"}:  # the whole vocab: the identity map is implied
            names |= {"d2t", "t2d"}
            implied = {"d2t": torch.zeros(cfg.draft_vocab_size, dtype=torch.int64),
                       "t2d": torch.ones(cfg.vocab_size, dtype=torch.bool)}
        else:
            implied = {}
        missing, unknown = sorted(set(expected) - names), sorted(names - set(expected))
        if missing or unknown:
            raise ValueError(f"{w_path}: tensors do not match the draft layout (missing {missing}, "
                             f"unknown {unknown})")
        tensors = {name: implied[name] if name in implied else f.get_tensor(name) for name in expected}
    for name, (shape, kind) in expected.items():
        t = tensors[name]
        ok_dtype = {"float": t.dtype.is_floating_point, "int64": t.dtype == torch.int64,
                    "bool": t.dtype == torch.bool}[kind]
        if tuple(t.shape) != shape or not ok_dtype:
            raise ValueError(f"{w_path}: '{name}' is {t.dtype} {list(t.shape)}, expected {kind} {list(shape)}")

    return _build(Eagle3Draft(cfg), tensors, embed_weight, device, fmt)


def _build(model, tensors: dict, embed_weight, device, fmt: str):
    """Load `tensors` into `model`; the draft's own embed_tokens, else the target's `embed_weight`, else NaN."""
    cfg = model.cfg
    float_dtype = tensors["fc.weight"].dtype
    if "embed_tokens.weight" in tensors:  # a draft that ships its own embedding runs with it, as vLLM does
        embed = tensors["embed_tokens.weight"]
    elif embed_weight is None:
        embed = torch.full((cfg.vocab_size, cfg.hidden_size), float("nan"), dtype=float_dtype)
    else:
        if tuple(embed_weight.shape) != (cfg.vocab_size, cfg.hidden_size):
            raise ValueError(f"embed_weight has shape {list(embed_weight.shape)}, the draft needs "
                             f"[{cfg.vocab_size}, {cfg.hidden_size}]")
        embed = embed_weight.detach().to("cpu").clone()
    tensors["embed_tokens.weight"] = embed
    model.load_state_dict(tensors, strict=True, assign=True)  # assign: keep the stored dtypes
    model.embed_tokens.weight.requires_grad_(False)
    model.draft_format = fmt
    return model.to(device).eval()


# --------------------------------------------------------------------------------------------- helpers


def _check_replaceable(out_dir: Path) -> None:
    """Refuse to replace a directory that holds anything but a previous export."""
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise ValueError(f"export target {out_dir} exists and is not a directory")
    if out_dir.is_dir():
        foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in EXPORT_FILES)
        if foreign:
            raise ValueError(f"export target {out_dir} holds other files {foreign[:5]}; "
                             "refusing to replace it (choose an empty or new directory)")


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    """Move tmp into place; an existing export is renamed aside first and removed after."""
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.rename(out_dir, old)
    os.rename(tmp, out_dir)
    _fsync(out_dir.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
