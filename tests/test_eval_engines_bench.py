"""bench/perf/eval_engines.py: the side-by-side of two eval reports says where outputs first differ and whether
the verification steps agreed up to there (fake reports written here, no model)."""
from __future__ import annotations

from bench.perf.eval_engines import compare_reports


def report(outputs, accepted, al):
    rows = [{"question": i, "turn": 1, "output_tokens": o, "accepted": a} for i, (o, a) in enumerate(zip(outputs, accepted))]
    return {"per_prompt": rows, "acceptance_length": al, "per_position_acceptance": [0.5], "target_forwards": 3,
            "per_position_conditional": [0.5], "tokens_per_s": 1.0, "baseline_tokens_per_s": 1.0, "speedup": 1.0,
            "lossless": True, "per_category": {"writing": {"acceptance_length": al}},
            "vllm": {"counters": {"vllm:spec_decode_num_drafts": 3}}}


def test_first_difference_and_the_steps_before_it():
    hf = report([[1, 2, 3, 4, 5, 6], [7, 8]], [[1, 0, 1], [0]], 1.5)
    served = report([[1, 2, 3, 4, 9, 6], [7, 8]], [[1, 0, 0, 0], [0]], 1.25)
    got = compare_reports(hf, served)
    assert got["turns"] == 2 and got["identical_outputs"] == 1 and got["identical_with_same_steps"] == 1
    (diff,) = got["different"]
    # tokens 1 (prefill), 2-3 (step 1: one accepted + bonus), 4 (step 2) come before the difference at index 4
    assert diff["first_difference"] == 4 and (diff["hf_token"], diff["vllm_token"]) == (5, 9)
    assert diff["steps_agree_before"] is True
    assert got["acceptance_length_gap"] == 1.25 / 1.5 - 1
    assert got["per_category"] == {"writing": {"hf": 1.5, "vllm": 1.25}}
