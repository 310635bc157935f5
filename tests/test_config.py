"""DraftConfig from real HF config dicts (Llama, Qwen3, legacy rope layout), validation, round trips,
and load_target_dir on a target dir written the way stage one writes it."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from eagle.config import DraftConfig, default_aux_layer_ids, load_target_dir

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}


def llama_dict(**kw):
    from transformers import LlamaConfig

    args = dict(hidden_size=96, num_hidden_layers=10, num_attention_heads=6, num_key_value_heads=2,
                intermediate_size=160, vocab_size=700, rms_norm_eps=1e-5, max_position_embeddings=4096)
    args.update(kw)
    return LlamaConfig(**args).to_dict()


def legacy_llama_dict():
    """A config.json as transformers 4.x wrote it for Llama 3.1: rope_theta + rope_scaling."""
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 128,
            "num_hidden_layers": 16, "num_attention_heads": 8, "num_key_value_heads": 2, "intermediate_size": 256,
            "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "rope_scaling": dict(LLAMA3_ROPE),
            "max_position_embeddings": 131072, "vocab_size": 128256, "tie_word_embeddings": False}


def test_from_llama_config_dict():
    cfg = DraftConfig.from_target_config(llama_dict(), draft_vocab_size=300)
    assert cfg == DraftConfig(
        hidden_size=96, num_attention_heads=6, num_key_value_heads=2, head_dim=16, intermediate_size=160,
        rms_norm_eps=1e-5, rope_theta=10000.0, rope_scaling=None, max_position_embeddings=4096, vocab_size=700,
        draft_vocab_size=300, target_hidden_size=96, num_target_layers=10, aux_layer_ids=(2, 5, 7), ttt_steps=7)


def test_from_qwen3_config_dict_with_explicit_head_dim():
    from transformers import Qwen3Config

    target = Qwen3Config(hidden_size=64, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=32, intermediate_size=128, vocab_size=512, rope_theta=1_000_000.0,
                         max_position_embeddings=40960).to_dict()
    cfg = DraftConfig.from_target_config(target, ttt_steps=3)
    assert cfg.head_dim == 32 and cfg.num_attention_heads == 4 and cfg.num_key_value_heads == 2
    assert cfg.rope_theta == 1_000_000.0 and cfg.rope_scaling is None
    assert cfg.max_position_embeddings == 40960 and cfg.rms_norm_eps == target["rms_norm_eps"]
    assert cfg.draft_vocab_size == 512 == cfg.vocab_size  # default 32000 capped at V
    assert cfg.aux_layer_ids == (2, 4, 5) and cfg.ttt_steps == 3 and cfg.num_target_layers == 8


def test_transformers5_rope_parameters_llama3():
    target = llama_dict(max_position_embeddings=131072, rope_parameters={"rope_theta": 500000.0, **LLAMA3_ROPE})
    assert "rope_parameters" in target and "rope_scaling" not in target
    cfg = DraftConfig.from_target_config(target)
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling == LLAMA3_ROPE


@pytest.mark.parametrize("type_key", ["rope_type", "type"])
def test_legacy_rope_theta_and_rope_scaling(type_key):
    target = legacy_llama_dict()
    scaling = {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_type"}
    target["rope_scaling"] = {type_key: "llama3", **scaling}
    cfg = DraftConfig.from_target_config(target)
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling == LLAMA3_ROPE
    assert cfg.draft_vocab_size == 32000 and cfg.vocab_size == 128256 and cfg.head_dim == 16
    assert cfg.aux_layer_ids == (2, 8, 13)


def test_linear_and_default_rope_types():
    target = legacy_llama_dict()
    target["rope_scaling"] = {"rope_type": "linear", "factor": 2.0}
    assert DraftConfig.from_target_config(target).rope_scaling == {"rope_type": "linear", "factor": 2.0}
    target["rope_scaling"] = {"rope_type": "default"}
    assert DraftConfig.from_target_config(target).rope_scaling is None
    target.pop("rope_scaling")
    assert DraftConfig.from_target_config(target).rope_scaling is None


def test_text_config_of_multimodal_wrapper():
    wrapper = {"model_type": "mistral3", "text_config": llama_dict()}
    assert DraftConfig.from_target_config(wrapper) == DraftConfig.from_target_config(llama_dict())


def test_overrides_and_explicit_aux_ids():
    cfg = DraftConfig.from_target_config(llama_dict(), aux_layer_ids=[0, 4, 9], intermediate_size=64)
    assert cfg.aux_layer_ids == (0, 4, 9) and cfg.intermediate_size == 64
    with pytest.raises(ValueError, match="unknown DraftConfig override"):
        DraftConfig.from_target_config(llama_dict(), hidden_sise=3)


def test_to_dict_from_dict_round_trip_through_json():
    cfg = DraftConfig.from_target_config(legacy_llama_dict(), draft_vocab_size=1000, ttt_steps=5)
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["aux_layer_ids"] == [2, 8, 13]
    assert DraftConfig.from_dict(d) == cfg
    d["rope_scaling"]["factor"] = 99.0  # the dict handed out is a copy
    assert cfg.rope_scaling["factor"] == 8.0
    with pytest.raises(ValueError, match="unknown DraftConfig field"):
        DraftConfig.from_dict({**cfg.to_dict(), "extra": 1})
    incomplete = cfg.to_dict()
    incomplete.pop("head_dim")
    with pytest.raises(ValueError, match=r"missing field\(s\) \['head_dim'\]"):
        DraftConfig.from_dict(incomplete)


@pytest.mark.parametrize("n, expected", [(7, (2, 3, 4)), (8, (2, 4, 5)), (32, (2, 16, 29)), (80, (2, 40, 77)),
                                         (3, (0, 1, 2)), (4, (1, 2, 3)), (6, (1, 3, 5))])
def test_default_aux_layer_ids(n, expected):
    assert default_aux_layer_ids(n) == expected
    assert list(expected) == sorted(set(expected)) and 0 <= expected[0] and expected[-1] <= n - 1


@pytest.mark.parametrize("kwargs, match", [
    ({"ttt_steps": 0}, "ttt_steps must be an integer >= 1"),
    ({"ttt_steps": -2}, "ttt_steps must be an integer >= 1"),
    ({"ttt_steps": 2.0}, "ttt_steps must be an integer >= 1"),
    ({"draft_vocab_size": 0}, "draft_vocab_size must be an integer >= 1"),
    ({"aux_layer_ids": (2, 5)}, "exactly 3 layer ids"),
    ({"aux_layer_ids": (1, 2, 3, 4)}, "exactly 3 layer ids"),
    ({"aux_layer_ids": (2, 5, 10)}, r"aux layer id 10 is outside the target's layers \[0, 9\]"),
    ({"aux_layer_ids": (-1, 5, 8)}, r"aux layer id -1 is outside"),
    ({"aux_layer_ids": (5, 2, 8)}, "strictly ascending"),
    ({"aux_layer_ids": (2, 2, 8)}, "strictly ascending"),
    ({"aux_layer_ids": (2.0, 3, 8)}, "must hold integers"),
    ({"num_key_value_heads": 4}, "not a multiple of num_key_value_heads"),
])
def test_invalid_settings_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DraftConfig.from_target_config(llama_dict(), **kwargs)


def test_draft_vocab_larger_than_vocab_rejected_at_construction():
    cfg = DraftConfig.from_target_config(llama_dict(), draft_vocab_size=100)
    fields = {**cfg.to_dict(), "draft_vocab_size": 701}
    with pytest.raises(ValueError, match="draft_vocab_size 701 is larger than the target vocab_size 700"):
        DraftConfig(**fields)


def test_shallow_target_without_three_aux_layers():
    with pytest.raises(ValueError, match="fewer than 3 distinct aux layers"):
        DraftConfig.from_target_config(llama_dict(num_hidden_layers=2))


@pytest.mark.parametrize("n", [3, 4, 5, 6, 7, 8])
def test_dump_default_aux_layers_for_shallow_targets(n):
    """dump-teacher's default is the draft's: distinct ascending layers of the target, for every N >= 3."""
    from stages.dump_target import parse_aux_layers

    ids = parse_aux_layers(None, n)
    assert ids == list(default_aux_layer_ids(n))
    assert len(set(ids)) == 3 and ids == sorted(ids) and 0 <= ids[0] and ids[-1] <= n - 1
    if n >= 7:
        assert ids == [2, n // 2, n - 3]
    assert DraftConfig.from_target_config(llama_dict(num_hidden_layers=n), aux_layer_ids=ids).aux_layer_ids == tuple(ids)


@pytest.mark.parametrize("n", [1, 2])
def test_dump_default_aux_layers_refuse_fewer_than_three_layers(n):
    from stages.dump_target import parse_aux_layers
    from stages.errors import StageError

    with pytest.raises(StageError, match=f"a target with {n} layer.s. has fewer than 3 distinct aux layers"):
        parse_aux_layers(None, n)


@pytest.mark.parametrize("rope, match", [
    ({"rope_type": "yarn", "factor": 4.0}, "unsupported rope_type 'yarn'; supported: default, linear, llama3"),
    ({"rope_type": "dynamic", "factor": 2.0}, "unsupported rope_type 'dynamic'"),
    ({"rope_type": "linear"}, r"missing \['factor'\]"),
    ({"rope_type": "llama3", "factor": 8.0}, "missing"),
])
def test_unsupported_or_incomplete_rope(rope, match):
    target = legacy_llama_dict()
    target["rope_scaling"] = rope
    with pytest.raises(ValueError, match=match):
        DraftConfig.from_target_config(target)
    new_style = llama_dict()
    new_style["rope_parameters"] = {"rope_theta": 10000.0, **rope}
    with pytest.raises(ValueError, match=match):
        DraftConfig.from_target_config(new_style)


def test_partial_rotary_refused():
    target = legacy_llama_dict()
    target["partial_rotary_factor"] = 0.5
    with pytest.raises(ValueError, match="partial_rotary_factor"):
        DraftConfig.from_target_config(target)


@pytest.mark.parametrize("field", ["hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size",
                                   "intermediate_size", "rms_norm_eps", "max_position_embeddings", "rope_theta"])
def test_missing_required_field_named(field):
    target = legacy_llama_dict()
    target.pop(field)
    with pytest.raises(ValueError, match=f"'{field}'"):
        DraftConfig.from_target_config(target)


def test_missing_head_dim_with_indivisible_hidden():
    target = legacy_llama_dict()
    target["num_attention_heads"] = 3
    target["num_key_value_heads"] = 3
    with pytest.raises(ValueError, match="no head_dim"):
        DraftConfig.from_target_config(target)


# ------------------------------------------------------------------------------------------- target dir


def write_target_dir(root, model_dir):
    """What stage one writes into OUT/target/: config.json and the three tensors (lm_head even when tied)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text((model_dir / "config.json").read_text())
    weights = {"embed_tokens.weight": model.model.embed_tokens.weight.detach().clone(),
               "lm_head.weight": model.lm_head.weight.detach().clone(),
               "norm.weight": model.model.norm.weight.detach().clone()}
    save_file(weights, str(root / "weights.safetensors"))
    return weights


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen3"])
def test_load_target_dir_and_build_config(fixture, request, tmp_path):
    model_dir = request.getfixturevalue(fixture)
    written = write_target_dir(tmp_path / "target", model_dir)
    config, weights = load_target_dir(tmp_path / "target")
    assert config == json.loads((model_dir / "config.json").read_text())
    assert set(weights) == set(written)
    for name in written:
        assert torch.equal(weights[name], written[name])
    cfg = DraftConfig.from_target_config(config)
    assert cfg.hidden_size == 64 and cfg.num_target_layers == 8 and cfg.vocab_size == config["vocab_size"]
    assert cfg.aux_layer_ids == (2, 4, 5)


def test_load_target_dir_errors_name_what_is_missing(tiny_llama, tmp_path):
    root = tmp_path / "target"
    written = write_target_dir(root, tiny_llama)
    (root / "weights.safetensors").rename(tmp_path / "w.safetensors")
    with pytest.raises(FileNotFoundError, match="lacks weights.safetensors"):
        load_target_dir(root)
    (tmp_path / "w.safetensors").rename(root / "weights.safetensors")

    config_text = (root / "config.json").read_text()
    (root / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="lacks config.json"):
        load_target_dir(root)

    (root / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        load_target_dir(root)

    broken = json.loads(config_text)
    broken.pop("intermediate_size")
    (root / "config.json").write_text(json.dumps(broken))
    with pytest.raises(ValueError, match="no field 'intermediate_size'"):
        load_target_dir(root)
    (root / "config.json").write_text(config_text)

    save_file({k: v for k, v in written.items() if k != "lm_head.weight"}, str(root / "weights.safetensors"))
    with pytest.raises(ValueError, match="missing tensor 'lm_head.weight'"):
        load_target_dir(root)

    save_file({**written, "norm.weight": torch.ones(3)}, str(root / "weights.safetensors"))
    with pytest.raises(ValueError, match=r"'norm.weight' has shape \[3\], config.json implies \[64\]"):
        load_target_dir(root)
