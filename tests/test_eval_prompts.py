"""`eagle-pipe eval --data` on benchmark files: MT-bench / Spec-Bench / EAGLE question files, GSM8K and
HumanEval parsed into the right prompts (small files written here, and the published files in shared/real when
present), multi-turn questions run the MT-bench way (turn 2 after the target's own greedy turn-1 answer), and
the per-category / per-turn report against a recomputation."""
from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from real_assets import real_path
from test_evaluate import make_random_draft, run_eval, write_jsonl

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MT_QUESTIONS = [
    {"question_id": 81, "category": "writing", "turns": ["Write a short note about loops.",
                                                         "Rewrite it as a single sentence."]},
    {"question_id": 82, "category": "math", "turns": ["What is two plus three?", "And times four?"]},
    {"question_id": 83, "category": "writing", "turns": ["Describe a tuple in a few words."],
     "reference": ["An immutable sequence."]},
]


def read_published(path: Path) -> list[dict]:
    """The records of a published JSONL(.gz) file, read directly (not through the code under test)."""
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def read(path: Path, limit=None):
    from stages.data.prompts import read_questions

    return read_questions([str(path)], limit)


@pytest.fixture(scope="module")
def target(tiny_llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_llama)


def make_one_token_draft(target_dir: Path, out_dir: Path, token: int) -> Path:
    """An exported Eagle3Draft whose draft vocabulary is the single target token `token`: it always proposes
    it, so the target accepts it exactly where its own greedy output repeats that token (acceptance that
    differs from prompt to prompt, cheaply, and still verified token by token)."""
    from safetensors.torch import load_file

    from eagle.config import DraftConfig
    from eagle.export import export_draft
    from eagle.model import Eagle3Draft
    from eagle.vocab import build_vocab_map

    tcfg = json.loads((target_dir / "config.json").read_text())
    cfg = DraftConfig.from_target_config(tcfg, draft_vocab_size=1, ttt_steps=3)
    torch.manual_seed(0)
    draft = Eagle3Draft(cfg)
    embed = next(v for k, v in load_file(str(target_dir / "model.safetensors")).items()
                 if k.endswith("embed_tokens.weight"))
    counts = torch.zeros(cfg.vocab_size, dtype=torch.int64)
    counts[token] = 1
    d2t, t2d = build_vocab_map(counts, 1)
    draft.init_from_target({"embed_tokens.weight": embed}, d2t, t2d, init_lm_head=False)
    return export_draft(draft, out_dir)


# ----------------------------------------------------------------------------------------------- formats
def test_question_files_keep_every_turn_and_their_category(tmp_path):
    path = write_jsonl(tmp_path / "question.jsonl", MT_QUESTIONS + [{"question_id": 9, "category": "",
                                                                     "turns": ["No category here?"]}])
    questions, skips = read(path)
    assert skips == []
    assert [q.user_turns for q in questions] == [r["turns"] for r in MT_QUESTIONS] + [["No category here?"]]
    assert [q.category for q in questions] == ["writing", "math", "writing", "uncategorized"]
    assert [q.question_id for q in questions] == [81, 82, 83, 9]
    assert [q.where for q in questions] == [f"{path}:{n}" for n in (1, 2, 3, 4)]
    assert questions[0].conversation([]) == [{"role": "user", "content": "Write a short note about loops."}]
    assert questions[0].conversation(["Loops repeat."]) == [
        {"role": "user", "content": "Write a short note about loops."},
        {"role": "assistant", "content": "Loops repeat."},
        {"role": "user", "content": "Rewrite it as a single sentence."}]


def test_gsm8k_humaneval_and_prompt_records(tmp_path):
    gsm = write_jsonl(tmp_path / "test.jsonl", [{"question": "Ann has 3 apples. How many?", "answer": "#### 3"}])
    he = tmp_path / "HumanEval.jsonl.gz"
    with gzip.open(he, "wt") as f:
        f.write(json.dumps({"task_id": "HumanEval/0", "prompt": "def add(a, b):\n    \"\"\"Add.\"\"\"\n",
                            "entry_point": "add", "canonical_solution": "    return a + b\n", "test": ""}) + "\n")
    plain = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Say hello."}])
    (q_gsm,), _ = read(gsm)
    (q_he,), _ = read(he)
    (q_plain,), _ = read(plain)
    assert (q_gsm.category, q_gsm.user_turns) == ("gsm8k", ["Ann has 3 apples. How many?"])
    assert (q_he.category, q_he.question_id) == ("humaneval", "HumanEval/0")
    assert q_he.user_turns == ["Complete the code I provided.def add(a, b):\n    \"\"\"Add.\"\"\"\n"]
    assert (q_plain.category, q_plain.user_turns) == ("prompt", ["Say hello."])


def test_conversations_still_give_their_first_user_turn(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi?"},
                      {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye?"}]}])
    (q,), _ = read(path)
    assert q.category == "chat" and q.user_turns == ["Hi?"]
    assert q.conversation([]) == [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi?"}]


def test_alpaca_records_give_their_instruction(tmp_path):
    path = write_jsonl(tmp_path / "alpaca.jsonl", [
        {"instruction": "Translate.", "input": "Bonjour", "output": "Hello", "system": "Be terse."},
        {"instruction": "Name a prime.", "input": "", "output": ""}])
    (q1, q2), skips = read(path)
    assert skips == [] and (q1.category, q1.user_turns) == ("chat", ["Translate.\nBonjour"])
    assert q1.context == [{"role": "system", "content": "Be terse."}] and q2.user_turns == ["Name a prime."]


def test_unusable_records_are_skipped_with_their_location(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join([
        json.dumps({"question_id": 1, "category": "a", "turns": ["Fine."]}),
        json.dumps({"question_id": 2, "category": "a", "turns": []}),
        json.dumps({"question_id": 3, "category": "a", "turns": ["Ok.", "  "]}),
        json.dumps({"question": 7}),
        "{not json",
        json.dumps({"text": "no user turn"}),
        json.dumps({"id": 5, "answer": "nothing to ask"}),
        json.dumps({"question_id": 4, "category": "b", "turns": ["Also fine.", "Twice."]}),
    ]) + "\n")
    questions, skips = read(path)
    assert [q.question_id for q in questions] == [1, 4]
    assert [(s.where, s.reason) for s in skips] == [
        (f"{path}:2", "missing_field"), (f"{path}:3", "empty_content"), (f"{path}:4", "non_string_content"),
        (f"{path}:5", "malformed_json"), (f"{path}:6", "no_user_turn"), (f"{path}:7", "missing_field")]
    assert "turns[1] is empty" in skips[1].message and "keys: answer, id" in skips[5].message
    # --num-prompts counts questions (a two-turn question once), and reading stops at the last one needed
    limited, limited_skips = read(path, 2)
    assert [q.question_id for q in limited] == [1, 4] and len(limited_skips) == 6
    first, first_skips = read(path, 1)
    assert [q.question_id for q in first] == [1] and first_skips == []


# ----------------------------------------------------------------------------------------------- published files
PUBLISHED_QUESTION_FILES = [
    # (path under shared/real, questions, categories in file order, turns per question)
    (("data", "fastchat", "mt_bench_question.jsonl"), 80,
     ["writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities"], {2}),
    (("data", "spec_bench", "question.jsonl"), 480,
     ["writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities", "translation",
      "summarization", "qa", "math_reasoning", "rag"], {1, 2}),
    (("data", "fastchat", "vicuna_bench_question.jsonl"), 80, None, {1}),
    (("data", "eagle", "alpaca_question.jsonl"), 80, ["uncategorized"], {1}),
    (("data", "eagle", "gsm8k_question.jsonl"), 80, ["math"], {1}),
    (("data", "eagle", "humaneval_question.jsonl"), 80, ["code"], {1}),
    (("data", "eagle", "qa_question.jsonl"), 80, ["qa"], {1}),
    (("data", "eagle", "sum_question.jsonl"), 80, ["summarization"], {1}),
]


@pytest.mark.parametrize("parts,count,categories,turn_counts", PUBLISHED_QUESTION_FILES,
                         ids=lambda v: "/".join(v) if isinstance(v, tuple) else None)
def test_published_question_files(parts, count, categories, turn_counts):
    path = real_path(*parts)
    records = read_published(path)
    questions, skips = read(path)
    assert skips == [] and len(questions) == len(records) == count
    assert [q.user_turns for q in questions] == [r["turns"] for r in records]
    assert [q.question_id for q in questions] == [r["question_id"] for r in records]
    assert {len(q.user_turns) for q in questions} == turn_counts
    if categories is not None:
        assert list(dict.fromkeys(q.category for q in questions)) == categories
    assert questions[0].where == f"{path}:1" and questions[0].user_turns == records[0]["turns"]


def test_published_gsm8k_and_humaneval_give_eagles_prompts():
    """EAGLE's gsm8k/humaneval question sets are 80 questions of GSM8K's test split and of HumanEval, with
    the turn written as the question / as "Complete the code I provided." + prompt: ours must contain them."""
    gsm_path, he_path = real_path("data", "gsm8k", "test.jsonl"), real_path("data", "humaneval", "HumanEval.jsonl.gz")
    gsm, gsm_skips = read(gsm_path)
    gsm_records = read_published(gsm_path)
    assert gsm_skips == [] and len(gsm) == len(gsm_records) == 1319
    assert gsm[0].user_turns == [gsm_records[0]["question"]] and gsm[0].category == "gsm8k"
    he, he_skips = read(he_path)
    he_records = read_published(he_path)
    assert he_skips == [] and len(he) == len(he_records) == 164
    assert he[0].question_id == "HumanEval/0" and he[0].user_turns[0].endswith(he_records[0]["prompt"])
    for name, ours in (("gsm8k", gsm), ("humaneval", he)):
        eagle = read_published(real_path("data", "eagle", f"{name}_question.jsonl"))
        turns = {q.user_turns[0] for q in ours}
        assert len(eagle) == 80 and all(r["turns"][0] in turns for r in eagle), name


# ----------------------------------------------------------------------------------------------- the run
def test_group_stats_pool_the_target_forwards_of_each_group():
    from stages.evaluate.report import group_stats

    def run(question, category, turn, accepted):
        return {"question": question, "category": category, "turn": turn, "accepted": accepted,
                "new_tokens": sum(a + 1 for a in accepted), "baseline_new_tokens": sum(a + 1 for a in accepted),
                "seconds": 1.0, "baseline_seconds": 2.0}

    runs = [run(0, "a", 1, [3, 0, 1]), run(0, "a", 2, [2]), run(1, "b", 1, [0, 0]), run(2, "a", 1, [1, 1])]
    by_category = group_stats(runs, lambda r: r["category"])
    assert list(by_category) == ["a", "b"]
    # a: (4 + 1 + 2 + 3 + 2 + 2) / 6 forwards; b: 2 / 2 — pooled, not a mean of per-prompt means
    assert by_category["a"] == {"questions": 2, "turns": 3, "target_forwards": 6, "acceptance_length": 14 / 6,
                                "speedup": pytest.approx(2.0)}
    assert by_category["b"]["acceptance_length"] == 1.0 and by_category["b"]["questions"] == 1
    by_turn = group_stats(runs, lambda r: r["turn"])
    assert by_turn["1"]["acceptance_length"] == 13 / 7 and by_turn["2"]["acceptance_length"] == 3.0


def test_answer_text_is_the_answer_before_the_end_of_turn(target):
    from stages.data.prompts import answer_text

    _, tokenizer = target
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    tokens = tokenizer("  The loop ends. \n", add_special_tokens=False)["input_ids"] + [eot] + \
        tokenizer("after the end", add_special_tokens=False)["input_ids"]
    assert answer_text(tokenizer, tokens, [eot]) == "The loop ends."
    assert answer_text(tokenizer, tokens[:3], [eot]) == tokenizer.decode(tokens[:3]).strip()


def greedy_answer(model, tokenizer, ids: list[int], max_new_tokens: int) -> tuple[list[int], str]:
    """The target's plain generate() and the text an MT-bench harness appends as its assistant turn."""
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)[0, len(ids):].tolist()
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    kept = out[: next((i for i, t in enumerate(out) if t in eos), len(out))]
    return out, tokenizer.decode(kept, skip_special_tokens=True).strip()


def render(tokenizer, messages) -> list[int]:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                         return_dict=True)["input_ids"]


def test_multi_turn_questions_follow_the_targets_own_answers(tiny_llama, target, tmp_path, monkeypatch):
    import stages.evaluate.speculative as spec
    from stages.evaluate.stage import format_report

    model, tokenizer = target
    new_tokens = 20
    # every prompt, computed here: turn 2 after the target's own greedy turn-1 answer from plain generate()
    expected, answers = [], []
    for q in MT_QUESTIONS:
        history = []
        for turn, user in enumerate(q["turns"], 1):
            history.append({"role": "user", "content": user})
            ids = render(tokenizer, history)
            out, text = greedy_answer(model, tokenizer, ids, new_tokens)
            expected.append((ids, out))
            history.append({"role": "assistant", "content": text})
            if turn < len(q["turns"]):
                answers.append(text)
    assert len(answers) == 2 and all(answers)  # non-empty turn-1 answers: turn 2 really contains them
    frequent = Counter(t for _, out in expected for t in out).most_common(1)[0][0]
    draft = make_one_token_draft(tiny_llama, tmp_path / "draft", frequent)

    data = tmp_path / "question.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in MT_QUESTIONS[:2]) + '{"text": "skip me"}\n'
                    + json.dumps(MT_QUESTIONS[2]) + "\n")
    calls = []
    real_generate = spec.speculative_generate

    def recording(target_aux, draft, prompt_ids, **kw):
        result = real_generate(target_aux, draft, prompt_ids, **kw)
        if kw["max_new_tokens"] > 2:  # not the warm-up
            calls.append((list(prompt_ids), result))
        return result

    monkeypatch.setattr(spec, "speculative_generate", recording)
    code, output, report = run_eval("--target", tiny_llama, "--draft", draft, "--data", data,
                                    "--max-new-tokens", new_tokens, "--draft-tokens", 3, "--json")
    assert code == 0, output
    assert report["lossless"] is True
    assert report["num_prompts"] == 3 and report["num_turns"] == 5
    assert report["skipped_records"] == {"no_user_turn": 1}
    assert report["skipped_examples"] == [{"where": f"{data}:3", "reason": "no_user_turn",
                                           "message": "a text record has no user turn to use as a prompt"}]
    assert [ids for ids, _ in calls] == [ids for ids, _ in expected]
    assert [r.tokens for _, r in calls] == [out for _, out in expected]  # lossless, every turn

    per_prompt = report["per_prompt"]
    assert [(p["question_id"], p["turn"], p["category"]) for p in per_prompt] == [
        (81, 1, "writing"), (81, 2, "writing"), (82, 1, "math"), (82, 2, "math"), (83, 1, "writing")]
    assert [p["where"] for p in per_prompt] == [f"{data}:{n}" for n in (1, 1, 2, 2, 4)]
    assert [p["accepted"] for p in per_prompt] == [r.accepted for _, r in calls]
    assert [p["prompt_tokens"] for p in per_prompt] == [len(ids) for ids, _ in calls]

    def pooled(rows):
        accepted = [a for p in rows for a in p["accepted"]]
        return sum(a + 1 for a in accepted) / len(accepted)

    per_prompt_lengths = [pooled([p]) for p in per_prompt]
    assert len(set(per_prompt_lengths)) > 1  # so pooling differs from averaging the prompts
    assert pooled(per_prompt) != pytest.approx(sum(per_prompt_lengths) / len(per_prompt_lengths))
    assert report["acceptance_length"] == pytest.approx(pooled(per_prompt))
    assert report["target_forwards"] == sum(len(p["accepted"]) for p in per_prompt)
    assert list(report["per_category"]) == ["writing", "math"]
    for category, stats in report["per_category"].items():
        rows = [p for p in per_prompt if p["category"] == category]
        assert stats["acceptance_length"] == pytest.approx(pooled(rows))
        assert (stats["questions"], stats["turns"]) == (len({p["question"] for p in rows}), len(rows))
    assert {turn: (s["turns"], s["acceptance_length"]) for turn, s in report["per_turn"].items()} == {
        str(t): (len(rows), pytest.approx(pooled(rows)))
        for t in (1, 2) for rows in [[p for p in per_prompt if p["turn"] == t]]}

    table = format_report(report)
    assert "3 (5 turns)" in table and f"skipped {data}:3: no_user_turn" in table
    lines = table.splitlines()
    for name in ("writing", "math", "overall", "1", "2"):
        assert any(line.split()[:1] == [name] for line in lines), name


def test_num_prompts_counts_questions_and_mismatches_name_the_turn(tiny_llama, tmp_path, monkeypatch):
    import stages.evaluate.speculative as spec

    def accept_everything(logits, draft_ids):  # wrong: never compares with the target
        return len(draft_ids), int(logits[-1].argmax())

    data = write_jsonl(tmp_path / "question.jsonl", MT_QUESTIONS)
    random_draft = make_random_draft(tiny_llama, tmp_path / "draft")
    monkeypatch.setattr(spec, "verify_draft", accept_everything)
    code, output, report = run_eval("--target", tiny_llama, "--draft", random_draft, "--data", data,
                                    "--num-prompts", 1, "--max-new-tokens", 12, "--json")
    assert code == 2 and report["num_prompts"] == 1 and report["num_turns"] == 2
    assert [(m["prompt"], m["turn"]) for m in report["mismatches"]] == [(0, 1), (0, 2)]
    assert f"prompt 0 ({data}:1) differs from the target's greedy generate()" in output
