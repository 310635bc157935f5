"""Peer draft layouts written from an eagle-pipe draft: the directories Model-Optimizer 0.47 and speculators 0.9
export, and a plain LlamaForCausalLMEagle3 one, so tests can load (tests/test_draft_formats.py) and serve
(tests/test_eval_vllm.py) the same draft in every layout without any peer package.

The writers below follow the peers' own export code (read, not imported: no peer package is needed):
  Model-Optimizer 0.47  modelopt/torch/export/plugins/hf_spec_export.py (EagleExporter: tensors without the
      `eagle_module.` prefix, LLAMA_EAGLE_SINGLE_LAYER names, d2t only for a reduced vocab, no t2d, no
      embed_tokens), hf_spec_configs.py (llama_eagle_template_config), speculative/plugins/hf_eagle.py (aux ids
      captured by forward hooks on layers[k], i.e. the output of layer k; default {1, N//2-1, N-4}) and
      speculative/config.py (eagle_export_rope_scaling, YaRN by default).
  speculators 0.9  speculators/models/eagle3/config.py (Eagle3SpeculatorConfig fields, transformer_layer_config
      serialised with to_diff_dict), speculators/config.py (speculators_config, speculators_version),
      speculators/model.py (DraftVocabMixin: embed_tokens, lm_head, d2t long, t2d bool only for a reduced vocab),
      speculators/models/eagle3/core.py (fc, layers.0.*, norm; aux ids in HF hidden_states numbering).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from eagle.export import export_draft

MODELOPT_YARN = {"rope_type": "yarn", "factor": 32.0, "original_max_position_embeddings": 2048}  # its default


def layer_tensors(model, prefix: str) -> dict[str, torch.Tensor]:
    """The draft's weights with the decoder layer under `prefix` (no embed_tokens, d2t, t2d)."""
    out = {}
    for name, t in model.state_dict().items():
        if name in ("embed_tokens.weight", "d2t", "t2d"):
            continue
        out[prefix + name[len("midlayer."):] if name.startswith("midlayer.") else name] = t.clone()
    return out


def write_speculators(model, out: Path, dtype=None, **config_changes) -> Path:
    """The directory speculators 0.9 saves for an Eagle3DraftModel (see the module docstring)."""
    from transformers import LlamaConfig

    cfg = model.cfg
    layer = LlamaConfig(hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
                        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
                        intermediate_size=cfg.intermediate_size, num_hidden_layers=1, rms_norm_eps=cfg.rms_norm_eps,
                        max_position_embeddings=cfg.max_position_embeddings, vocab_size=cfg.vocab_size,
                        rope_parameters={"rope_theta": cfg.rope_theta,
                                         **(cfg.rope_scaling or {"rope_type": "default"})})
    config = {
        "architectures": ["Eagle3Speculator"], "auto_map": {"": "eagle3.Eagle3SpeculatorConfig"},
        "speculators_model_type": "eagle3", "speculators_version": "0.9.0", "transformers_version": "5.25.0",
        "draft_vocab_size": cfg.draft_vocab_size, "norm_before_residual": False, "norm_before_fc": False,
        "fc_norm": cfg.fc_norm, "norm_output": cfg.norm_output, "embed_requires_grad": False, "tie_word_embeddings": False,
        "target_hidden_size": None if cfg.target_hidden_size == cfg.hidden_size else cfg.target_hidden_size,
        "eagle_aux_hidden_state_layer_ids": list(cfg.aux_layer_ids),  # HF hidden_states numbering
        "transformer_layer_config": layer.to_diff_dict(),
        "speculators_config": {"algorithm": "eagle3", "default_proposal_method": "greedy",
                               "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": 3,
                                                     "verifier_accept_k": 1, "accept_tolerance": 0.0}],
                               "verifier": {"name_or_path": "tiny-target", "architectures": ["LlamaForCausalLM"]}},
    }
    config.update(config_changes)
    tensors = layer_tensors(model, "layers.0.")
    tensors["embed_tokens.weight"] = model.embed_tokens.weight.detach().clone()
    if cfg.draft_vocab_size != cfg.vocab_size:
        tensors["d2t"], tensors["t2d"] = model.d2t.clone(), model.t2d.clone()
    return write_dir(out, config, tensors, dtype)


def write_modelopt(model, out: Path, dtype=None, rope_scaling="trained", **eagle_config_changes) -> Path:
    """The directory Model-Optimizer 0.47's export_hf_checkpoint writes (see the module docstring).

    rope_scaling "trained" is what it writes with eagle_export_rope_scaling={}; its default injects YaRN.
    """
    cfg = model.cfg
    assert cfg.target_hidden_size == cfg.hidden_size  # its fc reads len(ids) * hidden_size
    config = {
        "architectures": ["LlamaForCausalLMEagle3"], "bos_token_id": None, "eos_token_id": None,
        "hidden_act": "silu", "hidden_size": cfg.hidden_size, "initializer_range": 0.02,
        "intermediate_size": cfg.intermediate_size, "max_position_embeddings": cfg.max_position_embeddings,
        "model_type": "llama", "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads, "num_hidden_layers": 1, "pad_token_id": None,
        "rms_norm_eps": cfg.rms_norm_eps, "tie_word_embeddings": False, "torch_dtype": "float32",
        "transformers_version": "5.25.0", "use_cache": True, "vocab_size": cfg.vocab_size,
        "draft_vocab_size": cfg.draft_vocab_size,
        "rope_scaling": {"rope_type": "default", "rope_theta": cfg.rope_theta} if rope_scaling == "trained"
        else rope_scaling,
        "attention_bias": False, "attention_dropout": 0.0, "head_dim": cfg.head_dim, "mlp_bias": False,
        "pretraining_tp": 1, "rope_theta": cfg.rope_theta,
        "eagle_config": {
            "eagle_aux_hidden_state_layer_ids": [k - 1 for k in cfg.aux_layer_ids],  # output of layer k
            "use_aux_hidden_state": True, "use_input_layernorm_in_first_layer": True, "use_last_layernorm": True,
            "use_mtp_layernorm": False, "next_layer_regular": True, "parallel_draft_step": 1,
            "parallel_draft_heads_num_layers": 1, **eagle_config_changes,
        },
    }
    tensors = layer_tensors(model, "layers.0.")
    if cfg.draft_vocab_size < cfg.vocab_size:
        tensors["d2t"] = model.d2t.clone()
    return write_dir(out, config, tensors, dtype)


def write_llama_eagle3(model, out: Path) -> Path:
    """eagle-pipe's own export without its "eagle_pipe" block: a plain LlamaForCausalLMEagle3 directory."""
    export_draft(model, out)
    config = json.loads((out / "config.json").read_text())
    del config["eagle_pipe"]
    (out / "config.json").write_text(json.dumps(config))
    return out


def write_dir(out: Path, config: dict, tensors: dict, dtype=None) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    if dtype is not None:
        tensors = {k: t.to(dtype) if t.is_floating_point() else t for k, t in tensors.items()}
    save_file({k: t.contiguous() for k, t in tensors.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out
