"""bench/ablations/recipe.py: plans expand into (arm, seed, K) runs of `eagle-pipe run` whose outputs are shared when their
settings are, finished runs are not redone, and the table aggregates what the runs measured."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from bench.ablations import recipe, recipe_data


BASE = {
    "regenerate": {"data": ["prompts.jsonl"], "max_new_tokens": 16},
    "dump-teacher": {"target": "TARGET", "top_k": 4, "max_seq_len": 128, "device": "cpu"},
    "train": {"seq_len": 128, "batch_size": 2, "max_steps": 4, "ttt_steps": 2, "lr": 1e-3},
    "eval": {"data": ["eval.jsonl"], "max_new_tokens": 8, "draft_tokens": 2, "device": "cpu"},
}


def write_plan(tmp_path: Path, arms: list[dict], base: dict = BASE, **extra) -> Path:
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    plan = {"base": str(tmp_path / "base.yaml"), "work": str(tmp_path / "work"), "arms": arms, **extra}
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    return path


def units_of(tmp_path, arms, base=BASE, **extra):
    path = write_plan(tmp_path, arms, base=base, **extra)
    return recipe.expand(recipe.load_plan(path), path)


def test_overrides_merge_key_by_key_and_null_removes(tmp_path):
    units = units_of(tmp_path, [
        {"name": "recipe"},
        {"name": "original", "regenerate": None, "dump-teacher": {"data": ["chat.jsonl"]}},
        {"name": "no-cap", "train": {"max-steps": None, "epochs": 2}},
    ])
    by = {u.arm: u.sections for u in units}
    assert by["recipe"] == BASE
    assert "regenerate" not in by["original"] and by["original"]["dump-teacher"]["data"] == ["chat.jsonl"]
    assert by["original"]["dump-teacher"]["top_k"] == 4  # the rest of the section is the base's
    assert "max_steps" not in by["no-cap"]["train"] and by["no-cap"]["train"]["epochs"] == 2
    assert BASE["train"]["max_steps"] == 4  # the base itself is untouched


def test_the_base_pipelines_own_paths_are_replaced(tmp_path):
    base = {"regenerate": {"data": ["p.jsonl"], "out": "work/regen"},
            "dump-teacher": {"target": "T", "data": ["work/regen"], "out": "work/teacher"},
            "train": {"teacher_dir": "work/teacher", "out": "work/run", "lr": 1e-3},
            "eval": {"data": ["q.jsonl"], "draft": "work/run/export", "run_dir": "work/run"}}
    units = units_of(tmp_path, [{"name": "a"}, {"name": "b", "train": {"out": "/mine"}}], base=base)
    a, b = (recipe.assign_paths(u.sections, tmp_path / "work") for u in units)
    assert a["regenerate"]["out"].startswith(str(tmp_path / "work" / "regen"))
    assert a["dump-teacher"]["data"] == [a["regenerate"]["out"]]
    assert a["dump-teacher"]["out"].startswith(str(tmp_path / "work" / "dump"))
    assert a["train"]["out"].startswith(str(tmp_path / "work" / "train")) and b["train"]["out"] == "/mine"
    assert "draft" not in a["eval"] and "run_dir" not in a["eval"]  # run wires them from train.out


def test_seeds_and_k_expand_into_units(tmp_path):
    units = units_of(tmp_path, [{"name": "a", "seeds": [0, 1], "k": [3, 5]}, {"name": "b"}])
    assert [(u.arm, u.seed, u.k) for u in units] == [("a", 0, 3), ("a", 0, 5), ("a", 1, 3), ("a", 1, 5),
                                                     ("b", None, 2)]
    assert [u.sections["train"].get("seed") for u in units] == [0, 0, 1, 1, None]
    assert [u.sections["eval"]["draft_tokens"] for u in units] == [3, 5, 3, 5, 2]
    assert len({u.tag for u in units if u.arm == "a"}) == 4


def test_bad_plans_are_refused(tmp_path):
    with pytest.raises(SystemExit, match="unique"):
        units_of(tmp_path, [{"name": "a"}, {"name": "a"}])
    with pytest.raises(SystemExit, match="unknown key"):
        units_of(tmp_path, [{"name": "a", "trian": {"lr": 1}}])
    with pytest.raises(SystemExit, match="unknown section"):
        units_of(tmp_path, [{"name": "a"}], defaults={"dump": {"top_k": 2}})


def test_outputs_are_shared_exactly_when_their_inputs_are(tmp_path):
    work = tmp_path / "work"
    units = units_of(tmp_path, [
        {"name": "recipe", "seeds": [0, 1]},
        {"name": "lr", "train": {"lr": 3e-3}},
        {"name": "argmax", "dump-teacher": {"teacher": "argmax"}},
        {"name": "longer", "regenerate": {"max_new_tokens": 32}},
        {"name": "fixed", "train": {"out": str(tmp_path / "mine")}},
    ])
    paths = {(u.arm, u.seed): recipe.assign_paths(u.sections, work) for u in units}
    out = {key: (s["regenerate"]["out"], s["dump-teacher"]["out"], s["train"]["out"]) for key, s in paths.items()}
    r0, r1, lr, arg, longer = (out[("recipe", 0)], out[("recipe", 1)], out[("lr", None)], out[("argmax", None)],
                               out[("longer", None)])
    assert r0[:2] == r1[:2] == lr[:2] and len({r0[2], r1[2], lr[2]}) == 3  # one dump, three trainings
    assert arg[0] == r0[0] and arg[1] != r0[1] and arg[2] != r0[2]  # same answers, another dump, another run
    assert len({longer[0], longer[1], longer[2]} & set(r0)) == 0  # other answers: everything downstream differs
    assert out[("fixed", None)][2] == str(tmp_path / "mine")
    s = paths[("recipe", 0)]  # the stages read what the previous one wrote
    assert s["dump-teacher"]["data"] == [s["regenerate"]["out"]] and s["train"]["teacher_dir"] == s["dump-teacher"]["out"]
    assert s["regenerate"]["target"] == "TARGET"


def test_generated_pipelines_are_valid_for_run(tmp_path):
    from stages.run import load_sections

    path = write_plan(tmp_path, [{"name": "recipe"}, {"name": "original", "regenerate": None,
                                                      "dump-teacher": {"data": ["chat.jsonl"]}}])
    plan = recipe.load_plan(path)
    for unit in recipe.expand(plan, path):
        recipe.run_unit(unit, tmp_path / "work", lock=None, dry_run=True)
        written = tmp_path / "work" / "arms" / unit.arm / f"pipeline-{unit.tag}.yaml"
        sections = load_sections(str(written))  # every key a real option, paths wired
        assert sections["eval"]["draft"] == str(Path(sections["train"]["out"]) / "export")


def fake_result(arm, seed, k, al, cats, steps=10, seconds=5.0, lossless=True, train_out=None):
    return {"arm": arm, "factor": f"factor {arm}", "seed": seed, "k": k,
            "sections": {"train": {"out": train_out or f"/t/{arm}/{seed}"}},
            "summary": {"acceptance_length": al, "lossless": lossless, "num_prompts": 2, "num_turns": 4,
                        "per_position_acceptance": [al - 1.0 - 0.1 * (k - 1)] + [0.1] * (k - 1),
                        "tokens_per_s": 10.0 * al, "baseline_tokens_per_s": 10.0,
                        "per_category": {c: {"acceptance_length": v} for c, v in cats.items()},
                        "stage_seconds": {"eval": 30.0 * k}, "tokens": 100, "supervised_tokens": 60},
            "regenerated_tokens": 80,
            "train": {"steps": steps, "positions": steps * 256, "seconds": seconds, "held_out_simulated_al": 1.5}}


def test_table_means_over_seeds_and_keeps_each_seed():
    plan = {"arms": [{"name": "a"}, {"name": "b"}, {"name": "c"}]}
    results = [fake_result("a", 0, 3, 2.0, {"writing": 1.8, "math": 2.2}),
               fake_result("a", 1, 3, 2.2, {"writing": 2.0, "math": 2.4}, seconds=7.0),
               fake_result("a", 0, 5, 2.5, {"writing": 2.1, "math": 2.9}),
               fake_result("b", None, 3, 1.5, {"math": 1.4, "writing": 1.6}, lossless=False)]
    rows = recipe.table(plan, results)
    a, b, c = rows
    assert a["acceptance_length"] == {"3": pytest.approx(2.1), "5": pytest.approx(2.5)}
    assert a["acceptance_length_per_seed"]["3"] == [2.0, 2.2]
    assert a["acceptance_length_sd"]["3"] == pytest.approx(0.1414, abs=1e-4) and a["acceptance_length_sd"]["5"] is None
    assert a["per_category"] == {"writing": pytest.approx(1.9), "math": pytest.approx(2.3)}  # at the first K
    assert list(a["per_category"]) == ["writing", "math"]  # MT-bench's order
    assert a["train_seconds"] == pytest.approx(6.0) and a["lossless"] is True
    assert a["eval_seconds"] == {"3": 90.0, "5": 150.0}
    assert b["lossless"] is False and b["seeds"] == [None]
    assert c == {"arm": "c", "factor": "c", "measured": False}
    assert a["engine"] == "hf" and a["per_position_acceptance"]["3"] == pytest.approx([0.9, 0.1, 0.1])  # seeds 0.8 and 1.0
    assert a["tokens_per_s"]["3"] == pytest.approx(21.0) and a["baseline_tokens_per_s"]["3"] == 10.0
    md = recipe.markdown(rows).splitlines()
    assert md[0].startswith("| arm | factor | AL K=3 | AL K=5 | writing | math | engine | accepted per position | "
                            "tok/s (plain) | lossless")
    assert "| hf | 0.900/0.100/0.100 | 21.0 (10.0) |" in md[2]
    assert "2.100 ± 0.141" in md[2] and "| NO |" in md[3] and "not run" in md[4]


@pytest.mark.slow
def test_two_arms_run_end_to_end_share_the_dump_and_resume(tmp_path, tiny_llama, monkeypatch):
    """Two arms through the real `eagle-pipe run`: the dump is made once, each arm gets its draft measured, and
    a second invocation runs nothing."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    data = tmp_path / "data"
    data.mkdir()
    chats = [{"messages": [{"role": "user", "content": f"What does statement {i} do?"},
                           {"role": "assistant", "content": f"It runs block {i} twice, then returns."}]}
             for i in range(10)]
    (data / "train.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    (data / "eval.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "What is a loop?"}]}) + "\n")
    base = {"dump-teacher": {"target": str(tiny_llama), "data": [str(data / "train.jsonl")], "top_k": 4,
                             "max_seq_len": 128, "device": "cpu"},
            "train": {"seq_len": 128, "batch_size": 2, "max_steps": 3, "ttt_steps": 2, "lr": 1e-3,
                      "warmup_steps": 1, "eval_fraction": 0.2, "compile": False, "num_workers": 1, "device": "cpu"},
            "eval": {"data": [str(data / "eval.jsonl")], "max_new_tokens": 8, "draft_tokens": 2, "device": "cpu"}}
    plan = write_plan(tmp_path, [{"name": "recipe"}, {"name": "lr", "factor": "lr 3e-3", "train": {"lr": 3e-3}}],
                      base=base)
    recipe.main([str(plan)])
    work = tmp_path / "work"
    first = json.loads((work / "arms" / "recipe" / "result-s--k2.json").read_text())
    second = json.loads((work / "arms" / "lr" / "result-s--k2.json").read_text())
    assert first["summary"]["stages"]["dump-teacher"].startswith("ran")
    assert second["summary"]["stages"]["dump-teacher"] == "skipped"  # the same dump, reused by run
    assert second["summary"]["stages"]["train"].startswith("ran")
    assert first["summary"]["lossless"] and second["summary"]["lossless"]
    assert first["train"]["steps"] == 3 and first["train"]["positions"] == 3 * 2 * 128
    stamp = (work / "arms" / "lr" / "result-s--k2.json").stat().st_mtime_ns
    recipe.main([str(plan)])  # everything measured: nothing runs again
    assert (work / "arms" / "lr" / "result-s--k2.json").stat().st_mtime_ns == stamp


# ------------------------------------------------------------------------------------------------ recipe_data


def test_heldout_questions_drop_what_the_judge_asks(tmp_path):
    judge = tmp_path / "judge.jsonl"
    judge.write_text(json.dumps({"question_id": 81, "turns": ["Write a poem.", "Now  shorter, please."]}) + "\n")
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps(q) + "\n" for q in [
        {"question_id": 1, "turns": ["How do I sleep better?"]},
        {"question_id": 2, "turns": ["now SHORTER,   please."]},      # a judge turn, other case and spacing
        {"question_id": 3, "turns": ["Name a color.", "Another one."]}]))
    out = tmp_path / "held.jsonl"
    recipe_data.main(["heldout", str(other), "--exclude", str(judge), "--out", str(out)])
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert records == [{"messages": [{"role": "user", "content": "How do I sleep better?"}]},
                       {"messages": [{"role": "user", "content": "Name a color."}]}]


def test_mix_shuffles_regenerated_conversations_reproducibly(tmp_path, tiny_llama):
    from click.testing import CliRunner

    from stages.cli import main as cli
    from stages.data.records import read_records

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Question {i}?"}]}) + "\n"
                               for i in range(6)))
    regen = tmp_path / "regen"
    result = CliRunner().invoke(cli, ["regenerate", "--target", str(tiny_llama), "--data", str(prompts), "--out",
                                      str(regen), "--max-new-tokens", "4", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    answered = [rec["messages"] for _, _, rec in read_records([str(regen)])]
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    recipe_data.main(["mix", str(regen), "--out", str(a), "--seed", "3"])
    recipe_data.main(["mix", str(regen), "--out", str(b), "--seed", "3"])
    mixed = [json.loads(line)["messages"] for line in a.read_text().splitlines()]
    assert a.read_bytes() == b.read_bytes()
    assert sorted(map(json.dumps, mixed)) == sorted(map(json.dumps, answered)) and mixed != answered
    assert all(m[-1]["role"] == "assistant" for m in mixed)


def test_mix_with_original_answers_keeps_the_prompts_and_the_order(tmp_path, tiny_llama):
    from click.testing import CliRunner

    from stages.cli import main as cli

    dpo = [{"conversations": [{"from": "human", "value": f"Plan trip {i}?"},
                              {"from": "gpt", "value": f"Go to town {i}."},
                              {"from": "human", "value": "And then?"}],
            "chosen": {"from": "gpt", "value": f"Come back on day {i}."}} for i in range(4)]
    chats = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Hi {i}"},
                           {"role": "assistant", "content": f"Hello {i}"}]} for i in range(3)]
    src = tmp_path / "dpo.json"
    src.write_text(json.dumps(dpo))
    src2 = tmp_path / "chats.jsonl"
    src2.write_text("".join(json.dumps(c) + "\n" for c in chats))
    regen = tmp_path / "regen"
    result = CliRunner().invoke(cli, ["regenerate", "--target", str(tiny_llama), "--data", str(src), "--data",
                                      str(src2), "--out", str(regen), "--max-new-tokens", "3", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    regenerated, _ = recipe_data.mix([regen], seed=1)
    original, dropped = recipe_data.mix([regen], seed=1, answers="original")
    assert dropped == 0 and len(original) == len(regenerated) == 7

    def prompts(r):
        return [(m["role"], m["content"]) for m in r["messages"] if m["role"] != "assistant"]

    assert [prompts(r) for r in original] == [prompts(r) for r in regenerated]  # same conversations, same order
    expected = {f"Plan trip {i}?": [f"Go to town {i}.", f"Come back on day {i}."] for i in range(4)} | \
               {f"Hi {i}": [f"Hello {i}"] for i in range(3)}
    for r in original:
        first_user = next(m["content"] for m in r["messages"] if m["role"] == "user")
        assert [m["content"] for m in r["messages"] if m["role"] == "assistant"] == expected[first_user]


# ------------------------------------------------------------------------------------------------ plans
def test_plan_variables_come_from_vars_then_the_environment(tmp_path, monkeypatch):
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump({"work": "${W}/out", "defaults": {"train": {"max_steps": "${STEPS:-300}"}},
                                    "arms": [{"name": "a", "dump-teacher": {"data": ["${DATA:-d}/x.jsonl"]}}]}))
    monkeypatch.setenv("W", "/env")
    plan = recipe.load_plan(path, {"DATA": "/given"})
    assert plan["work"] == "/env/out" and plan["defaults"]["train"]["max_steps"] == 300  # a number, as YAML reads it
    assert plan["arms"][0]["dump-teacher"]["data"] == ["/given/x.jsonl"]
    monkeypatch.delenv("W")
    with pytest.raises(SystemExit, match=r"plan.yaml: \$\{W\} is not set \(export W=\.\.\. or pass --var W=\.\.\.\)"):
        recipe.load_plan(path)


@pytest.mark.parametrize("name", ["smollm2", "fp8-demo", "regenerate-demo"])
def test_shipped_plans_write_pipelines_run_accepts(name, tmp_path, monkeypatch):
    """Every plan in bench/ablations/plans loads, names no absolute path of its own, and every unit's pipeline
    is valid for `eagle-pipe run`."""
    from stages.run import load_sections

    path = Path(recipe.__file__).parent / "plans" / f"{name}.yaml"
    assert "/work/" not in "".join(line for line in path.read_text().splitlines(True) if not line.startswith("#"))
    for var in ("SMOLLM2_TARGET", "RECIPE_WORK", "EAGLE_PIPE_BENCH_WORK"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    plan = recipe.load_plan(path)
    units = recipe.expand(plan, path)
    assert {u.arm for u in units} == {a["name"] for a in plan["arms"]}
    for unit in units:
        recipe.run_unit(unit, tmp_path / "work", lock=None, dry_run=True)
        load_sections(str(tmp_path / "work" / "arms" / unit.arm / f"pipeline-{unit.tag}.yaml"))


def test_compare_gives_arm_over_baseline():
    plan = {"arms": [{"name": "full"}, {"name": "fp8"}, {"name": "c"}], "compare": [["fp8", "full"], ["c", "full"]]}
    results = [fake_result("full", None, 3, 2.0, {}) | {"dump": {"bytes_per_token": 1000.0}},
               fake_result("fp8", None, 3, 1.98, {}) | {"dump": {"bytes_per_token": 500.0}}]
    results[1]["train"]["held_out_simulated_al"] = 1.2
    rows = recipe.table(plan, results)
    (fp8, c) = recipe.compare(plan, rows)
    assert fp8["acceptance_length"] == {"3": pytest.approx(0.99)} and fp8["dump_bytes_per_token"] == 0.5
    assert fp8["held_out_simulated_al"] == pytest.approx(0.8)
    assert c == {"arm": "c", "baseline": "full", "measured": False}
    assert recipe.markdown(rows).splitlines()[2].endswith("| 1000.0 |")
    with pytest.raises(SystemExit, match="pairs of arm names"):
        recipe.load_plan(write_plan(Path(__import__("tempfile").mkdtemp()), [{"name": "a"}], compare=[["a", "b"]]))


def test_dump_facts_count_the_parts_bytes_next_to_the_formula(tmp_path_factory, tiny_llama):
    """The bytes per token of a real dump, from its done.json, against the format's formula (which leaves out
    only each part's safetensors header and the closing entry of its cu_seqlens)."""
    from stages import shards
    from train_dumps import cached_dump

    dump = cached_dump(tmp_path_factory, "llama-40", tiny_llama, records=40)
    facts = recipe.dump_facts({"dump-teacher": {"out": str(dump)}})
    parts = list(shards.iter_parts(dump))
    on_disk = sum(p.stat().st_size for p in parts)
    assert facts["bytes"] == on_disk and facts["bytes_per_token"] == on_disk / facts["tokens"]
    headers = sum(8 + int.from_bytes(p.read_bytes()[:8], "little") for p in parts)
    exact = (on_disk - headers - 8 * len(parts)) / facts["tokens"]
    assert facts["formula_bytes_per_token"] == pytest.approx(exact, rel=1e-12)
    assert recipe.dump_facts({"dump-teacher": {"out": str(tmp_path_factory.mktemp("none"))}}) == {}


def test_split_holds_out_prompts_that_no_training_record_contains(tmp_path):
    chats = [{"messages": [{"role": "user", "content": f"question {i % 30}"},
                           {"role": "assistant", "content": f"answer {i}"},
                           {"role": "user", "content": "and again?" if i % 2 else f"follow-up {i}"},
                           {"role": "assistant", "content": "yes"}]} for i in range(120)]
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in chats))
    recipe_data.main(["split", str(data), "--out", str(tmp_path / "out"), "--train-records", "50",
                      "--eval-fraction", "0.3", "--max-prompt-count", "4"])
    train = [json.loads(x)["messages"] for x in (tmp_path / "out" / "original.jsonl").read_text().splitlines()]
    held = [json.loads(x)["messages"] for x in (tmp_path / "out" / "eval.jsonl").read_text().splitlines()]
    held_texts = {m[0]["content"] for m in held}
    assert held and len(train) == 50 and all(len(m) == 1 and m[0]["role"] == "user" for m in held)
    assert "and again?" not in held_texts  # seen 60 times: never held out
    assert not any(m["content"] in held_texts for c in train for m in c if m["role"] == "user")
    assert train == [c["messages"] for c in chats if not any(m["content"] in held_texts for m in c["messages"]
                                                              if m["role"] == "user")][:50]
