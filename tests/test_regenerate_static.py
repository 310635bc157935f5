"""`regenerate --engine hf` on a static KV cache: the cache-length bucket and the padding rows never change the
text (every answer equals the target's own one-prompt generate()), rows of one batch that finish at different
steps each stop where their own generate() stops, per-record sampling is unchanged by padding rows, and the
compiled decode step gives the same text."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]
DEMO_TARGET = REPO / "examples" / "demo" / "target"



def demo_questions() -> list[str]:
    """User turns of the demo's eval set whose answers (48 new tokens at most) end at the end-of-turn token at
    steps 44, 26, 39, 25 and 36, and one that runs to the limit."""
    import json

    lines = (REPO / "examples" / "demo" / "data" / "eval.jsonl").read_text().splitlines()
    return [json.loads(lines[i])["messages"][0]["content"] for i in (0, 1, 2, 3, 6, 12)]


QUESTIONS = demo_questions()


@pytest.fixture(scope="module")
def demo_engine():
    from stages.regenerate.engines import Decoding, HFEngine

    return HFEngine(str(DEMO_TARGET), Decoding(max_new_tokens=48), device="cpu", dtype="float32", batch_size=8,
                    compile=False)


def own_generate(engine, messages, max_new_tokens) -> tuple[str, str, int]:
    """The target's own greedy generate() on one prompt, dynamic cache: (text, finish reason, tokens)."""
    ids = engine.render(messages)
    with torch.inference_mode():
        new = engine.model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                                    eos_token_id=engine.stop_ids, pad_token_id=engine.pad_id)[0, len(ids):].tolist()
    stopped = bool(new) and new[-1] in engine.stop_ids
    text = engine.tokenizer.decode(new[:-1] if stopped else new, skip_special_tokens=False)
    return text, "stop" if stopped else "length", len(new)


def answers(engine, requests) -> list[tuple[str, str, int]]:
    out = dict(engine.generate(requests))
    return [(out[i].text, out[i].finish_reason, out[i].num_tokens) for i in range(len(requests))]


def test_row_bucket_pads_to_a_power_of_two_within_the_batch_size():
    from stages.regenerate.engines import row_bucket
    from stages.static_cache import bucket

    assert [row_bucket(r, 8) for r in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]
    assert row_bucket(5, 6) == 6 and row_bucket(7, 6) == 7  # never fewer rows than asked, never over the cap
    assert [bucket(n) for n in (1, 256, 257)] == [256, 256, 512] and bucket(17, 16) == 32


def test_rows_finishing_at_different_steps_each_equal_their_own_generate(demo_engine):
    """One batch (6 rows padded to 8) where some answers end at the end-of-turn token at different steps and
    others run to max_new_tokens: every row is its own generate()'s answer, finish reason and length."""
    from stages.regenerate.engines import Request

    requests = [Request([{"role": "user", "content": q}], 0) for q in QUESTIONS]
    got = answers(demo_engine, requests)
    expected = [own_generate(demo_engine, r.messages, 48) for r in requests]
    assert got == expected
    stopped = sorted(n for _, finish, n in got if finish == "stop")
    assert len(set(stopped)) >= 2 and any(finish == "length" for _, finish, _ in got)  # really different steps


def test_cache_bucket_and_padding_rows_never_change_the_text(demo_engine, monkeypatch):
    import stages.static_cache as static_cache
    from stages.regenerate.engines import Request

    requests = [Request([{"role": "user", "content": q}], 0) for q in QUESTIONS[:5]]
    reference = answers(demo_engine, requests)  # bucket 256, 5 rows padded to 8
    runs = {}
    for name, bucket, batch, static in (("bucket 16", 16, 8, True), ("bucket 1024", 1024, 8, True),
                                        ("no padding rows", 256, 5, True), ("rows of 1", 256, 1, True),
                                        ("dynamic cache", 256, 8, False)):
        monkeypatch.setattr(static_cache, "CACHE_BUCKET", bucket)
        monkeypatch.setattr(demo_engine, "batch_size", batch)
        monkeypatch.setattr(demo_engine, "static_cache", static)
        runs[name] = answers(demo_engine, requests)
    assert all(run == reference for run in runs.values()), {k: v == reference for k, v in runs.items()}


def test_sampling_is_seeded_per_record_with_padding_rows(demo_engine, monkeypatch):
    from stages.regenerate.engines import Decoding, Request

    monkeypatch.setattr(demo_engine, "decoding", Decoding(max_new_tokens=12, temperature=3.0, top_p=0.95))
    requests = [Request([{"role": "user", "content": q}], seed) for seed, q in enumerate(QUESTIONS[:3])]
    padded = answers(demo_engine, requests)  # 3 rows + 1 padding row
    monkeypatch.setattr(demo_engine, "batch_size", 1)
    alone = answers(demo_engine, requests)
    assert padded == alone
    monkeypatch.setattr(demo_engine, "static_cache", False)
    assert answers(demo_engine, requests) == alone  # the dynamic cache draws the same tokens
    other = [Request(r.messages, r.seed + 100) for r in requests]
    assert answers(demo_engine, other) != alone


@pytest.mark.slow
def test_compiled_decode_step_gives_the_same_text(demo_engine, monkeypatch):
    from stages.regenerate.engines import Request

    requests = [Request([{"role": "user", "content": q}], 0) for q in QUESTIONS]
    eager = answers(demo_engine, requests)
    monkeypatch.setattr(demo_engine, "compile", True)
    assert answers(demo_engine, requests) == eager
    assert answers(demo_engine, requests[:3]) == eager[:3]  # 3 rows padded to 4: another compiled shape
