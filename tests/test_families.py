"""Every popular target family through the real CLI: dump-teacher -> verify -> train -> export -> lossless eval.

Each target is a tiny random model built from the family's real config.json (shrunk, same architecture class,
RoPE, sliding window / layer types, MoE, MLA) with its real tokenizer and chat template where shared/real has
them (tests/real_assets.py says which stand in). Data: conversations written here, in OpenAI messages and
ShareGPT form, with system prompts and 3 assistant turns, plus real ShareGPT records from FastChat. Eval prompts
with their answers run several times past the (shrunk) sliding window, and must equal the target's own
greedy `generate()` token for token.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from stages.cli import main
from tests.real_assets import FAMILIES, FAMILY_BY_NAME, build_family_target, needs_real, real_path

pytestmark = [needs_real, pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

WINDOW = 16          # the shrunk sliding window / attention chunk, in tokens
NEW_TOKENS = 24      # eval answer length: prompt + answer pass the window several times
EXPORT_TENSORS = {"fc.weight", "norm.weight", "lm_head.weight", "d2t", "t2d"} | {
    f"midlayer.{n}.weight" for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm",
                                     "hidden_norm", "post_attention_layernorm")}


def conversation(i: int, sharegpt: bool) -> dict:
    """A system prompt and three user/assistant exchanges."""
    turns = [("system", "You are terse.")]
    for t in range(3):
        turns += [("user", f"What does line {t} of example {i} do?"),
                  ("assistant", f"Line {t} loops over the items of example {i}.")]
    if sharegpt:
        names = {"system": "system", "user": "human", "assistant": "gpt"}
        return {"conversations": [{"from": names[r], "value": v} for r, v in turns]}
    return {"messages": [{"role": r, "content": v} for r, v in turns]}


def write_train_data(path: Path) -> Path:
    """Two conversations of each form written here, and FastChat's two shortest with 3+ assistant turns."""
    records = [conversation(i, sharegpt=i % 2 == 1) for i in range(4)]
    fastchat = json.loads(real_path("data/fastchat/dummy_conversation.json").read_text())
    multi = [r for r in fastchat if sum(c["from"] == "gpt" for c in r["conversations"]) >= 3]
    records += sorted(multi, key=lambda r: sum(len(c["value"]) for c in r["conversations"]))[:2]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_eval_data(path: Path, target: Path) -> Path:
    """Prompts (system + a long first user turn) that alone are longer than the window; the system prompt is left
    out where the family's template refuses one (Gemma-2)."""
    long_question = ("Explain, step by step and with an example, how the with statement calls the enter and "
                     "exit methods of a context manager, and what happens when the block raises. ")
    records = [{"messages": [{"role": "system", "content": "You are terse."},
                             {"role": "user", "content": long_question * 2}]},
               {"conversations": [{"from": "human", "value": "What is a generator? " * 6},
                                  {"from": "gpt", "value": "A function that yields."}]}]
    records = [r for r in records if not template_raises(target, r)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def cli(*args) -> tuple[int, str]:
    """Exit code and output; for --json commands the output's last line is the stdout JSON object."""
    result = CliRunner().invoke(main, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output + "\n" + result.stdout.strip()


@pytest.fixture(scope="module")
def targets(tmp_path_factory):
    """Family name -> tiny target directory, built once per module."""
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = build_family_target(FAMILY_BY_NAME[name], tmp_path_factory.mktemp(name) / "target",
                                              window=WINDOW)
        return built[name]
    return get


@functools.lru_cache(maxsize=2)
def _tokenizer(target: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(target)


def template_raises(target: Path, record: dict) -> bool:
    """Whether the family's own template refuses this conversation (then dump must skip it as template_error)."""
    from stages.data.records import parse_record

    _, messages = parse_record(record)
    try:
        _tokenizer(target).apply_chat_template(messages, tokenize=False)
    except Exception:
        return True
    return False


def assert_dumped_norm_is_the_targets(target: Path, weights: Path) -> None:
    """OUT/target's norm.weight (the draft norm's init) in the draft's plain RMSNorm reproduces the target's own
    final norm (Gemma's is x * (1 + weight))."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from eagle.model import RMSNorm

    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
    config = model.config.get_text_config()
    norm = next(m for n, m in model.named_modules() if n.endswith("model.norm") or n.endswith("language_model.norm"))
    plain = RMSNorm(config.hidden_size, config.rms_norm_eps)
    with torch.no_grad():
        plain.weight.copy_(load_file(str(weights))["norm.weight"])
        x = torch.randn(3, 5, config.hidden_size, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(plain(x), norm(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", [f.name for f in FAMILIES])
def test_family_dumps_trains_exports_and_evaluates_losslessly(name, targets, tmp_path):
    target = targets(name)
    train_data = write_train_data(tmp_path / "train.jsonl")
    teacher, run, export = tmp_path / "teacher", tmp_path / "run", tmp_path / "export"

    code, out = cli("dump-teacher", "--target", target, "--data", train_data, "--out", teacher, "--top-k", 4,
                    "--max-seq-len", 1024, "--device", "cpu", "--dtype", "float32")
    assert code == 0, out
    done = json.loads(next((teacher / "shards").glob("shard-*/done.json")).read_text())
    records = [json.loads(line) for line in train_data.read_text().splitlines()]
    refused = sum(template_raises(target, r) for r in records)  # Gemma-2's template refuses system turns
    assert refused < len(records), f"{name}: its template refuses every test conversation"
    assert done["records"]["skipped"] == ({"template_error": refused} if refused else {}), done["records"]
    assert done["records"]["written"] == len(records) - refused and done["num_supervised_tokens"] > 0

    assert_dumped_norm_is_the_targets(target, teacher / "target" / "weights.safetensors")

    code, out = cli("verify", teacher)
    assert code == 0, out

    code, out = cli("train", "--teacher-dir", teacher, "--out", run, "--seq-len", 128, "--batch-size", 2,
                    "--max-steps", 2, "--ttt-steps", 2, "--warmup-steps", 1, "--eval-fraction", 0,
                    "--save-every", 2, "--log-every", 1, "--no-compile", "--num-workers", 1, "--device", "cpu",
                    "--draft-vocab-size", 512)
    assert code == 0, out
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert losses and all(torch.isfinite(torch.tensor(losses))), losses

    code, out = cli("export", run, export)
    assert code == 0, out
    assert sorted(p.name for p in export.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((export / "config.json").read_text())
    tcfg = json.loads((target / "config.json").read_text())
    tcfg = tcfg.get("text_config", tcfg)
    assert config["architectures"] == ["LlamaForCausalLMEagle3"] and config["num_hidden_layers"] == 1
    assert config["target_hidden_size"] == tcfg["hidden_size"] and config["vocab_size"] == tcfg["vocab_size"]
    assert config["draft_vocab_size"] == 512
    aux = config["eagle_aux_hidden_state_layer_ids"]
    assert aux == sorted(aux) and len(aux) == 3 and 0 <= aux[0] and aux[-1] < tcfg["num_hidden_layers"]
    with safe_open(str(export / "model.safetensors"), framework="pt") as f:
        assert set(f.keys()) == EXPORT_TENSORS

    eval_data = write_eval_data(tmp_path / "eval.jsonl", target)
    code, out = cli("eval", "--target", target, "--draft", export, "--data", eval_data, "--max-new-tokens",
                    NEW_TOKENS, "--draft-tokens", 3, "--device", "cpu", "--json")
    assert code == 0, out
    report = json.loads(next(line for line in out.splitlines()[::-1] if line.startswith("{")))
    assert report["lossless"] is True and report["mismatches"] == [], report
    assert report["new_tokens"] == report["baseline_new_tokens"] > 0


@pytest.mark.parametrize("name", [f.name for f in FAMILIES if f.window])
def test_target_cache_cropped_past_the_window_equals_a_full_forward(name, targets):
    """Verification forwards with rejected drafts cropped away, far past the sliding window / attention chunk,
    give the logits and aux features of one plain forward over the whole sequence (no cache)."""
    from transformers import AutoModelForCausalLM

    from stages.evaluate.speculative import TargetWithAux, crop_target_cache, full_history_cache

    model = AutoModelForCausalLM.from_pretrained(targets(name), dtype=torch.float32).eval()
    V = model.config.get_text_config().vocab_size
    ids = torch.randint(0, V, (1, 5 * WINDOW), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids, output_hidden_states=True, use_cache=False)
    wrapped = TargetWithAux(model, (1, 3, 5))
    cache, logits, aux, pos = full_history_cache(model.config), [], [], 0
    try:
        while pos < ids.shape[1]:
            chunk = ids[:, pos:pos + 7]
            wrapped.forward((chunk + 1) % V, cache)  # drafts the target rejects
            crop_target_cache(cache, pos)
            step_logits, step_aux = wrapped.forward(chunk, cache)
            logits.append(step_logits)
            aux.append(step_aux)
            pos += chunk.shape[1]
    finally:
        wrapped.remove()
    torch.testing.assert_close(torch.cat(logits, 1), ref.logits, rtol=1e-4, atol=1e-4)
    want_aux = torch.cat([ref.hidden_states[k] for k in (1, 3, 5)], -1)
    torch.testing.assert_close(torch.cat(aux, 1), want_aux, rtol=1e-4, atol=1e-4)


def test_real_tokenizers_reproduce_the_published_ids():
    """The offline builders give the vendors' ids: Meta's Llama-3 test vectors, mistral-common's golden
    tokenizations (SentencePiece v1 and v3), and the Qwen ids in SpecForge's reference."""
    from tests.real_assets import T, real_root, sentencepiece_tokenizer, tok_llama3, tok_qwen

    vectors = json.loads(real_path(T, "llama-3.1-8b-instruct/original/llama_models_tokenizer_test_vectors.json")
                         .read_text())
    llama3 = tok_llama3(real_root())
    for case in vectors["encode"]:
        ids = llama3(case["text"], add_special_tokens=False)["input_ids"]
        assert [128000] * case["bos"] + ids + [128001] * case["eos"] == case["ids"]
    for token, token_id in vectors["special_tokens"].items():
        assert llama3.convert_tokens_to_ids(token) == token_id

    samples = real_path(T, "mistral-7b-instruct-v0.3/mistral_common_tests/samples/no_tools")
    for version, model in (("v1", "tokenizer.model.v1"), ("v3", "mistral_instruct_tokenizer_240323.model.v3")):
        tok = sentencepiece_tokenizer(samples.parents[2] / model, "")
        want = json.loads((samples / f"tokens_{version}.json").read_text())["tokens"]
        assert tok((samples / f"text_{version}.txt").read_text(), add_special_tokens=False)["input_ids"] == want

    qwen = tok_qwen("qwen3")(real_root())
    assert qwen("Who are you", add_special_tokens=False)["input_ids"] == [15191, 525, 498]
