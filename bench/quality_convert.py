"""Stopgap for bench/quality.py: a peer's EAGLE-3 export rewritten in eagle-pipe's export layout, the forward vLLM
runs for it kept exactly, so `eagle-pipe eval` can judge it before eval reads peers' exports itself.

Both peers export the vLLM `LlamaForCausalLMEagle3` tensors under `layers.0.*` (Model-Optimizer 0.47:
`export_speculative_decoding`; speculators 0.9: its checkpoint dir, plus `embed_tokens.weight`, which vLLM does
not use for EAGLE-3 either). This maps `layers.0.` -> `midlayer.`, keeps `fc`, `norm`, `lm_head`, `d2t`,
rebuilds `t2d` from `d2t`, and takes the draft's shapes, rms eps and RoPE (theta and scaling, e.g. the YaRN
Model-Optimizer injects at export) from the peer's config, as vLLM does. Switches the eagle-pipe forward cannot
run exactly are refused with the key named (speculators' `norm_before_residual`, `norm_before_fc`, `fc_norm`,
`norm_output`; more than one layer; attention windows shorter than the eval context are not checked here, the
peers' defaults (2048) exceed every eval prompt used by the bench).

Nothing here is used by eagle-pipe's own stages.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

REFUSED_SWITCHES = ("norm_before_residual", "norm_before_fc", "fc_norm", "norm_output")


def _layer_config(cfg: dict) -> tuple[dict, str]:
    if "transformer_layer_config" in cfg:   # speculators
        return cfg["transformer_layer_config"], "speculators"
    return cfg, "modelopt"


def _rope(layer: dict) -> tuple[float, dict | None]:
    params = layer.get("rope_parameters") or {}
    scaling = layer.get("rope_scaling")
    theta = layer.get("rope_theta") or params.get("rope_theta") or (scaling or {}).get("rope_theta")
    if scaling is None and params.get("rope_type", "default") != "default":
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    if scaling is not None:
        scaling = {k: v for k, v in scaling.items() if k != "rope_theta"}
        if scaling.get("rope_type", scaling.get("type")) == "default":
            scaling = None
    return float(theta), scaling


def convert_peer_export(peer_dir, target_dir, out_dir, aux_layer_ids, ttt_steps: int) -> dict:
    """Write OUT_DIR (eagle-pipe layout) from a peer export; returns what was read. Raises ValueError naming a
    switch that cannot be run exactly."""
    from safetensors.torch import load_file

    from eagle.config import DraftConfig, load_target_dir
    from eagle.export import export_draft
    from eagle.model import Eagle3Draft

    peer_dir, out_dir = Path(peer_dir), Path(out_dir)
    cfg = json.loads((peer_dir / "config.json").read_text())
    for key in REFUSED_SWITCHES:
        if cfg.get(key):
            raise ValueError(f"{peer_dir / 'config.json'}: '{key}: true' is not run by this forward")
    layer, kind = _layer_config(cfg)
    if int(layer.get("num_hidden_layers", 1)) != 1:
        raise ValueError(f"{peer_dir / 'config.json'}: num_hidden_layers {layer.get('num_hidden_layers')} != 1")
    target_cfg, weights = load_target_dir(Path(target_dir))
    theta, scaling = _rope(layer)
    heads = int(layer["num_attention_heads"])
    tensors = load_file(str(peer_dir / "model.safetensors"))
    d2t = tensors["d2t"].to(torch.int64)
    vocab = int(target_cfg["vocab_size"])
    dcfg = DraftConfig(
        hidden_size=int(layer["hidden_size"]), num_attention_heads=heads,
        num_key_value_heads=int(layer.get("num_key_value_heads", heads)),
        head_dim=int(layer.get("head_dim") or int(layer["hidden_size"]) // heads),
        intermediate_size=int(layer["intermediate_size"]), rms_norm_eps=float(layer["rms_norm_eps"]),
        rope_theta=theta, rope_scaling=scaling,
        max_position_embeddings=int(layer.get("max_position_embeddings") or target_cfg["max_position_embeddings"]),
        vocab_size=vocab, draft_vocab_size=int(d2t.numel()),
        target_hidden_size=int(target_cfg["hidden_size"]), num_target_layers=int(target_cfg["num_hidden_layers"]),
        aux_layer_ids=tuple(int(k) for k in aux_layer_ids), ttt_steps=int(ttt_steps),
    )
    state = {}
    for name, t in tensors.items():
        if name in ("embed_tokens.weight", "t2d"):
            continue
        state[name.replace("layers.0.", "midlayer.")] = t
    t2d = torch.zeros(vocab, dtype=torch.bool)
    t2d[torch.arange(d2t.numel()) + d2t] = True
    state["t2d"] = t2d
    state["embed_tokens.weight"] = weights["embed_tokens.weight"].to(state["fc.weight"].dtype)
    model = Eagle3Draft(dcfg)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise ValueError(f"{peer_dir}: tensors do not map onto the draft (missing {missing}, unknown {unexpected})")
    export_draft(model, out_dir)
    return {"kind": kind, "rope_theta": theta, "rope_scaling": scaling, "dtype": str(state["fc.weight"].dtype)}
