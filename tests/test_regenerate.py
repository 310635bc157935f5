"""`eagle-pipe regenerate`: the target's own answers, checked against its own generate(), resumable, sharded,
through the in-process engine and through a real chat-completions server on loopback."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from stages.cli import main
from stages.data.records import read_records
from stages.regenerate.stage import prompt_segments
from stages.data.regenerated import shard_dir

from dump_helpers import stage_args

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]
DEMO_TARGET = REPO / "examples" / "demo" / "target"

# answers written by someone else than the target; single- and multi-turn, messages and ShareGPT, system prompts
RECORDS = [
    {"messages": [{"role": "system", "content": "You are a helpful assistant that explains Python."},
                  {"role": "user", "content": "Give me an overview of the \"del\" statement."},
                  {"role": "assistant", "content": "It deletes names. Short answer from another model."}]},
    {"messages": [{"role": "user", "content": "Explain the \"if\" statement in Python."},
                  {"role": "assistant", "content": "Conditional execution."},
                  {"role": "user", "content": "Continue this passage from the Python documentation: \"The if "
                                              "statement is used for conditional\""},
                  {"role": "assistant", "content": "execution, as in C."}]},
    {"conversations": [{"from": "system", "value": "You are a helpful assistant that explains Python."},
                       {"from": "human", "value": "What is the \"with\" statement?"},
                       {"from": "gpt", "value": "A context manager thing."},
                       {"from": "human", "value": "Explain the \"pass\" statement."},
                       {"from": "gpt", "value": "It does nothing."}]},
    {"conversations": [{"from": "human", "value": "Tell me about Boolean operations."},
                       {"from": "gpt", "value": "and, or, not."}]},
]


def invoke(args: list[str]):
    result = CliRunner().invoke(main, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def regen_args(target, data, out, **options) -> list[str]:
    return stage_args("regenerate", target, data, out, **options)


def write_jsonl(path: Path, records: list, extra_lines=()) -> Path:
    lines = [json.dumps(r) for r in records] + list(extra_lines)
    path.write_text("\n".join(lines) + "\n")
    return path


def output_records(out: Path) -> list[dict]:
    return [rec for _, _, rec in read_records([str(out)])]


def own_generate(model, tokenizer, messages, max_new_tokens) -> tuple[str, str]:
    """The reference: the target's own greedy generate() on the rendered context, one prompt at a time."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                        return_dict=True)["input_ids"]
    eos = model.generation_config.eos_token_id
    with torch.inference_mode():
        new = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False)[0, len(ids):]
    new = new.tolist()
    stopped = bool(new) and new[-1] == eos
    return tokenizer.decode(new[:-1] if stopped else new, skip_special_tokens=False), "stop" if stopped else "length"


def check_against_own_generate(target_dir, records: list[dict], source_records: list[dict], max_new_tokens):
    """Every assistant turn equals own_generate on the conversation before it; system and user turns are the
    source's, in order."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stages.data.records import parse_record

    tok = AutoTokenizer.from_pretrained(target_dir)
    model = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
    finishes = []
    for rec in records:
        messages = rec["messages"]
        _, source = parse_record(source_records[rec["source"]["sample_index"]])
        assert [m for m in messages if m["role"] != "assistant"] == [m for m in source if m["role"] != "assistant"]
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        assert len(turns) == len(rec["generation"]["finish_reasons"]) == len(rec["generation"]["num_tokens"])
        for t, i in enumerate(turns):
            text, finish = own_generate(model, tok, messages[:i], max_new_tokens)
            assert messages[i]["content"] == text, (rec["source"], t)
            assert rec["generation"]["finish_reasons"][t] == finish
            finishes.append(finish)
    return finishes


# ---- what is answered --------------------------------------------------------------------------------------

def test_prompt_segments_answer_every_user_run():
    s, u1, u2 = ({"role": "system", "content": "S"}, {"role": "user", "content": "U1"},
                 {"role": "user", "content": "U2"})
    a = {"role": "assistant", "content": "A"}
    assert prompt_segments([s, u1, a, u2, a]) == [[s, u1], [u2]]
    assert prompt_segments([s, a, u1, a, a, u2]) == [[s, u1], [u2]]  # opening greeting and double answer dropped
    assert prompt_segments([u1, u2, a]) == [[u1, u2]]
    assert prompt_segments([s, a]) == []


# ---- the hf engine against the target's own generate() ----------------------------------------------------

def test_hf_answers_equal_the_targets_own_greedy_generate(tmp_path):
    data = write_jsonl(tmp_path / "chat.jsonl", RECORDS)
    out = tmp_path / "regen"
    result = invoke(regen_args(DEMO_TARGET, data, out, max_new_tokens=40, batch_size=3, part_records=3))
    assert result.exit_code == 0, result.output
    records = output_records(out)
    assert [r["source"]["sample_index"] for r in records] == [0, 1, 2, 3]
    assert records[2]["source"]["location"] == f"{data}:3"
    finishes = check_against_own_generate(DEMO_TARGET, records, RECORDS, 40)
    assert len(finishes) == 6 and {"stop", "length"} <= set(finishes)  # both ways of ending a turn happened
    done = json.loads((shard_dir(out, 0, 1) / "done.json").read_text())
    assert done["turns"] == 6 and done["records"]["written"] == 4
    assert sum(done["finish_reasons"].values()) == 6

    first = tmp_path / "first"
    assert invoke(regen_args(DEMO_TARGET, data, first, max_new_tokens=40, turns="first")).exit_code == 0
    firsts = output_records(first)
    assert all(sum(m["role"] == "assistant" for m in r["messages"]) == 1 for r in firsts)
    assert all(r["messages"][-1]["role"] == "assistant" for r in firsts)
    check_against_own_generate(DEMO_TARGET, firsts, [{"messages": _first_exchange(RECORDS[i])} for i in range(len(RECORDS))], 40)


def _first_exchange(record):
    from stages.data.records import parse_record

    _, messages = parse_record(record)
    first_answer = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[: first_answer + 1]


def test_sampling_is_seeded_per_record_not_per_batch(tiny_llama, tmp_path):
    data = write_jsonl(tmp_path / "chat.jsonl", RECORDS)
    common = dict(max_new_tokens=8, temperature=1.0, top_p=0.9)
    runs = {}
    for name, opts in {"a": dict(batch_size=4), "b": dict(batch_size=1, part_records=1),
                       "c": dict(batch_size=4, seed=1)}.items():
        assert invoke(regen_args(tiny_llama, data, tmp_path / name, **common, **opts)).exit_code == 0
        runs[name] = [r["messages"] for r in output_records(tmp_path / name)]
    assert runs["a"] == runs["b"]   # other batches, other parts: the same draws
    assert runs["a"] != runs["c"]   # another seed: other text


# ---- crash safety, shards, bad records --------------------------------------------------------------------

def _many_records(n: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"Question {i}: what does statement {i} do?"},
                          {"role": "assistant", "content": "Someone else's answer."}]} for i in range(n)]


def test_sigkill_mid_run_then_rerun_is_identical(tiny_llama, tmp_path):
    data = write_jsonl(tmp_path / "chat.jsonl", _many_records(16))
    opts = dict(max_new_tokens=6, part_records=3, batch_size=2, device="cpu")
    killed = tmp_path / "killed"
    env = dict(os.environ, EAGLE_PIPE_TEST_PART_PAUSE="0.5", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "stages.cli", *regen_args(tiny_llama, data, killed, **opts)],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    shard = shard_dir(killed, 0, 1)
    deadline = time.monotonic() + 240
    while not (shard / "part-00001.json").exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "regenerate never finished its second part"
        time.sleep(0.05)
    time.sleep(0.2)  # inside the third part's pause: its temporary file exists, not renamed yet
    assert proc.poll() is None, "regenerate finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    proc.stderr.close()
    assert not (shard / "done.json").exists()
    n_before = len(list(shard.glob("part-*.jsonl")))

    result = invoke(regen_args(tiny_llama, data, killed, **opts))  # resume
    assert result.exit_code == 0, result.output
    assert not list(shard.glob(".*tmp*"))
    clean = tmp_path / "clean"
    assert invoke(regen_args(tiny_llama, data, clean, **opts)).exit_code == 0
    names = sorted(p.name for p in shard_dir(clean, 0, 1).iterdir())
    assert names == sorted(p.name for p in shard.iterdir())
    assert 2 <= n_before < len([n for n in names if n.endswith(".jsonl")])  # killed after two parts, before the end
    for name in names:
        assert (shard / name).read_bytes() == (shard_dir(clean, 0, 1) / name).read_bytes(), name
    rerun = invoke(regen_args(tiny_llama, data, clean, **opts))
    assert "already complete" in rerun.output


def test_three_shards_cover_every_record_once_and_bad_records_are_counted(tiny_llama, tmp_path):
    good = _many_records(7)
    bad = ["not JSON at all",
           json.dumps({"messages": [{"role": "tool", "content": "x"}]}),
           json.dumps({"text": "plain text, no user turn"}),
           json.dumps({"messages": [{"role": "user", "content": "a prompt with no answer yet"}]})]
    data = write_jsonl(tmp_path / "chat.jsonl", good, bad)  # records 7..10 are the odd ones, lines 8..11
    out = tmp_path / "regen"
    for i in range(3):
        result = invoke(regen_args(tiny_llama, data, out, max_new_tokens=4, shard_index=i, num_shards=3))
        assert result.exit_code == 0, result.output
    dones = [json.loads((shard_dir(out, i, 3) / "done.json").read_text()) for i in range(3)]
    seen = []
    for i, done in enumerate(dones):
        ids = done["written_sample_indices"] + [j for v in done["skipped_sample_indices"].values() for j in v]
        assert all(j % 3 == i for j in ids)
        seen += ids
    assert sorted(seen) == list(range(11))
    skipped = {r: v for d in dones for r, v in d["skipped_sample_indices"].items()}
    assert skipped == {"malformed_json": [7], "unknown_role": [8], "no_user_turn": [9]}
    examples = {r: e for d in dones for r, e in d["skipped_examples"].items()}
    assert examples["malformed_json"][0]["where"] == f"{data}:8"
    assert examples["unknown_role"][0]["where"] == f"{data}:9"
    assert sum(d["records"]["written"] for d in dones) == 8  # the prompt-only record (10) is answered too

    records = output_records(out)  # read as dump-teacher reads it: by the original sample_index
    assert [r["source"]["sample_index"] for r in records] == [0, 1, 2, 3, 4, 5, 6, 10]

    result = invoke(regen_args(tiny_llama, data, tmp_path / "strict", max_new_tokens=4, strict=True))
    assert result.exit_code == 2 and f"{data}:8: malformed_json" in result.output

    dropped = tmp_path / "dropped"  # the random tiny target never ends within 4 tokens: every answer is cut
    assert invoke(regen_args(tiny_llama, data, dropped, max_new_tokens=4, drop_truncated=True)).exit_code == 0
    assert json.loads((shard_dir(dropped, 0, 1) / "done.json").read_text())["records"]["skipped"]["truncated"] == 8

    partial = tmp_path / "partial"
    assert invoke(regen_args(tiny_llama, data, partial, max_new_tokens=4, shard_index=0, num_shards=2)).exit_code == 0
    with pytest.raises(Exception, match="shard 1 of 2"):
        output_records(partial)


def test_refuses_other_settings_unless_overwrite(tiny_llama, tmp_path):
    data = write_jsonl(tmp_path / "chat.jsonl", _many_records(2))
    out = tmp_path / "regen"
    assert invoke(regen_args(tiny_llama, data, out, max_new_tokens=3)).exit_code == 0
    result = invoke(regen_args(tiny_llama, data, out, max_new_tokens=4))
    assert result.exit_code == 2 and "settings.max_new_tokens" in result.output
    assert invoke(regen_args(tiny_llama, data, out, max_new_tokens=4, overwrite=True)).exit_code == 0
    result = invoke(regen_args(tiny_llama, data, out, max_new_tokens=4, chat_template_kwargs="[1]"))
    assert result.exit_code == 2 and "JSON object" in result.output


# ---- the openai engine against a real server on loopback ----------------------------------------------------

def test_openai_engine_against_a_chat_completions_server(tiny_llama, tmp_path):
    from chat_server import ChatServer

    data = write_jsonl(tmp_path / "chat.jsonl", RECORDS)
    out = tmp_path / "regen"
    with ChatServer(tiny_llama, served_name="tiny-llama") as server:
        # the served name differs from --target; the server's root path is the target's, so it is accepted
        result = invoke(regen_args(tiny_llama, data, out, engine="openai", base_url=server.base_url,
                                   max_new_tokens=6, concurrency=3,
                                   chat_template_kwargs='{"enable_thinking": false}'))
        assert result.exit_code == 0, result.output
        assert all(b["model"] == "tiny-llama" and b["max_tokens"] == 6 and b["temperature"] == 0.0
                   and b["chat_template_kwargs"] == {"enable_thinking": False} for b in server.requests)
        assert len(server.requests) == 6  # one request per assistant turn
        for wrong in (dict(served_model="another-model"), dict(target=tmp_path / "another-model")):
            args = dict(target=tiny_llama, engine="openai", base_url=server.base_url, max_new_tokens=2) | wrong
            result = invoke(regen_args(args.pop("target"), data, tmp_path / "other", **args))
            assert result.exit_code == 2 and "serves ['tiny-llama']" in result.output, result.output
        assert len(server.requests) == 6
    records = output_records(out)
    assert len(records) == 4
    check_against_own_generate(tiny_llama, records, RECORDS, 6)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["engine"] == {"kind": "openai", "served_model": "tiny-llama"}


def test_openai_engine_counts_failing_requests_and_writes_the_rest(tiny_llama, tmp_path):
    from chat_server import ChatServer

    records = _many_records(8)
    data = write_jsonl(tmp_path / "chat.jsonl", records)
    flaky_calls = []

    def fault(body):
        question = body["messages"][-1]["content"]
        if question.startswith("Question 1:"):
            return "500"
        if question.startswith("Question 3:"):
            return "hang"
        if question.startswith("Question 5:"):
            return "malformed"
        if question.startswith("Question 6:") and not flaky_calls:  # fails once: a retry recovers it
            flaky_calls.append(1)
            return "500"
        return None

    out = tmp_path / "regen"
    with ChatServer(tiny_llama, served_name=str(tiny_llama), fault=fault, hang_seconds=2.0) as server:
        result = invoke(regen_args(tiny_llama, data, out, engine="openai", base_url=server.base_url,
                                   max_new_tokens=4, concurrency=4, request_timeout=0.5, max_retries=1))
        assert result.exit_code == 0, result.output
    done = json.loads((shard_dir(out, 0, 1) / "done.json").read_text())
    assert done["skipped_sample_indices"] == {"engine_error": [1, 3, 5]}
    assert done["written_sample_indices"] == [0, 2, 4, 6, 7]
    messages = {e["sample_index"]: e["message"] for e in done["skipped_examples"]["engine_error"]}
    assert "HTTP 500" in messages[1] and "JSON" in messages[5] and "timed out" in messages[3].lower()
    check_against_own_generate(tiny_llama, output_records(out), records, 4)


# ---- regenerate -> dump-teacher -> train -> eval ----------------------------------------------------------

def test_pipeline_regenerates_then_dumps_trains_and_evaluates(tiny_llama, tmp_path, monkeypatch):
    import yaml

    monkeypatch.chdir(tmp_path)
    train = [{"messages": [{"role": "user", "content": f"What does statement number {i} do?"},
                           {"role": "assistant", "content": f"A human wrote this answer {i}."}]} for i in range(10)]
    write_jsonl(tmp_path / "train.jsonl", train)
    write_jsonl(tmp_path / "eval.jsonl", [{"messages": [{"role": "user", "content": "What is a decorator?"}]}])
    config = {
        "regenerate": {"target": str(tiny_llama), "data": "train.jsonl", "out": "work/regen", "max_new_tokens": 24},
        "dump-teacher": {"target": str(tiny_llama), "out": "work/teacher", "top_k": 4, "max_seq_len": 128,
                         "device": "cpu"},
        "train": {"out": "work/run", "seq_len": 128, "batch_size": 2, "max_steps": 3, "ttt_steps": 2,
                  "lr": "1e-3", "warmup_steps": 1, "eval_fraction": 0.2, "eval_every": 3, "save_every": 3,
                  "log_every": 1, "compile": False, "num_workers": 1, "device": "cpu"},
        "eval": {"data": ["eval.jsonl"], "max_new_tokens": 8, "draft_tokens": 2, "device": "cpu"},
    }
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(config))
    result = invoke(["run", "pipeline.yaml", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["stages"]["regenerate"].startswith("ran") and summary["lossless"] is True
    assert summary["data"] == ["work/regen"] and summary["sequences"] == 10
    manifest = json.loads((tmp_path / "work/teacher/manifest.json").read_text())
    assert manifest["data"]["sources"] == [str(tmp_path / "work/regen")]
    regenerated = output_records(tmp_path / "work/regen")
    assert all("A human wrote" not in r["messages"][-1]["content"] for r in regenerated)

    result = invoke(["run", "pipeline.yaml", "--json"])
    assert result.exit_code == 0, result.output
    again = json.loads(result.stdout.strip().splitlines()[-1])
    assert again["stages"]["regenerate"] == "skipped" and again["stages"]["dump-teacher"] == "skipped"

    from stages.regenerate.stage import is_complete
    from stages.run import load_sections, resolve_options

    options = resolve_options("pipeline.yaml", "regenerate", load_sections("pipeline.yaml")["regenerate"])
    assert is_complete(options) == (True, "complete")
    done, why = is_complete({**options, "max_new_tokens": 25})
    assert not done and "settings.max_new_tokens" in why


@pytest.mark.parametrize("name, end_of_turn", [("qwen3", "<|im_end|>"), ("gemma-2b-it", "<end_of_turn>")])
def test_stop_ids_include_the_real_templates_end_of_turn(name, end_of_turn):
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from real_assets import real_path
    from stages.regenerate.engines import stop_token_ids

    tok = AutoTokenizer.from_pretrained(real_path("tokenizers", name))
    no_eos = SimpleNamespace(generation_config=None, config=SimpleNamespace(eos_token_id=None))
    assert tok.convert_tokens_to_ids(end_of_turn) in stop_token_ids(no_eos, tok, {})
