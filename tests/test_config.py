"""DraftConfig from real HF config dicts (Llama, Qwen3, legacy rope layout), the draft's RoPE choice (configs
written here and real ones from shared/real), validation, round trips, and load_target_dir on a target dir
written the way stage one writes it."""
from __future__ import annotations

import copy
import dataclasses
import json
import re

import pytest
import torch
from safetensors.torch import save_file

from eagle.config import DRAFT_ARCHS, DraftConfig, choose_draft_rope, default_aux_layer_ids, load_target_dir
from real_assets import real_path

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
    from stages.dump.forward import parse_aux_layers

    ids = parse_aux_layers(None, n)
    assert ids == list(default_aux_layer_ids(n))
    assert len(set(ids)) == 3 and ids == sorted(ids) and 0 <= ids[0] and ids[-1] <= n - 1
    if n >= 7:
        assert ids == [2, n // 2, n - 3]
    cfg = DraftConfig.from_target_config(llama_dict(num_hidden_layers=n), aux_layer_ids=ids)
    assert cfg.aux_layer_ids == tuple(ids)


@pytest.mark.parametrize("n", [1, 2])
def test_dump_default_aux_layers_refuse_fewer_than_three_layers(n):
    from stages.dump.forward import parse_aux_layers
    from stages.errors import StageError

    with pytest.raises(StageError, match=f"a target with {n} layer.s. has fewer than 3 distinct aux layers"):
        parse_aux_layers(None, n)


@pytest.mark.parametrize("rope, match", [
    ({"rope_type": "longrope", "factor": 4.0, "short_factor": [1.0], "long_factor": [2.0]}, "longrope switches"),
    ({"rope_type": "dynamic", "factor": 2.0}, "dynamic NTK"),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024, "mscale": 1.0,
      "mscale_all_dim": 1.0}, "mscale, mscale_all_dim"),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024, "attention_factor": 1.1},
     "attention_factor"),
    ({"rope_type": "yarn", "factor": 4.0}, r"missing \['original_max_position_embeddings'\]"),
    ({"rope_type": "linear"}, r"missing \['factor'\]"),
    ({"rope_type": "llama3", "factor": 8.0}, "missing"),
    ({"rope_type": "default", "partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5"),
])
def test_rope_the_draft_cannot_take_falls_back_to_plain(rope, match):
    """auto: plain RoPE with the target's theta and the reason; target: a ValueError; both config layouts."""
    legacy = legacy_llama_dict()
    legacy["rope_scaling"] = rope
    new_style = llama_dict()
    new_style["rope_parameters"] = {"rope_theta": 500000.0, **rope}
    for target in (legacy, new_style):
        cfg = DraftConfig.from_target_config(target)
        assert cfg.rope_theta == 500000.0 and cfg.rope_scaling is None
        reason = choose_draft_rope(target).reason
        assert reason.startswith("plain RoPE, rope_theta 500000") and re.search(match, reason)
        with pytest.raises(ValueError, match=match):
            DraftConfig.from_target_config(target, draft_rope="target")


def test_partial_rotary_target_gets_full_plain_rope():
    target = legacy_llama_dict()
    target["partial_rotary_factor"] = 0.5
    assert DraftConfig.from_target_config(target).rope_scaling is None
    assert "partial_rotary_factor=0.5" in choose_draft_rope(target).reason
    with pytest.raises(ValueError, match="partial_rotary_factor"):
        choose_draft_rope(target, "target")


YARN = {"rope_type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096, "beta_fast": 32.0,
        "beta_slow": 1.0, "truncate": False}


def test_yarn_the_engines_share_is_taken():
    from transformers import GptOssConfig

    target = GptOssConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                          head_dim=16, intermediate_size=64, vocab_size=300, rope_theta=150000.0,
                          rope_scaling=dict(YARN), max_position_embeddings=131072).to_dict()
    cfg = DraftConfig.from_target_config(target)
    assert cfg.rope_theta == 150000.0 and cfg.rope_scaling == YARN
    assert choose_draft_rope(target, "target").rope_scaling == YARN
    assert choose_draft_rope(target).reason.startswith("the target's RoPE: yarn, rope_theta 150000")
    plain = DraftConfig.from_target_config(target, draft_rope="default")
    assert plain.rope_theta == 150000.0 and plain.rope_scaling is None
    assert DraftConfig.from_dict(cfg.to_dict()) == cfg


def test_gemma3_per_layer_type_rope_takes_the_full_attention_entry():
    from transformers import Gemma3TextConfig

    target = Gemma3TextConfig(hidden_size=64, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=1,
                              head_dim=16, intermediate_size=64, vocab_size=300,
                              rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0,
                                                                  "rope_theta": 1_000_000.0},
                                               "sliding_attention": {"rope_type": "default",
                                                                     "rope_theta": 10_000.0}}).to_dict()
    assert set(target["rope_parameters"]) == {"full_attention", "sliding_attention"}
    cfg = DraftConfig.from_target_config(target)
    assert cfg.rope_theta == 1_000_000.0 and cfg.rope_scaling == {"rope_type": "linear", "factor": 8.0}
    assert "full_attention RoPE" in choose_draft_rope(target).reason
    only_sliding = dict(target, rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
    assert DraftConfig.from_target_config(only_sliding).rope_theta == 1e4


def test_draft_rope_mode_and_unservable_rope_scaling_refused():
    with pytest.raises(ValueError, match="draft_rope must be one of auto, target, default"):
        choose_draft_rope(llama_dict(), "yarn")
    fields = DraftConfig.from_target_config(llama_dict()).to_dict()
    fields["rope_scaling"] = dict(YARN, mscale=1.0, mscale_all_dim=1.0)
    with pytest.raises(ValueError, match="would not be served as trained"):
        DraftConfig.from_dict(fields)


# the draft RoPE chosen for real targets: (rope_type taken, rope_theta); None = plain RoPE
REAL_ROPE = {
    "gpt-oss-20b.json": ("yarn", 150000.0),
    "gpt-oss-120b.json": ("yarn", 150000.0),
    "DeepSeek-V3.json": (None, 10000.0),  # YaRN with mscale/mscale_all_dim: read differently by the engines
    "DeepSeek-R1.json": (None, 10000.0),
    "Kimi-K2-Instruct.json": (None, 50000.0),
    "Llama-4-Scout-17B-16E-Instruct.json": ("llama3", 500000.0),  # text_config, low == high freq factor
    "Llama-4-Maverick-17B-128E-Instruct.json": (None, 500000.0),
    "Llama-3.1-8B.json": ("llama3", 500000.0),
    "Qwen3-8B.json": (None, 1_000_000.0),
    "Mistral-7B-Instruct-v0.3.json": (None, 1_000_000.0),
    "mlc_preset/Phi-3.5-mini-instruct.json": (None, 10000.0),  # longrope
    "mlc_preset/Phi-4-mini-instruct.json": (None, 10000.0),  # longrope, partial rotary
    "mlc_preset/gemma-3-1b-it.json": (None, 1_000_000.0),  # the global layers' theta, not the sliding 10000
    "mlc_preset/gemma-2-2b.json": (None, 10000.0),
    "mlc_preset/DeepSeek-V2-Lite.json": (None, 10000.0),
}


@pytest.mark.parametrize("name", sorted(REAL_ROPE))
def test_draft_rope_for_real_target_configs(name):
    """Every real config gets a draft (never refused), as published, and as transformers 5 re-saves it."""
    from transformers import CONFIG_MAPPING

    raw = json.loads(real_path("configs", *name.split("/")).read_text())
    kind, theta = REAL_ROPE[name]
    text = raw.get("text_config", raw)
    layouts = [raw]
    if text["model_type"] in CONFIG_MAPPING:  # what dump-teacher writes: the config re-saved by transformers 5
        layouts.append(CONFIG_MAPPING[raw["model_type"]].from_dict(copy.deepcopy(raw)).to_dict())
    for target in layouts:
        rope = choose_draft_rope(target)
        assert rope.rope_theta == theta, rope.reason
        assert (rope.rope_scaling or {}).get("rope_type") == kind, rope.reason
        if kind == "yarn":
            assert rope.rope_scaling == {"rope_type": "yarn", **{k: v for k, v in text["rope_scaling"].items()
                                                                 if k != "rope_type"}}
        cfg = DraftConfig.from_target_config(target, aux_layer_ids=(0, 1, 2))
        assert (cfg.rope_theta, cfg.rope_scaling) == (rope.rope_theta, rope.rope_scaling)
        if kind is None and text.get("rope_scaling"):
            with pytest.raises(ValueError, match="draft_rope=target"):
                choose_draft_rope(target, "target")


@pytest.mark.parametrize("target, draft", [
    ("mlc_preset/gemma-3-1b-it.json", "gemma3-1b-eagle3.json"),
    ("DeepSeek-V3.json", "deepseek-v3-671b-eagle3.json"),
])
def test_draft_rope_agrees_with_published_drafts(target, draft):
    """Where a published EAGLE-3 draft exists for a target whose RoPE we do not take, it uses the same plain RoPE
    (a Llama config without rope keys means theta 10000, no scaling)."""
    rope = choose_draft_rope(json.loads(real_path("configs", *target.split("/")).read_text()))
    published = json.loads(real_path("configs", "drafts", "specforge", draft).read_text())
    assert (rope.rope_theta, rope.rope_scaling) == (published.get("rope_theta", 10000.0),
                                                   published.get("rope_scaling"))


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


def test_draft_arch_sets_the_two_switches_and_round_trips():
    plain = DraftConfig.from_target_config(llama_dict())
    v31 = DraftConfig.from_target_config(llama_dict(), draft_arch="eagle3.1")
    assert (plain.fc_norm, plain.norm_output, plain.draft_arch) == (False, False, "eagle3")
    assert (v31.fc_norm, v31.norm_output, v31.draft_arch) == (True, True, "eagle3.1")
    assert dataclasses.replace(v31, fc_norm=True, norm_output=False) != v31  # the switches are part of equality
    assert dataclasses.replace(plain, norm_output=True).draft_arch == "eagle3+norm_output"
    # EAGLE-3's dict is what it was before the switches existed; EAGLE-3.1's names them
    assert "fc_norm" not in plain.to_dict() and "norm_output" not in plain.to_dict()
    assert v31.to_dict() == plain.to_dict() | {"fc_norm": True, "norm_output": True}
    for cfg in (plain, v31, dataclasses.replace(plain, fc_norm=True)):
        assert DraftConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert set(DRAFT_ARCHS) == {"eagle3", "eagle3.1"}


def test_bad_draft_arch_or_switch_is_refused():
    with pytest.raises(ValueError, match=r"draft_arch must be one of eagle3, eagle3.1, got 'eagle3.2'"):
        DraftConfig.from_target_config(llama_dict(), draft_arch="eagle3.2")
    fields = DraftConfig.from_target_config(llama_dict()).to_dict()
    with pytest.raises(ValueError, match="fc_norm must be true or false, got 'yes'"):
        DraftConfig.from_dict(fields | {"fc_norm": "yes"})
