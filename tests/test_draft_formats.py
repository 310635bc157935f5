"""Peer draft formats (eagle/draft_formats.py): a random eagle-pipe draft written in Model-Optimizer's,
speculators' and the plain LlamaForCausalLMEagle3 layout loads back to the same draft (same config, same tensors,
the same TTT and chain-drafting logits as the in-memory original); `eagle-pipe eval` drafts the same tokens from
every layout; each switch eagle-pipe cannot run is refused in one line naming the key; the real peer configs in
shared/real parse or are refused with a stated reason.

Writers: tests/peer_layouts.py.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from draft_testing import engine_chain_logits, packed_batch, random_draft, tiny_cfg
from eagle.draft_formats import DraftFormatError, detect_format, peer_draft_config, read_peer_draft
from eagle.export import export_draft, load_draft
from eagle.ttt import ttt_forward
from peer_layouts import MODELOPT_YARN, write_llama_eagle3, write_modelopt, write_speculators

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TARGET = {"num_hidden_layers": 8, "vocab_size": 50, "hidden_size": 32}  # tiny_cfg's target (Ht = H here)


def edit(out: Path, change) -> Path:
    """Apply `change(config)` to out/config.json in place."""
    config = json.loads((out / "config.json").read_text())
    change(config)
    (out / "config.json").write_text(json.dumps(config))
    return out


def retensor(out: Path, change) -> Path:
    tensors = load_file(str(out / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(out / "model.safetensors"))
    return out


@pytest.fixture(scope="module")
def original():
    return random_draft(tiny_cfg(target_hidden_size=32), seed=11).eval()


WRITERS = {"speculators": write_speculators, "modelopt": write_modelopt, "llama-eagle3": write_llama_eagle3}


def assert_same_draft(loaded, model):
    assert dataclasses.replace(loaded.cfg, ttt_steps=model.cfg.ttt_steps) == model.cfg
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert set(ours) == set(theirs)
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    cfg = model.cfg
    batch = packed_batch(cfg, [9, 6, 11], T=28, rows=2, seed=4)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(ttt_forward(model, batch, 4, attention="dense"),
                                                    ttt_forward(loaded, batch, 4, attention="dense")))
    aux, ids = batch["aux_hidden_states"][:1, :9], batch["input_ids"][:1, :9]
    for n in (0, 4):
        chain = zip(engine_chain_logits(model, cfg, aux, ids, n, 4), engine_chain_logits(loaded, cfg, aux, ids, n, 4))
        assert all(torch.equal(a, b) for a, b in chain)


# ------------------------------------------------------------------------------------------------ exact loads
@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_each_peer_layout_loads_the_same_draft(fmt, original, tmp_path):
    out = WRITERS[fmt](original, tmp_path / fmt)
    assert detect_format(json.loads((out / "config.json").read_text())) == fmt
    loaded = load_draft(out, embed_weight=original.embed_tokens.weight.detach(), target_config=TARGET)
    assert loaded.draft_format == fmt
    assert_same_draft(loaded, original)


def test_eagle_repo_style_llama_for_causal_lm_with_a_draft_vocab_loads(original, tmp_path):
    """EAGLE's own EAGLE-3 checkpoints say LlamaForCausalLM (vLLM's eagle3 method renames the architecture)."""
    out = edit(write_llama_eagle3(original, tmp_path / "eagle"), _set("architectures", ["LlamaForCausalLM"]))
    loaded = load_draft(out, embed_weight=original.embed_tokens.weight.detach(), target_config=TARGET)
    assert loaded.draft_format == "llama-eagle3"
    assert_same_draft(loaded, original)
    edit(out, _set("draft_vocab_size", DELETE))  # then it is an EAGLE-1/2 draft
    with pytest.raises(DraftFormatError, match="without draft_vocab_size is an EAGLE-1/2 draft"):
        load_draft(out, target_config=TARGET)


def test_speculators_with_its_own_embedding_wider_target_and_llama3_rope(tmp_path):
    """target_hidden_size != hidden_size, rope_parameters with llama3 scaling, and the draft's own embed_tokens
    (not the target's) -- speculators ships it and vLLM keeps a draft embedding that differs."""
    rope = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16}
    model = random_draft(tiny_cfg(rope_theta=100.0, rope_scaling=rope), seed=12).eval()
    out = write_speculators(model, tmp_path / "spec")
    config = json.loads((out / "config.json").read_text())
    assert "rope_parameters" in config["transformer_layer_config"] and config["target_hidden_size"] == 24
    other_embed = torch.randn_like(model.embed_tokens.weight)
    loaded = load_draft(out, embed_weight=other_embed, target_config={**TARGET, "hidden_size": 24})
    assert torch.equal(loaded.embed_tokens.weight, model.embed_tokens.weight)
    assert_same_draft(loaded, model)


def test_the_comparison_sees_a_swapped_tensor(original, tmp_path):
    """Sensitivity: hidden_norm and input_layernorm have the same shape; swapping them changes the logits."""
    out = retensor(write_speculators(original, tmp_path / "swapped"), lambda t: t.update({
        "layers.0.input_layernorm.weight": t["layers.0.hidden_norm.weight"],
        "layers.0.hidden_norm.weight": t["layers.0.input_layernorm.weight"]}))
    with pytest.raises(AssertionError):
        assert_same_draft(load_draft(out, target_config=TARGET), original)


def test_aux_ids_follow_each_tools_convention(original, tmp_path):
    """Model-Optimizer's eagle_config ids are layer outputs (HF hidden_states k + 1); speculators' top-level ids
    are hidden_states indices; absent ids are the engines' (2, N//2, N-3)."""
    mo = json.loads((write_modelopt(original, tmp_path / "mo") / "config.json").read_text())
    assert mo["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [1, 3, 4]
    assert peer_draft_config(mo, TARGET)[1].aux_layer_ids == (2, 4, 5)
    spec = json.loads((write_speculators(original, tmp_path / "spec") / "config.json").read_text())
    assert peer_draft_config(spec, TARGET)[1].aux_layer_ids == (2, 4, 5)
    spec["eagle_aux_hidden_state_layer_ids"] = [5, 2, 4]  # both engines concatenate in layer order
    assert peer_draft_config(spec, TARGET)[1].aux_layer_ids == (2, 4, 5)
    spec["eagle_aux_hidden_state_layer_ids"] = None
    assert peer_draft_config(spec, {**TARGET, "num_hidden_layers": 32})[1].aux_layer_ids == (2, 16, 29)
    both = {**mo, "eagle_aux_hidden_state_layer_ids": [2, 4, 5]}  # eagle-pipe's own export writes both
    assert peer_draft_config(both, TARGET)[1].aux_layer_ids == (2, 4, 5)


def test_modelopt_default_export_is_served_with_the_yarn_it_writes(original, tmp_path):
    """Model-Optimizer trains with plain RoPE but by default exports YaRN (eagle_export_rope_scaling); eval runs
    what config.json says, as vLLM would, so the logits differ from the trained draft's."""
    out = write_modelopt(original, tmp_path / "mo_yarn", rope_scaling=MODELOPT_YARN)
    loaded = load_draft(out, embed_weight=original.embed_tokens.weight.detach(), target_config=TARGET)
    assert loaded.cfg.rope_scaling == MODELOPT_YARN
    batch = packed_batch(original.cfg, [12], T=12, seed=1)
    with torch.no_grad():
        assert not torch.equal(ttt_forward(original, batch, 2, attention="dense")[0],
                               ttt_forward(loaded, batch, 2, attention="dense")[0])


def test_vocab_maps_bf16_and_sharded_weights(original, tmp_path):
    # full vocabulary: no d2t/t2d anywhere, the identity map
    full = random_draft(tiny_cfg(target_hidden_size=32, draft_vocab_size=50), seed=3).eval()
    with torch.no_grad():
        full.d2t.zero_()
        full.t2d.fill_(True)
    out = write_modelopt(full, tmp_path / "full")
    assert "d2t" not in load_file(str(out / "model.safetensors"))
    assert_same_draft(load_draft(out, embed_weight=full.embed_tokens.weight.detach(), target_config=TARGET),
                      full)
    # bf16 weights load in their stored dtype
    out = write_speculators(original, tmp_path / "bf16", dtype=torch.bfloat16)
    loaded = load_draft(out, target_config=TARGET)
    assert loaded.fc.weight.dtype == torch.bfloat16
    assert torch.equal(loaded.lm_head.weight, original.lm_head.weight.bfloat16())
    assert loaded.d2t.dtype == torch.int64 and torch.equal(loaded.t2d, original.t2d)
    # weights split over shards with an index (what save_pretrained writes for large drafts)
    out = write_speculators(original, tmp_path / "sharded")
    tensors = load_file(str(out / "model.safetensors"))
    names = sorted(tensors)
    (out / "model.safetensors").unlink()
    weight_map = {}
    for i, part in enumerate((names[::2], names[1::2])):
        file = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, str(out / file))
        weight_map.update({n: file for n in part})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert_same_draft(load_draft(out, target_config=TARGET), original)


# ------------------------------------------------------------------------------------------------ refusals
def _set(path: str, value):
    def change(config):
        *parents, key = path.split(".")
        node = config
        for p in parents:
            node = node[p]
        if value is DELETE:
            del node[key]
        else:
            node[key] = value
    return change


DELETE = object()
CONFIG_REFUSALS = [  # (writer, config key path, bad value, what the message must say)
    ("speculators", "norm_before_residual", True, "norm_before_residual=true"),
    ("speculators", "norm_before_residual", DELETE, "no norm_before_residual"),
    ("speculators", "norm_before_fc", True, "norm_before_fc=true"),
    ("speculators", "speculators_model_type", "dflash", 'speculators_model_type="dflash"'),
    ("speculators", "draft_vocab_size", DELETE, "draft_vocab_size=null"),
    ("speculators", "eagle_aux_hidden_state_layer_ids", [1, 2, 4, 5], "eagle_aux_hidden_state_layer_ids=[1, 2, 4, 5]"),
    ("speculators", "eagle_aux_hidden_state_layer_ids", [2, 4, 8], "id(s) [8]"),
    ("speculators", "transformer_layer_config.model_type", "qwen3", 'transformer_layer_config.model_type="qwen3"'),
    ("speculators", "transformer_layer_config.num_hidden_layers", 2, "transformer_layer_config.num_hidden_layers=2"),
    ("speculators", "transformer_layer_config.attention_bias", True, "transformer_layer_config.attention_bias=true"),
    ("speculators", "transformer_layer_config.mlp_bias", True, "transformer_layer_config.mlp_bias=true"),
    ("speculators", "transformer_layer_config.hidden_act", "gelu", 'transformer_layer_config.hidden_act="gelu"'),
    ("speculators", "transformer_layer_config.layer_types", ["sliding_attention"],
     'layer_types=["sliding_attention"]'),
    ("speculators", "transformer_layer_config.rope_parameters", {"rope_type": "dynamic", "factor": 2.0},
     "transformer_layer_config.rope_parameters="),
    ("modelopt", "eagle_config.parallel_draft_step", 3, "eagle_config.parallel_draft_step=3"),
    ("modelopt", "eagle_config.use_last_layernorm", False, "eagle_config.use_last_layernorm=false"),
    ("modelopt", "eagle_config.use_mtp_layernorm", True, "eagle_config.use_mtp_layernorm=true"),
    ("modelopt", "eagle_config.use_aux_hidden_state", False, "eagle_config.use_aux_hidden_state=false"),
    ("modelopt", "eagle_config.use_input_layernorm_in_first_layer", False,
     "eagle_config.use_input_layernorm_in_first_layer=false"),
    ("modelopt", "quantization_config", {"quant_algo": "FP8"}, "quantization_config="),
    ("modelopt", "eagle_aux_hidden_state_layer_ids", [1, 3, 4], "disagrees with eagle_config"),
    ("llama-eagle3", "tie_word_embeddings", True, "tie_word_embeddings=true"),
    ("llama-eagle3", "target_hidden_size", None, "target_hidden_size=null"),
    ("llama-eagle3", "norm_before_residual", True, "norm_before_residual=true"),
    ("llama-eagle3", "model_type", "qwen2", 'model_type="qwen2"'),
    ("llama-eagle3", "architectures", ["MistralForCausalLM"], 'architectures=["MistralForCausalLM"]'),
    ("llama-eagle3", "target_vocab_size", 60, "target_vocab_size=60"),
    ("llama-eagle3", "num_hidden_layers", DELETE, "num_hidden_layers=null"),
]


@pytest.mark.parametrize("fmt,key,value,message", CONFIG_REFUSALS,
                         ids=[f"{f}:{k}={'absent' if v is DELETE else v}" for f, k, v, _ in CONFIG_REFUSALS])
def test_each_switch_it_cannot_run_is_refused_in_one_line(fmt, key, value, message, original, tmp_path):
    out = edit(WRITERS[fmt](original, tmp_path / "d"), _set(key, value))
    with pytest.raises(DraftFormatError) as info:
        load_draft(out, target_config=TARGET)
    text = str(info.value)
    assert message in text and "\n" not in text and str(out / "config.json") in text


TENSOR_REFUSALS = [  # (writer, change to the tensors, what the message must say)
    ("speculators", lambda t: t.pop("norm.weight"), "missing ['norm.weight']"),
    ("speculators", lambda t: t.update({"layers.0.self_attn.q_proj.bias": torch.zeros(16)}),
     "unexpected ['layers.0.self_attn.q_proj.bias']"),
    ("speculators", lambda t: t.update({"layers.1.mlp.up_proj.weight": torch.zeros(48, 32)}),
     "unexpected ['layers.1.mlp.up_proj.weight']"),
    ("speculators", lambda t: t.update({"input_norm.weight": torch.ones(96)}), "unexpected ['input_norm.weight']"),
    ("speculators", lambda t: t.update({"embed_tokens.weight": torch.zeros(49, 32)}),
     "'embed_tokens.weight' is torch.float32 [49, 32], the draft needs float [50, 32]"),
    ("speculators", lambda t: t.update({"midlayer.norm_x": torch.zeros(1)}), "both layers.0. and midlayer. names"),
    ("speculators", lambda t: t.update({"d2t": t["d2t"] + 100}), "d2t maps draft ids outside"),
    ("speculators", lambda t: t.update({"t2d": torch.ones(50, dtype=torch.bool)}), "t2d marks 50 target ids"),
    ("modelopt", lambda t: t.pop("d2t"), "missing ['d2t']"),
    ("modelopt", lambda t: t.update({"lm_head.weight": torch.zeros(50, 32)}), "'lm_head.weight' is torch.float32"),
]


@pytest.mark.parametrize("fmt,change,message", TENSOR_REFUSALS, ids=[m for _, _, m in TENSOR_REFUSALS])
def test_tensors_it_cannot_place_are_refused(fmt, change, message, original, tmp_path):
    out = retensor(WRITERS[fmt](original, tmp_path / "d"), change)
    with pytest.raises(DraftFormatError) as info:
        load_draft(out, target_config=TARGET)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_lora_co_trained_drafts_and_a_missing_target_config_are_refused(original, tmp_path):
    out = write_modelopt(original, tmp_path / "lora")
    (out / "adapter_config.json").write_text("{}")
    with pytest.raises(DraftFormatError, match="LoRA-adapted target"):
        load_draft(out, target_config=TARGET)
    out = write_speculators(original, tmp_path / "spec")
    with pytest.raises(ValueError, match="needs the target's config"):
        load_draft(out)
    with pytest.raises(DraftFormatError, match="id\\(s\\) \\[5\\] are outside the target's 5 decoder layers"):
        read_peer_draft(out, {"num_hidden_layers": 5})


@pytest.mark.parametrize("fmt", ["speculators", "llama-eagle3"])
def test_eagle31_drafts_load_exactly(fmt, tmp_path):
    """An EAGLE-3.1 draft (fc_norm + norm_output) in speculators' and the plain layout loads back to the same
    draft, fc_norm.{i} tensors and post-norm feedback included (TTT and chain-drafting logits equal)."""
    model = random_draft(tiny_cfg(target_hidden_size=32, fc_norm=True, norm_output=True), seed=13).eval()
    with torch.no_grad():
        for i in range(3):  # not the ones they start from, so a dropped fc_norm tensor would show
            model.fc_norm[i].weight.uniform_(0.5, 1.5)
    out = WRITERS[fmt](model, tmp_path / fmt)
    loaded = load_draft(out, embed_weight=model.embed_tokens.weight.detach(), target_config=TARGET)
    assert loaded.cfg.draft_arch == "eagle3.1"
    assert_same_draft(loaded, model)


def test_sglang_use_aux_norm_reads_as_fc_norm(tmp_path):
    """SGLang's alias for fc_norm (`use_aux_norm`) means the same switch."""
    model = random_draft(tiny_cfg(target_hidden_size=32, fc_norm=True), seed=14).eval()
    out = edit(write_llama_eagle3(model, tmp_path / "alias"), lambda c: c.update(use_aux_norm=c.pop("fc_norm")))
    loaded = load_draft(out, embed_weight=model.embed_tokens.weight.detach(), target_config=TARGET)
    assert loaded.cfg.fc_norm and not loaded.cfg.norm_output
    assert_same_draft(loaded, model)


# ------------------------------------------------------------------------------------------------ eagle-pipe eval
def test_eval_drafts_the_same_tokens_from_every_layout(tiny_llama, tmp_path, monkeypatch):
    """`eagle-pipe eval` on the tiny target: the same weights in eagle-pipe's, speculators' and
    Model-Optimizer's layout propose the same draft tokens every round, so acceptance and losslessness agree."""
    import stages.evaluate.speculative as spec
    from test_evaluate import PROMPT_RECORDS, make_random_draft, run_eval, write_jsonl

    own = make_random_draft(tiny_llama, tmp_path / "own", seed=5)
    model = load_draft(own)  # weights and config as exported; the target's embedding is added by eval
    embed = load_file(str(tiny_llama / "model.safetensors"))["model.embed_tokens.weight"]
    with torch.no_grad():
        model.embed_tokens.weight.copy_(embed)
    dirs = {"eagle-pipe": own, "speculators": write_speculators(model, tmp_path / "speculators"),
            "modelopt": write_modelopt(model, tmp_path / "modelopt"),
            # sensitivity: Model-Optimizer's layer-output ids read as hidden_states ids (off by one)
            "off-by-one": edit(write_modelopt(model, tmp_path / "off"),
                               _set("eagle_config.eagle_aux_hidden_state_layer_ids", list(model.cfg.aux_layer_ids)))}
    prompts = write_jsonl(tmp_path / "prompts.jsonl", PROMPT_RECORDS)
    real_verify, proposals, reports = spec.verify_draft, {}, {}

    def recording(rounds):
        def verify(logits, draft_ids):
            rounds.append(list(draft_ids))
            return real_verify(logits, draft_ids)
        return verify

    for fmt, path in dirs.items():
        monkeypatch.setattr(spec, "verify_draft", recording(proposals.setdefault(fmt, [])))
        code, output, reports[fmt] = run_eval("--target", tiny_llama, "--draft", path, "--data", prompts,
                                              "--max-new-tokens", 24, "--draft-tokens", 3, "--json")
        assert code == 0, output
        assert reports[fmt]["draft_format"] == fmt.replace("off-by-one", "modelopt") and reports[fmt]["lossless"]
    assert len(proposals["eagle-pipe"]) > 20
    assert proposals["speculators"] == proposals["eagle-pipe"] == proposals["modelopt"] != proposals["off-by-one"]
    for fmt in ("speculators", "modelopt"):
        for key in ("acceptance_length", "per_position_acceptance", "new_tokens", "mismatches"):
            assert reports[fmt][key] == reports["eagle-pipe"][key], (fmt, key)
        assert [r["accepted"] for r in reports[fmt]["per_prompt"]] == \
            [r["accepted"] for r in reports["eagle-pipe"]["per_prompt"]]
    code, output, _ = run_eval("--target", tiny_llama, "--draft", dirs["speculators"], "--data", prompts,
                               "--num-prompts", 1, "--max-new-tokens", 4)
    assert code == 0 and "draft format" in output and "speculators" in output
    edit(dirs["speculators"], _set("norm_before_residual", True))
    code, output, _ = run_eval("--target", tiny_llama, "--draft", dirs["speculators"], "--data", prompts)
    assert code == 2 and "norm_before_residual=true" in output and "Traceback" not in output


# ------------------------------------------------------------------------------------------------ real configs
REAL_OUTCOMES = {  # file -> None (parses) or the key the refusal names
    "speculators/nm-testing_EAGLE3-LLaMA3.1-Instruct-8B-converted_config.json": None,
    "speculators/issue1065_qwen3moe_eagle3_speculators_config.json": "norm_before_residual=true",
    "speculators_research/eagle3_llama3_8_B.json": "target_vocab_size=128256",
    "speculators_research/onlineEagle3_llama33_70b_head_k3.json": None,  # LlamaForCausalLM + draft_vocab_size
    "specforge/llama3-8B-eagle3.json": None,
    "specforge/llama3-70B-ealge3.json": None,
    "specforge/gpt-oss-20B-eagle3.json": None,
    "specforge/qwen3-235B-A22B-eagle3.json": None,
    "specforge/qwen3-30B-A3B-eagle3.1.json": None,  # EAGLE-3.1: fc_norm + norm_output
    "specforge/deepseek-v2-lite-eagle3.json": "rope_scaling=",
    "specforge/qwen2-5-vl-7b-eagle3.json": "rope_scaling=",
    "specforge/phi4-eagle3.json": 'model_type="phi3"',
    "specforge/qwq-32B-eagle3.json": 'model_type="qwen2"',
    "eagle/EAGLE-LLaMA3-Instruct-8B.json": "architectures=",  # EAGLE-1/2: no draft_vocab_size
    "eagle/vicuna_7B_config.json": "architectures=",
    "eagle/traineagle3_config.json": None,  # EAGLE's EAGLE-3 config: LlamaForCausalLM + draft_vocab_size
}


def export_peer(source: Path, out: Path, *target: Path):
    """`eagle-pipe export SOURCE OUT [--target T]` through the CLI."""
    from click.testing import CliRunner

    from stages.cli import main

    flags = [arg for t in target for arg in ("--target", str(t))]
    return CliRunner().invoke(main, ["export", str(source), str(out), *flags])


def fake_target(out: Path, embed: torch.Tensor) -> Path:
    """What `export --target` reads of a target: its config.json and its embedding."""
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(TARGET))
    save_file({"model.embed_tokens.weight": embed.detach().clone()}, str(out / "model.safetensors"))
    return out


@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_export_rewrites_a_peer_draft_in_eagle_pipes_layout(fmt, original, tmp_path):
    """The rewritten draft is the same draft (config, tensors, logits) in eagle-pipe's own layout, its aux ids
    stated in both engines' conventions."""
    target = fake_target(tmp_path / "target", original.embed_tokens.weight)
    result = export_peer(WRITERS[fmt](original, tmp_path / "peer"), tmp_path / "out", target)
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["eagle_aux_hidden_state_layer_ids"] == [2, 4, 5]
    assert config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [1, 3, 4]
    loaded = load_draft(tmp_path / "out", embed_weight=original.embed_tokens.weight.detach())
    assert loaded.draft_format == "eagle-pipe" and "embed_tokens.weight" not in load_file(
        str(tmp_path / "out" / "model.safetensors"))
    assert_same_draft(loaded, original)


def test_export_refuses_what_it_cannot_rewrite_in_one_line(original, tmp_path):
    """Nothing is written when it refuses: no --target, a draft with an embedding of its own that is not the
    target's, an eagle-pipe export, a draft eval refuses, --target with a training checkpoint."""
    target = fake_target(tmp_path / "target", original.embed_tokens.weight)
    other = fake_target(tmp_path / "other", torch.randn_like(original.embed_tokens.weight))
    spec = write_speculators(original, tmp_path / "spec")  # ships the embedding it was given
    cases = [
        (spec, (), "an exported draft, not a checkpoint; rewriting another trainer's draft needs --target"),
        (spec, (other,), "a speculators draft with its own embedding, not the target's"),
        (export_draft(original, tmp_path / "ours"), (target,), "already an eagle-pipe export"),
        (edit(write_modelopt(original, tmp_path / "biased"), _set("attention_bias", True)), (target,),
         "attention_bias"),
        (tmp_path, (target,), "a training checkpoint, whose meta.json holds the draft config; --target is for"),
    ]
    for source, targets, says in cases:
        out = tmp_path / f"out-{source.name}-{len(targets)}"
        result = export_peer(source, out, *targets)
        errors = [line for line in result.output.splitlines() if line.startswith("Error")]
        assert result.exit_code != 0 and len(errors) == 1 and says in errors[0], (says, result.output)
        assert not out.exists()
    assert export_peer(spec, tmp_path / "ok", target).exit_code == 0  # the same draft, the target's embedding
    bf16 = write_speculators(original, tmp_path / "bf16", dtype=torch.bfloat16)  # as speculators saves it
    assert export_peer(bf16, tmp_path / "ok-bf16", target).exit_code == 0


def test_real_peer_configs_parse_or_are_refused_with_a_reason():
    from real_assets import real_path

    root = real_path("configs", "drafts")
    files = sorted(p for sub in ("speculators", "speculators_research", "specforge", "eagle")
                   for p in (root / sub).glob("*.json"))
    assert len(files) >= len(REAL_OUTCOMES)
    parsed = {}
    for path in files:
        name = str(path.relative_to(root))
        config = json.loads(path.read_text())
        layer = config.get("transformer_layer_config", config)
        # a target the draft was made for: its vocab, its width, more layers than any id names
        target = {"num_hidden_layers": 96, "vocab_size": layer.get("vocab_size"),
                  "hidden_size": config.get("target_hidden_size") or layer.get("hidden_size")}
        try:
            fmt, cfg = peer_draft_config(config, target, name)
            parsed[name] = (fmt, cfg)
            outcome = None
        except DraftFormatError as e:
            text = str(e)
            assert text.startswith(f"{name}: ") and "=" in text and "\n" not in text, text
            outcome = text
        if name in REAL_OUTCOMES:
            expected = REAL_OUTCOMES[name]
            assert (outcome is None) if expected is None else (outcome is not None and expected in outcome), \
                (name, outcome)
    fmt, cfg = parsed["speculators/nm-testing_EAGLE3-LLaMA3.1-Instruct-8B-converted_config.json"]
    assert fmt == "speculators" and cfg.aux_layer_ids == (2, 48, 93) and cfg.draft_vocab_size == 32000
    assert (cfg.hidden_size, cfg.num_key_value_heads, cfg.vocab_size) == (4096, 8, 128256)
    fmt, cfg = parsed["specforge/gpt-oss-20B-eagle3.json"]  # eagle_config ids [1, 11, 21] are layer outputs
    assert fmt == "llama-eagle3" and cfg.aux_layer_ids == (2, 12, 22) and cfg.head_dim == 64
    assert parsed["specforge/llama3-70B-ealge3.json"][1].rope_scaling["rope_type"] == "llama3"
