"""Export a DFlash draft in the layout vLLM 0.32 loads as `DFlashDraftModel` (method "dflash"), and load it back.

    config.json        architectures ["DFlashDraftModel"], model_type "qwen3", the Qwen3 keys of the draft
                       (hidden_size = the target's, heads, head_dim, intermediate_size, rms_norm_eps, rope_theta /
                       rope_scaling and rope_parameters, max_position_embeddings, vocab_size, num_hidden_layers,
                       layer_types all "full_attention": vLLM runs those layers non-causally), block_size,
                       dflash_config {mask_token_id, target_layer_ids}, num_target_layers, target_hidden_size,
                       and under "eagle_pipe" the exact DFlashConfig. target_layer_ids = the dump's aux ids minus
                       one: vLLM adds 1 back (eagle3_utils.get_eagle3_aux_layers_from_config), so it captures the
                       residual entering layers k, as the dump did. No eagle_aux_hidden_state_layer_ids: vLLM would
                       read those first, without the +1.
    model.safetensors  metadata {"format": "pt"}: fc.weight [H, n*Ht], hidden_norm.weight, norm.weight and per layer
                       layers.N.self_attn.{q,k,v,o}_proj.weight, layers.N.self_attn.{q,k}_norm.weight [head_dim],
                       layers.N.mlp.{gate,up,down}_proj.weight, layers.N.{input,post_attention}_layernorm.weight.
                       No embedding, no lm_head: vLLM shares the target's (as training froze them).
  with a draft vocabulary (Vd < V): config.json adds draft_vocab_size Vd, and model.safetensors lm_head.weight
                       [Vd, H] (the target's rows of the draft ids, frozen in training) and d2t int64 [Vd]
                       (target_id = draft_id + d2t[draft_id]): vLLM's DFlashQwen3ForCausalLM builds its lm_head
                       with draft_vocab_size rows, keeps it (its own lm_head differs from the target's) and
                       scatters the logits to target ids through d2t. No t2d (vLLM skips it). Without a draft
                       vocabulary neither is written: vLLM then has no d2t parameter and refuses one.
vLLM drafts num_speculative_tokens tokens per round: serve with K = block_size - 1, the K it was trained for.
The directory is written under a temporary name and renamed into place (eagle/export.py write_export_dir).

API:
    def export_dflash(model, out_dir, dtype=None) -> Path
    def is_dflash_config(config: dict) -> bool
    def load_dflash(path, embed_weight, lm_head_weight=None, device="cpu") -> DFlashDraft  (draft_format "dflash")
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from eagle.dflash import DFlashConfig, DFlashDraft
from eagle.export import _check_replaceable, write_export_dir
from eagle.vocab import draft_to_target_ids

ARCHITECTURE = "DFlashDraftModel"
FORMAT_VERSION = 1


def serving_config(cfg: DFlashConfig, dtype: torch.dtype) -> dict:
    """The config.json dict vLLM reads (see the module docstring)."""
    scaling = dict(cfg.rope_scaling) if cfg.rope_scaling else None
    return {
        "architectures": [ARCHITECTURE],
        "model_type": "qwen3",
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "intermediate_size": cfg.intermediate_size,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": float(cfg.rope_theta),
        "rope_scaling": scaling,
        "rope_parameters": {"rope_theta": float(cfg.rope_theta), **(scaling or {"rope_type": "default"})},
        "max_position_embeddings": cfg.max_position_embeddings,
        "attention_bias": False,
        "vocab_size": cfg.vocab_size,
        **({} if cfg.draft_vocab_size is None else {"draft_vocab_size": cfg.draft_vocab_size}),
        "tie_word_embeddings": False,
        "layer_types": ["full_attention"] * cfg.num_hidden_layers,
        "block_size": cfg.block_size,
        "dflash_config": {"mask_token_id": cfg.mask_token_id,
                          "target_layer_ids": [k - 1 for k in cfg.aux_layer_ids]},
        "num_target_layers": cfg.num_target_layers,
        "target_hidden_size": cfg.target_hidden_size,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "eagle_pipe": {"format_version": FORMAT_VERSION, "draft_config": cfg.to_dict()},
    }


def tensor_shapes(cfg: DFlashConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of the export and its shape."""
    h, hd, i = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    shapes = {"fc.weight": (h, cfg.num_aux * cfg.target_hidden_size), "hidden_norm.weight": (h,),
              "norm.weight": (h,)}
    for n in range(cfg.num_hidden_layers):
        p = f"layers.{n}."
        shapes |= {p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                   p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
                   p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,),
                   p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                   p + "mlp.down_proj.weight": (h, i), p + "input_layernorm.weight": (h,),
                   p + "post_attention_layernorm.weight": (h,)}
    if cfg.draft_vocab_size is not None:
        shapes |= {"lm_head.weight": (cfg.draft_vocab_size, h), "d2t": (cfg.draft_vocab_size,)}
    return shapes


def export_dflash(model: DFlashDraft, out_dir, dtype: torch.dtype | None = None) -> Path:
    """config.json + model.safetensors of `model` into out_dir, atomically."""
    model = getattr(model, "_orig_mod", model)
    cfg, out_dir = model.cfg, Path(out_dir)
    _check_replaceable(out_dir)
    state, expected = model.state_dict(), tensor_shapes(cfg)
    if set(state) != set(expected):
        raise ValueError(f"model state {sorted(set(state) ^ set(expected))[:5]} differs from the export layout")
    tensors = {}
    for name, shape in expected.items():
        t = state[name].detach().to("cpu")
        if tuple(t.shape) != shape:
            raise ValueError(f"'{name}' has shape {list(t.shape)}, the layout needs {list(shape)}")
        if name == "d2t":
            t = t.to(torch.int64)
        elif dtype is not None:
            t = t.to(dtype)
        tensors[name] = t.contiguous().clone()
    return write_export_dir(out_dir, tensors, serving_config(cfg, tensors["fc.weight"].dtype))


def is_dflash_config(config) -> bool:
    return isinstance(config, dict) and ARCHITECTURE in (config.get("architectures") or [])


def load_dflash(path, embed_weight: torch.Tensor, lm_head_weight: torch.Tensor | None = None,
                device="cpu") -> DFlashDraft:
    """Rebuild an eagle-pipe DFlash export with the target's embedding and lm_head (None: tied to the embedding;
    a draft-vocabulary export uses its own lm_head.weight and d2t instead). The fields vLLM reads must be the
    ones the draft was trained with; anything else raises ValueError."""
    path = Path(path)
    cfg_path, w_path = path / "config.json", path / "model.safetensors"
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise FileNotFoundError(f"draft dir {path} lacks {p.name}")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path}: not valid JSON ({e})") from None
    meta = config.get("eagle_pipe") if isinstance(config, dict) else None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{cfg_path}: not a DFlash draft exported by eagle-pipe (no eagle_pipe.format_version "
                         f"{FORMAT_VERSION}); only eagle-pipe's own DFlash exports are read")
    cfg = DFlashConfig.from_dict(meta.get("draft_config"))
    served = {k: config.get(k) for k in ("block_size", "dflash_config", "rope_theta", "num_hidden_layers",
                                         "draft_vocab_size")}
    trained = {k: serving_config(cfg, torch.float32).get(k) for k in served}
    if served != trained:
        raise ValueError(f"{cfg_path}: the fields vLLM reads {served} differ from the trained draft's {trained}")
    expected = tensor_shapes(cfg)
    with safe_open(str(w_path), framework="pt") as f:
        names = set(f.keys())
        if names != set(expected):
            raise ValueError(f"{w_path}: tensors do not match the DFlash layout (missing "
                             f"{sorted(set(expected) - names)[:5]}, unknown {sorted(names - set(expected))[:5]})")
        tensors = {name: f.get_tensor(name) for name in expected}
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise ValueError(f"{w_path}: '{name}' has shape {list(tensors[name].shape)}, expected {list(shape)}")
    if "d2t" in tensors:
        ids = draft_to_target_ids(tensors["d2t"])
        if tensors["d2t"].dtype != torch.int64 or not bool(((ids >= 0) & (ids < cfg.vocab_size)).all()) \
                or ids.unique().numel() != ids.numel():
            raise ValueError(f"{w_path}: 'd2t' must be int64 offsets to distinct target ids in 0..{cfg.vocab_size - 1}")
    model = DFlashDraft(cfg)
    model.load_state_dict(tensors, strict=True)
    if cfg.draft_vocab_size is None:
        model.set_target_weights(embed_weight, lm_head_weight)
    else:
        model.set_embedding(embed_weight)
    model.draft_format = "dflash"
    return model.to(device).eval()
