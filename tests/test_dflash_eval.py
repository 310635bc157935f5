"""`eagle-pipe eval` with a DFlash draft: block drafting per round (stages/evaluate/dflash_decoding.py) equals a
from-scratch recomputation, a trained draft accepts well above a random one and stays lossless, a broken verifier
is caught, and another K or a batch is refused in one line."""
from __future__ import annotations

import json

import pytest
import torch

from test_evaluate import own_generations_dump, run_eval, target, train_on  # noqa: F401 (fixtures)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DFLASH = ["--draft-arch", "dflash", "--block-size", "4", "--draft-layers", "2", "--anchors-per-row", "64"]


@pytest.fixture(scope="module")
def dflash_runs(own_generations_dump):
    """(trained run, 1-step run, prompts): DFlash drafts trained by the train stage on the target's own answers."""
    dump, prompts = own_generations_dump
    trained = train_on(dump, dump.parent / "dflash", 300, *DFLASH, "--lr", "5e-3")
    barely = train_on(dump, dump.parent / "dflash-1", 1, *DFLASH)
    return trained, barely, prompts


def fresh_proposal(model, draft, seq: list[int], L: int) -> list[int]:
    """The block drafted for verified tokens seq[:L+1] from nothing: a plain HF forward for the aux states of
    positions 0..L-1 (hidden_states[k] = the input of layer k), a new context, one block."""
    from eagle.dflash import DFlashContext, draft_block

    with torch.no_grad():
        hidden = model(torch.tensor([seq[:L]]), output_hidden_states=True).hidden_states
        aux = torch.cat([hidden[k] for k in draft.cfg.aux_layer_ids], dim=-1)
        context = DFlashContext(draft)
        context.extend(aux)
        return draft_block(draft, context, seq[L])[1:].argmax(-1).tolist()


def test_dflash_loop_drafts_what_a_from_scratch_recomputation_drafts(target, dflash_runs, monkeypatch):
    from draft_testing import check_rounds_against_recomputation
    from stages.evaluate.dflash_decoding import dflash_speculative_generate, load_dflash_for

    model, tokenizer = target
    run, _, _ = dflash_runs
    draft = load_dflash_for(model, run / "export", "cpu")
    check_rounds_against_recomputation(monkeypatch, model, tokenizer, draft, dflash_speculative_generate,
                                       lambda seq, L: fresh_proposal(model, draft, seq, L), draft_tokens=3)


def test_trained_dflash_draft_accepts_well_and_is_lossless(tiny_llama, dflash_runs):
    run, barely, prompts = dflash_runs
    common = ["--target", tiny_llama, "--data", prompts, "--num-prompts", 6, "--max-new-tokens", 32, "--json"]
    code, output, trained = run_eval("--draft", run / "export", "--run-dir", run, *common)
    assert code == 0, output
    code, output, untrained = run_eval("--draft", barely / "export", *common)
    assert code == 0, output
    assert trained["lossless"] and untrained["lossless"]
    assert trained["draft_tokens"] == 3 and trained["draft_format"] == "dflash"  # K = block - 1 by default
    assert trained["acceptance_length"] > 1.5 > 1.15 > untrained["acceptance_length"], \
        (trained["acceptance_length"], untrained["acceptance_length"])
    assert all(a > 0 for a in trained["per_position_acceptance"])
    acc = json.loads((run / "train_summary.json").read_text())["final_metrics"]["acc"]
    assert trained["simulated_acceptance_length"] == pytest.approx(1 + acc[0] + acc[0] * acc[1]
                                                                   + acc[0] * acc[1] * acc[2])


def test_broken_verifier_is_caught_with_a_dflash_draft(tiny_llama, dflash_runs, monkeypatch):
    import stages.evaluate.speculative as spec

    run, _, prompts = dflash_runs
    monkeypatch.setattr(spec, "verify_draft", lambda logits, ids: (len(ids), int(logits[-1].argmax())))
    code, output, report = run_eval("--target", tiny_llama, "--draft", run / "export", "--data", prompts,
                                    "--num-prompts", 2, "--max-new-tokens", 16, "--json")
    assert code == 2 and report["lossless"] is False and "differs from the target's greedy generate()" in output


def test_another_k_or_a_batch_is_refused_in_one_line(tiny_llama, dflash_runs):
    run, _, prompts = dflash_runs
    common = ["--target", tiny_llama, "--draft", run / "export", "--data", prompts, "--num-prompts", 1]
    code, output, _ = run_eval(*common, "--draft-tokens", 5)
    assert code == 2 and output.strip().splitlines()[-1] == (
        f"Error: --draft-tokens 5: {run / 'export'} is a DFlash draft of block 4, which drafts K = 3 tokens per "
        "round (another K changes every slot's output under its bidirectional attention); leave --draft-tokens "
        "out or pass 3")
    code, output, report = run_eval(*common, "--draft-tokens", 3, "--max-new-tokens", 4, "--json")
    assert code == 0 and report["draft_tokens"] == 3
    code, output, _ = run_eval(*common, "--batch-size", 2)
    assert code == 2 and "the HF engine decodes a DFlash draft one turn at a time" in output
    assert "Traceback" not in output
