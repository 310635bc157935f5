"""`eagle-pipe eval`: prompt rendering, the target's aux features, the speculative loop against independent
recomputations, acceptance of random and trained drafts, and the lossless check catching a broken verifier."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from draft_testing import check_rounds_against_recomputation
from stages.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPT_RECORDS = [
    {"messages": [{"role": "system", "content": "You are terse."},
                  {"role": "user", "content": "What does a for loop do?"},
                  {"role": "assistant", "content": "It iterates."},
                  {"role": "user", "content": "And while?"}]},
    {"text": "plain text has no user turn"},
    {"conversations": [{"from": "human", "value": "What is a tuple?"},
                       {"from": "gpt", "value": "An immutable sequence."}]},
    {"messages": [{"role": "user", "content": "Explain the with statement."}]},
    {"messages": [{"role": "user", "content": "How do I raise an exception?"},
                  {"role": "assistant", "content": "Use raise."}]},
]
# What each usable record's prompt must be (written out by hand, not computed by the code under test).
EXPECTED_PROMPT_TURNS = [
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What does a for loop do?"}],
    [{"role": "user", "content": "What is a tuple?"}],
    [{"role": "user", "content": "Explain the with statement."}],
    [{"role": "user", "content": "How do I raise an exception?"}],
]


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("eval_data") / "prompts.jsonl", PROMPT_RECORDS)


@pytest.fixture(scope="module")
def target(tiny_llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_llama)


def make_random_draft(target_dir: Path, out_dir: Path, seed: int = 0) -> Path:
    """A randomly initialised Eagle3Draft with a non-trivial draft vocab (d2t offsets), exported."""
    from safetensors.torch import load_file

    from eagle.config import DraftConfig
    from eagle.export import export_draft
    from eagle.model import Eagle3Draft
    from eagle.vocab import build_vocab_map

    tcfg = json.loads((target_dir / "config.json").read_text())
    cfg = DraftConfig.from_target_config(tcfg, draft_vocab_size=tcfg["vocab_size"] // 2, ttt_steps=3)
    torch.manual_seed(seed)
    draft = Eagle3Draft(cfg)
    weights = load_file(str(target_dir / "model.safetensors"))
    embed = next(v for k, v in weights.items() if k.endswith("embed_tokens.weight"))
    counts = torch.randint(0, 100, (cfg.vocab_size,), generator=torch.Generator().manual_seed(seed))
    d2t, t2d = build_vocab_map(counts, cfg.draft_vocab_size)
    draft.init_from_target({"embed_tokens.weight": embed}, d2t, t2d, init_lm_head=False)
    return export_draft(draft, out_dir)


@pytest.fixture(scope="module")
def random_draft(tiny_llama, tmp_path_factory) -> Path:
    return make_random_draft(tiny_llama, tmp_path_factory.mktemp("random_draft") / "export")


def run_eval(*args) -> tuple[int, str, dict | None]:
    result = CliRunner().invoke(main, ["eval", *map(str, args)])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    report = None
    for line in result.stdout.splitlines():  # stdout only: the progress bar goes to stderr
        if line.startswith("{"):
            report = json.loads(line)
    return result.exit_code, result.output, report


# ----------------------------------------------------------------------------------------------- prompts
def test_prompts_are_conversations_up_to_the_first_user_turn(target, prompts_file):
    from stages.evaluate.stage import load_prompts, render_prompt
    from stages.data.records import summarize_skips

    _, tokenizer = target
    questions, skipped = load_prompts([str(prompts_file)], tokenizer, None)
    prompts = [(q.where, render_prompt(tokenizer, q.conversation([]), q.where)) for q in questions]
    expected = [tokenizer.apply_chat_template(t, add_generation_prompt=True, tokenize=True,
                                              return_dict=True)["input_ids"] for t in EXPECTED_PROMPT_TURNS]
    assert [ids for _, ids in prompts] == expected
    assert [where for where, _ in prompts] == [f"{prompts_file}:{n}" for n in (1, 3, 4, 5)]
    assert summarize_skips(skipped) == {"no_user_turn": 1}
    text = tokenizer.decode(prompts[0][1])
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n") and "It iterates" not in text
    limited, _ = load_prompts([str(prompts_file)], tokenizer, 2)
    assert [q.where for q in limited] == [where for where, _ in prompts[:2]]


# ----------------------------------------------------------------------------------------------- target
def test_aux_features_equal_hf_hidden_states_with_and_without_cache(target):
    from transformers import DynamicCache

    from stages.evaluate.speculative import TargetWithAux, crop_target_cache

    model, _ = target
    ids = torch.randint(0, model.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(0))
    layers = (2, 4, 5)
    with torch.no_grad():
        ref = model(ids, output_hidden_states=True)
    ref_aux = torch.cat([ref.hidden_states[k] for k in layers], dim=-1)  # (1, 20, 3H), HF hidden_states[k]
    wrapped = TargetWithAux(model, (5, 2, 4))  # any order in; ascending layer order out
    try:
        cache = DynamicCache(config=model.config)
        logits_a, aux_a = wrapped.forward(ids[:, :12], cache)
        _, junk = wrapped.forward(ids[:, 12:15] + 1, cache)  # rejected drafts, then cropped away
        crop_target_cache(cache, 12)
        logits_b, aux_b = wrapped.forward(ids[:, 12:], cache)
    finally:
        wrapped.remove()
    torch.testing.assert_close(torch.cat([aux_a, aux_b], 1), ref_aux, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([logits_a, logits_b], 1), ref.logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="outside"):
        TargetWithAux(model, (2, 4, model.config.num_hidden_layers))


def test_verify_draft_accepts_the_agreeing_prefix_and_adds_the_bonus():
    from stages.evaluate.speculative import verify_draft

    logits = torch.full((4, 10), -1.0)
    for row, tok in enumerate([7, 3, 5, 9]):  # the target's greedy token after each input
        logits[row, tok] = 1.0
    assert verify_draft(logits, [7, 3, 5]) == (3, 9)
    assert verify_draft(logits, [7, 4, 5]) == (1, 3)
    assert verify_draft(logits, [1, 3, 5]) == (0, 7)


# ----------------------------------------------------------------------------------------------- draft loop
def _fresh_proposals(model, draft, seq: list[int], L: int, K: int, aux_ids) -> list[int]:
    """What the draft proposes after verified x_0..x_{L-1} and bonus x_L, recomputed from scratch: a full
    target forward (HF hidden_states) and one draft prefill over positions 0..L-1, no incremental caches."""
    from eagle.inference import DraftCache, draft_step

    with torch.no_grad():
        hs = model(torch.tensor([seq[:L]]), output_hidden_states=True).hidden_states
    feats = torch.cat([hs[k] for k in sorted(aux_ids)], dim=-1)  # (1, L, 3H)
    cache = DraftCache(draft.cfg, 1, L + K)
    logits, out = draft_step(draft, cache, torch.tensor([seq[1:L + 1]]), feats, torch.arange(L)[None], fused=False)
    proposal = [int(draft.draft_to_target(logits[0, -1].argmax()))]
    h = out[:, -1:]
    for j in range(1, K):
        logits, h = draft_step(draft, cache, torch.tensor([[proposal[-1]]]), h, torch.tensor([[L - 1 + j]]),
                               fused=True)
        proposal.append(int(draft.draft_to_target(logits[0, -1].argmax())))
    return proposal


def test_speculative_loop_drafts_what_a_from_scratch_recomputation_drafts(target, random_draft, monkeypatch):
    import stages.evaluate.speculative as spec
    from eagle.export import load_draft

    model, tokenizer = target
    draft = load_draft(random_draft, embed_weight=model.get_input_embeddings().weight.detach())
    K = 3
    check_rounds_against_recomputation(
        monkeypatch, model, tokenizer, draft, spec.speculative_generate,
        lambda seq, L: _fresh_proposals(model, draft, seq, L, K, draft.cfg.aux_layer_ids), draft_tokens=K)


# ----------------------------------------------------------------------------------------------- the command
def test_random_draft_accepts_about_one_token_and_is_lossless(tiny_llama, random_draft, prompts_file):
    code, output, report = run_eval("--target", tiny_llama, "--draft", random_draft, "--data", prompts_file,
                                    "--max-new-tokens", 24, "--draft-tokens", 3, "--json")
    assert code == 0, output
    assert report["lossless"] is True and report["mismatches"] == []
    assert report["num_prompts"] == 4 and report["skipped_records"] == {"no_user_turn": 1}
    assert 1.0 <= report["acceptance_length"] < 1.15
    assert report["acceptance_length"] == pytest.approx(1 + sum(report["per_position_acceptance"]))
    assert report["new_tokens"] == report["baseline_new_tokens"] > 0
    assert report["tokens_per_s"] > 0 and report["baseline_tokens_per_s"] > 0


def test_broken_verifier_is_caught_by_the_lossless_check(tiny_llama, random_draft, prompts_file, monkeypatch):
    import stages.evaluate.speculative as spec

    def accept_everything(logits, draft_ids):  # wrong: never compares with the target
        return len(draft_ids), int(logits[-1].argmax())

    monkeypatch.setattr(spec, "verify_draft", accept_everything)
    code, output, report = run_eval("--target", tiny_llama, "--draft", random_draft, "--data", prompts_file,
                                    "--max-new-tokens", 16, "--json")
    assert code == 2
    assert report["lossless"] is False and report["mismatches"][0]["prompt"] == 0
    assert f"prompt 0 ({prompts_file}:1) differs from the target's greedy generate()" in output
    assert "Traceback" not in output


def test_table_output_and_bad_inputs(tiny_llama, random_draft, prompts_file, tmp_path):
    code, output, _ = run_eval("--target", tiny_llama, "--draft", random_draft, "--data", prompts_file,
                               "--num-prompts", 1, "--max-new-tokens", 8)
    assert code == 0, output
    assert "acceptance length" in output and "lossless" in output and "yes" in output
    code, output, _ = run_eval("--target", tiny_llama, "--draft", tmp_path, "--data", prompts_file)
    assert code == 2 and "not an exported draft" in output
    no_prompts = write_jsonl(tmp_path / "text.jsonl", [{"text": "no user turn here"}])
    code, output, _ = run_eval("--target", tiny_llama, "--draft", random_draft, "--data", no_prompts)
    assert code == 2 and "no record with a user turn" in output


# ----------------------------------------------------------------------------------------------- trained draft
@pytest.fixture(scope="module")
def own_generations_dump(tiny_llama, target, tmp_path_factory):
    """A dump of the target's own greedy generations, and their prompts.

    The records are pre-tokenized (prompt + greedy continuation, loss on the continuation), so the dump holds
    exactly the trajectories the target produces. Drafts trained on it are then evaluated on those same
    prompts: this tests that `eval` measures a good draft as good (in-sample), not how well a draft generalises.
    """
    from conftest import corpus_text

    model, tokenizer = target
    root = tmp_path_factory.mktemp("trained_draft")
    words = " ".join(corpus_text(20_000)).split()
    prompts, records = [], []
    for i in range(32):
        turns = [{"role": "user", "content": " ".join(words[7 * i: 7 * i + 6])}]
        prompts.append({"messages": turns})
        ids = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=True,
                                            return_dict=True)["input_ids"]
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)[0].tolist()
        records.append({"input_ids": out, "loss_mask": [0] * len(ids) + [1] * (len(out) - len(ids))})
    write_jsonl(root / "train.jsonl", records)
    write_jsonl(root / "prompts.jsonl", prompts)
    runner = CliRunner()
    result = runner.invoke(main, ["dump-teacher", "--target", str(tiny_llama), "--data", str(root / "train.jsonl"),
                                  "--out", str(root / "dump"), "--top-k", "8", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    return root / "dump", root / "prompts.jsonl"


def train_on(dump: Path, run: Path, steps: int, *extra: str) -> Path:
    result = CliRunner().invoke(main, ["train", "--teacher-dir", str(dump), "--out", str(run), "--seq-len", "256",
                                       "--batch-size", "4", "--max-steps", str(steps), "--lr", "2e-2",
                                       "--warmup-steps", "10", "--ttt-steps", "3", "--eval-fraction", "0",
                                       "--eval-every", "0", "--save-every", "0", "--num-workers", "1",
                                       "--no-compile", "--device", "cpu", *extra])
    assert result.exit_code == 0, result.output
    return run


@pytest.fixture(scope="module")
def trained_draft(own_generations_dump):
    """A real Eagle3Draft trained by the train stage on the target's own generations."""
    dump, prompts = own_generations_dump
    return train_on(dump, dump.parent / "run", 400), prompts


def test_trained_draft_accepts_well_above_one_and_is_lossless(tiny_llama, trained_draft, random_draft):
    run, prompts = trained_draft
    common = ["--target", tiny_llama, "--data", prompts, "--num-prompts", 6, "--max-new-tokens", 32, "--json"]
    code, output, trained = run_eval("--draft", run / "export", "--run-dir", run, *common)
    assert code == 0, output
    code, output, random = run_eval("--draft", random_draft, *common)
    assert code == 0, output
    assert trained["lossless"] and random["lossless"]
    assert trained["acceptance_length"] > 1.6 > 1.15 > random["acceptance_length"]
    assert trained["per_position_acceptance"][0] > 0.4
    # batched (rows accept different counts each round: the ragged caches), the same rounds as one at a time
    code, output, batched = run_eval("--draft", run / "export", "--batch-size", 4, *common)
    assert code == 0, output
    assert batched["lossless"] and batched["timing"]["rerun_alone"] == 0
    assert [r["accepted"] for r in batched["per_prompt"]] == [r["accepted"] for r in trained["per_prompt"]]
    # the training-time estimate is read from RUN and recomputed from its per-step accuracies
    summary = json.loads((run / "train_summary.json").read_text())
    acc = summary["final_metrics"]["acc"]
    assert trained["simulated_acceptance_length"] == pytest.approx(1 + acc[0] + acc[0] * acc[1]
                                                                   + acc[0] * acc[1] * acc[2])


def test_trained_eagle31_draft_exports_the_switches_and_evaluates_lossless(tiny_llama, own_generations_dump,
                                                                          random_draft):
    """`train --draft-arch eagle3.1` -> export -> `eval`: the 3.1 draft (fc_norm, post-norm feedback) drafts by
    the exported switches, stays lossless and accepts clearly more than a random draft after a short run."""
    dump, prompts = own_generations_dump
    run = train_on(dump, dump.parent / "run31", 150, "--draft-arch", "eagle3.1")
    exported = json.loads((run / "export" / "config.json").read_text())
    assert exported["fc_norm"] is True and exported["norm_output"] is True
    common = ["--target", tiny_llama, "--data", prompts, "--num-prompts", 6, "--max-new-tokens", 32, "--json"]
    code, output, v31 = run_eval("--draft", run / "export", "--run-dir", run, *common)
    assert code == 0, output
    code, output, random = run_eval("--draft", random_draft, *common)
    assert code == 0, output
    assert v31["lossless"] and v31["mismatches"] == []
    assert v31["acceptance_length"] > 1.4 > 1.15 > random["acceptance_length"], (v31, random)


def test_simulated_acceptance_reads_what_train_writes(tmp_path):
    """RUN/train_summary.json's held-out final_eval.eval_acc, else final_metrics.acc; before the summary, the last
    metrics.jsonl line; a run written any other way is refused in one line saying what to do."""
    from stages.errors import StageError
    from stages.evaluate.report import simulated_acceptance_from_run

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "acc": [0.9, 0.9]}) + "\n"
                                       + json.dumps({"step": 2, "eval_acc": [0.5, 0.4]}) + "\n")
    assert simulated_acceptance_from_run(run, 2) == pytest.approx(1 + 0.5 + 0.5 * 0.4)
    summary = {"final_metrics": {"acc": [0.8, 0.5, 0.5]}, "final_eval": {}}
    (run / "train_summary.json").write_text(json.dumps(summary))
    assert simulated_acceptance_from_run(run, 3) == pytest.approx(1 + 0.8 + 0.4 + 0.2)
    summary["final_eval"] = {"eval_acc": [0.6, 0.5, 0.5]}
    (run / "train_summary.json").write_text(json.dumps(summary))
    assert simulated_acceptance_from_run(run, 1) == pytest.approx(1.6)
    (run / "train_summary.json").write_text(json.dumps({"final": {"accuracy": [0.6]}}))  # not train's keys
    with pytest.raises(StageError, match="no final_eval.eval_acc or final_metrics.acc.*re-run train"):
        simulated_acceptance_from_run(run, 1)
    with pytest.raises(StageError, match="is this a train run directory"):
        simulated_acceptance_from_run(tmp_path / "empty", 1)
