"""bench/tools/heldout.py: the held-out simulated acceptance of an exported draft, scored from a teacher dump alone,
equals what `eagle-pipe train --eval-teacher-dir` measured on the same dump with the draft still in memory (a
second code path: the model built by train from the dump, not the export reloaded with the embedding that
bench/tools/heldout.py reads from the dump's target/ directory). TTT's equality with chain drafting is tested in
tests/test_ttt.py."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from bench.tools import heldout
from stages.cli import main
from train_dumps import cached_dump

pytestmark = pytest.mark.usefixtures("one_torch_thread")



def test_heldout_score_of_the_export_equals_trains_own_heldout_eval(tmp_path_factory, tiny_llama, tmp_path):
    train_dump = cached_dump(tmp_path_factory, "llama-100", tiny_llama, records=100)
    eval_dump = cached_dump(tmp_path_factory, "llama-heldout-heldout", tiny_llama, records=12)
    run = tmp_path / "run"
    result = CliRunner().invoke(main, [
        "train", "--teacher-dir", str(train_dump), "--eval-teacher-dir", str(eval_dump), "--out", str(run),
        "--seq-len", "128", "--batch-size", "2", "--ttt-steps", "3", "--draft-vocab-size", "256",
        "--max-steps", "12", "--lr", "3e-3", "--warmup-steps", "2", "--no-compile", "--num-workers", "1",
        "--precision", "fp32"])
    assert result.exit_code == 0, result.output
    final = json.loads((run / "train_summary.json").read_text())["final_eval"]

    scored = heldout.score(str(run / "export"), eval_dump, ttt_steps=3, seq_len=128, batch_size=2)
    assert scored["format"] == "eagle-pipe" and scored["positions"] == final["eval_positions"]
    assert scored["accuracy"] == pytest.approx(final["eval_acc"], abs=1e-4)
    assert scored["simulated_acceptance_length"] == pytest.approx(final["eval_acceptance_length"], abs=1e-3)
    assert max(scored["accuracy"]) > 0  # it learned something, so the equality is not 0 == 0
    assert scored["accuracy"][0] <= scored["vocab_coverage"] <= 1  # a token outside the vocabulary is never drafted


def test_vocab_coverage_counts_supervised_greedy_tokens_in_the_draft_vocabulary(tmp_path_factory, tiny_llama):
    """bench/tools/heldout.py's coverage against a loop over sequences and tokens, on a dump and two vocabularies."""
    import torch

    from stages.shards import iter_parts, load_part

    dump = cached_dump(tmp_path_factory, "llama-heldout-heldout", tiny_llama, records=12)
    parts = [load_part(p) for p in iter_parts(dump)]
    vocab = int(parts[0]["teacher_topk_ids"].max()) + 100
    pairs = []  # (greedy token predicted for a supervised token, from the position before, in the same sequence)
    for part in parts:
        cu = part["cu_seqlens"].tolist()
        for s in range(len(cu) - 1):
            for i in range(cu[s] + 1, cu[s + 1]):
                if part["loss_mask"][i]:
                    pairs.append(int(part["teacher_topk_ids"][i - 1, 0]))
    common = torch.tensor(pairs).bincount(minlength=vocab).argmax()
    for t2d in (torch.ones(vocab, dtype=torch.bool), torch.arange(vocab) == common):
        want = sum(bool(t2d[g]) for g in pairs) / len(pairs)
        assert heldout.vocab_coverage(dump, t2d) == pytest.approx(want)
    assert 0 < heldout.vocab_coverage(dump, torch.arange(vocab) == common) < 1
