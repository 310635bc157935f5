"""`eagle-pipe eval --batch-size N`: batched speculative decoding on caches with per-row holes.

Each piece against an independent reference: the ragged mask written out by hand; masked attention against
PyTorch's SDPA on repeated kv heads; the ragged draft cache against each row run alone without its holes; the
batched target against a plain HF forward of each row's kept tokens; the batched loop against
`speculative_generate` one prompt at a time; the command against --batch-size 1.
"""
from __future__ import annotations

import json

import pytest
import torch

from draft_testing import random_draft as random_eagle, tiny_cfg
from test_eval_static import random_draft, target  # noqa: F401 (fixtures: the tiny Llama, a random draft)
from test_evaluate import prompts_file, run_eval  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------------------------------- attention
def test_ragged_mask_written_out():
    from eagle.attention import ragged_mask

    kept = torch.tensor([[True, True, False, True, True],
                         [False, True, True, False, True]])
    allowed = ragged_mask(kept, start=3)  # queries at slots 3 and 4
    assert allowed.shape == (2, 1, 2, 5)
    assert allowed[0, 0].tolist() == [[True, True, False, True, False],
                                      [True, True, False, True, True]]
    assert allowed[1, 0].tolist() == [[False, True, True, True, False],   # slot 3 is a hole: itself only...
                                      [False, True, True, False, True]]   # ...and never attended later


def test_masked_attention_equals_sdpa_on_repeated_kv_heads(monkeypatch):
    import torch.nn.functional as F

    from eagle import attention
    from eagle.attention import masked_attention, ragged_mask, repeat_kv

    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 6, 4, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(3, 2, 11, 8, generator=g, dtype=torch.float64) for _ in range(2))
    kept = torch.rand(3, 11, generator=g) > 0.3
    allowed = ragged_mask(kept, start=7)
    got = masked_attention(q, k, v, allowed, scale=0.3)
    want = F.scaled_dot_product_attention(q, repeat_kv(k, 6), repeat_kv(v, 6), attn_mask=allowed, scale=0.3)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    monkeypatch.setattr(attention, "MASKED_QUERY_CHUNK", 3)  # long prefills go in query blocks: same result
    torch.testing.assert_close(masked_attention(q, k, v, allowed, scale=0.3), want, rtol=1e-12, atol=1e-12)


def test_ragged_draft_cache_equals_each_row_alone_without_its_holes():
    """Two rows write the same slots but keep different entries (left padding, rejected positions); at every
    kept entry each row's logits and state equal the row run alone on a plain DraftCache over its kept entries."""
    from eagle.inference import DraftCache, RaggedDraftCache, draft_step

    cfg = tiny_cfg()
    model = random_eagle(cfg, seed=3).double()
    g = torch.Generator().manual_seed(1)
    chunks = [5, 3, 4]  # three writes of T tokens
    keep = [torch.tensor([[False, False, True, True, True], [True, True, True, True, True]]),
            torch.tensor([[True, False, False], [True, True, True]]),
            torch.tensor([[True, True, True, False], [True, False, False, False]])]
    aux = [torch.randn(2, t, 3 * cfg.target_hidden_size, generator=g, dtype=torch.float64) for t in chunks]
    ids = [torch.randint(0, cfg.vocab_size, (2, t), generator=g) for t in chunks]
    ragged = RaggedDraftCache(cfg, 2, 16, dtype=torch.float64)
    kept_pos = [0, 0]
    batched, positions = [], []
    for t, kp, a, i in zip(chunks, keep, aux, ids):
        # RoPE positions count each row's kept entries only
        pos = torch.stack([kept_pos[r] + torch.cumsum(kp[r].long(), 0) - 1 for r in range(2)]).clamp(min=0)
        ragged.keep_next(kp)
        batched.append(draft_step(model, ragged, i, a, pos, fused=False))
        positions.append(pos)
        kept_pos = [kept_pos[r] + int(kp[r].sum()) for r in range(2)]
    for r in range(2):
        alone = DraftCache(cfg, 1, 16, dtype=torch.float64)
        for (logits, out), kp, a, i, pos in zip(batched, keep, aux, ids, positions):
            sel = kp[r]
            want_logits, want_out = draft_step(model, alone, i[r:r + 1, sel], a[r:r + 1, sel], pos[r:r + 1, sel],
                                               fused=False)
            torch.testing.assert_close(logits[r:r + 1, sel], want_logits, rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(out[r:r + 1, sel], want_out, rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------------------------- target
def test_batched_target_equals_a_plain_forward_of_each_rows_kept_tokens(target):
    """Left-padded prompts, then verifications with different accepted counts per row: at each kept entry the
    logits and aux equal one plain HF forward (no cache, no mask) over the row's kept tokens."""
    from stages.evaluate.batched import BatchedTarget

    layers = (1, 4, 6)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 50, (n,), generator=g) for n in (9, 5)]
    wrapped = BatchedTarget(target, layers)
    try:
        wrapped.new_batch(2, 40)
        ids = torch.zeros(2, 9, dtype=torch.long)
        kept = torch.zeros(2, 9, dtype=torch.bool)
        for r, p in enumerate(prompts):
            ids[r, 9 - len(p):], kept[r, 9 - len(p):] = p, True
        positions = (torch.arange(9)[None] - torch.tensor([[0], [4]])).clamp(min=0)
        logits, aux = wrapped.forward(ids, positions, kept)
        rows = [[(logits[r, kept[r]], aux[r, kept[r]])] for r in range(2)]
        seqs = [p.tolist() for p in prompts]
        for counts in ([2, 4], [1, 3], [4, 1]):  # entries kept per row after each 4-token verification
            new = torch.randint(0, 50, (2, 4), generator=g)
            pos = torch.tensor([[len(s)] for s in seqs]) + torch.arange(4)
            logits, aux = wrapped.forward(new, pos)
            wrapped.keep_first(torch.tensor(counts))
            for r, c in enumerate(counts):
                rows[r].append((logits[r, :c], aux[r, :c]))
                seqs[r] += new[r, :c].tolist()
        assert wrapped.length == 9 + 4 + 3 + 4
    finally:
        wrapped.remove()
    for r in range(2):
        with torch.no_grad():
            ref = target(torch.tensor([seqs[r]]), output_hidden_states=True)
        ref_aux = torch.cat([ref.hidden_states[k] for k in layers], dim=-1)[0]
        torch.testing.assert_close(torch.cat([lg for lg, _ in rows[r]]), ref.logits[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.cat([a for _, a in rows[r]]), ref_aux, rtol=1e-5, atol=1e-5)
    # the model's own attention is back for everyone else
    assert target.config._attn_implementation != "eagle_pipe_ragged"


def test_prefill_in_groups_equals_a_plain_forward_of_each_prompt(target):
    """Five prompts prefilled two rows at a time (each group padded to its own longest), then one 3-token
    verification: every row's last-token logits, its aux at its prompt positions (zero at its holes) and the
    verification's outputs equal a plain HF forward over the row's tokens, so the cache holds the right K/V."""
    from stages.evaluate.batched import BatchedTarget

    layers = (1, 4, 6)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 50, (n,), generator=g).tolist() for n in (3, 5, 6, 9, 11)]
    width = 11
    wrapped = BatchedTarget(target, layers)
    try:
        wrapped.new_batch(5, 30)
        last_logits, aux = wrapped.prefill(prompts, width, rows_per_forward=2)
        new = torch.randint(0, 50, (5, 3), generator=g)
        pos = torch.tensor([[len(p)] for p in prompts]) + torch.arange(3)
        logits, aux_new = wrapped.forward(new, pos)
    finally:
        wrapped.remove()
    for r, p in enumerate(prompts):
        with torch.no_grad():
            ref = target(torch.tensor([p + new[r].tolist()]), output_hidden_states=True)
        ref_aux = torch.cat([ref.hidden_states[k] for k in layers], dim=-1)[0]
        n = len(p)
        torch.testing.assert_close(last_logits[r], ref.logits[0, n - 1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(aux[r, width - n:], ref_aux[:n], rtol=1e-5, atol=1e-5)
        assert not aux[r, :width - n].any()
        torch.testing.assert_close(logits[r], ref.logits[0, n:], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(aux_new[r], ref_aux[n:], rtol=1e-5, atol=1e-5)


def test_only_full_attention_targets_batch(target):
    from transformers import MistralConfig, MistralForCausalLM

    from stages.evaluate.batched import BatchedTarget, Unbatchable, supports_batched

    sliding = MistralForCausalLM(MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                               sliding_window=6)).eval()
    assert supports_batched(target) and not supports_batched(sliding)
    with pytest.raises(Unbatchable, match="full attention"):
        BatchedTarget(sliding, (0, 1))


# ----------------------------------------------------------------------------------------------- the loop
@pytest.mark.parametrize("prefill_rows", [8, 2])
def test_batched_loop_equals_one_prompt_at_a_time(target, random_draft, prefill_rows, monkeypatch):
    """Prompts of different lengths, several K: the same tokens and the same accepted counts per round as
    `speculative_generate` on each prompt alone (the batch-1 path, itself tested against recomputations)."""
    from eagle.export import load_draft
    from stages.evaluate.batched import BatchedTarget, speculative_generate_batch
    from stages.evaluate.speculative import TargetWithAux, greedy_generate, speculative_generate

    from stages.evaluate import batched as batched_mod

    monkeypatch.setattr(batched_mod, "PREFILL_ROWS", prefill_rows)  # 2: the prompts go through in groups
    draft = load_draft(random_draft, embed_weight=target.get_input_embeddings().weight.detach())
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 50, (n,), generator=g).tolist() for n in (7, 19, 12, 3)]
    eos = [int(target.config.eos_token_id)]
    alone, batched = TargetWithAux(target, draft.cfg.aux_layer_ids), BatchedTarget(target, draft.cfg.aux_layer_ids)
    try:
        for k in (1, 3):
            got, seconds = speculative_generate_batch(batched, draft, prompts, max_new_tokens=24, draft_tokens=k,
                                                      eos_ids=eos, pad_id=0)
            want = [speculative_generate(alone, draft, p, max_new_tokens=24, draft_tokens=k, eos_ids=eos)
                    for p in prompts]
            assert [r.tokens for r in got] == [r.tokens for r in want]
            assert [r.accepted for r in got] == [r.accepted for r in want]
            assert seconds > 0
        greedy = [greedy_generate(target, p, max_new_tokens=24, eos_ids=eos, pad_id=0)[0] for p in prompts]
        assert [r.tokens for r in got] == greedy
    finally:
        alone.remove(), batched.remove()


def test_finished_rows_leave_the_batch_and_change_nothing(target, random_draft, monkeypatch):
    """An eos that one prompt's greedy answer reaches early: its row finishes first and leaves the batch (the caches
    keep the other rows, in order); every prompt still gets what it gets alone."""
    from eagle.export import load_draft
    from stages.evaluate import batched as batched_mod
    from stages.evaluate.batched import BatchedTarget, speculative_generate_batch
    from stages.evaluate.speculative import TargetWithAux, greedy_generate, speculative_generate

    draft = load_draft(random_draft, embed_weight=target.get_input_embeddings().weight.detach())
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 50, (n,), generator=g).tolist() for n in (8, 15, 4, 11, 6)]
    first = greedy_generate(target, prompts[0], max_new_tokens=24, eos_ids=[], pad_id=0)[0]
    eos = [first[2]]  # prompt 0 stops after at most 3 new tokens; the others whenever they meet that token
    assert batched_mod.FINISHED_ROWS_LEAVE  # the default: a row leaves as soon as it finishes
    alone, batched = TargetWithAux(target, draft.cfg.aux_layer_ids), BatchedTarget(target, draft.cfg.aux_layer_ids)
    sizes = []
    keep_rows = BatchedTarget.keep_rows
    monkeypatch.setattr(BatchedTarget, "keep_rows", lambda self, rows: (sizes.append(len(rows)),
                                                                         keep_rows(self, rows)))
    try:
        got, _ = speculative_generate_batch(batched, draft, prompts, max_new_tokens=24, draft_tokens=3,
                                            eos_ids=eos, pad_id=0)
        want = [speculative_generate(alone, draft, p, max_new_tokens=24, draft_tokens=3, eos_ids=eos)
                for p in prompts]
    finally:
        alone.remove(), batched.remove()
    assert sizes and sizes[0] < len(prompts) and sizes == sorted(sizes, reverse=True)
    assert [r.tokens for r in got] == [r.tokens for r in want]
    assert [r.accepted for r in got] == [r.accepted for r in want]
    assert len(got[0].tokens) <= 3 and got[0].tokens[-1] == eos[0]


# ----------------------------------------------------------------------------------------------- the command
def test_batch_size_reports_what_batch_one_reports(tiny_llama, random_draft, prompts_file, target):
    """--batch-size 3: the same turns, acceptances and losslessness as --batch-size 1, with speeds measured
    at batch 3 on both sides."""
    common = ["--target", tiny_llama, "--draft", random_draft, "--data", prompts_file, "--max-new-tokens", 12,
              "--no-compile", "--json"]
    code, output, alone = run_eval(*common)
    assert code == 0, output
    code, output, batched = run_eval(*common, "--batch-size", 3)
    assert code == 0, output
    assert batched["lossless"] is True and batched["timing"]["rerun_alone"] == 0
    assert batched["timing"]["batched_speculative"] is True and batched["batch_size"] == 3
    assert [(r["question"], r["turn"], r["accepted"]) for r in batched["per_prompt"]] == \
        [(r["question"], r["turn"], r["accepted"]) for r in alone["per_prompt"]]
    assert batched["acceptance_length"] == alone["acceptance_length"]
    assert batched["speedup"] > 0 and batched["timing"]["seconds_per_target_forward"] is None
    assert all(g["speedup"] is None for g in batched["per_category"].values())  # no per-turn timing batched
    code, output, _ = run_eval(*common[:-1], "--batch-size", 3)
    assert code == 0 and "batch size" in output


def test_a_batched_row_that_differs_is_decided_alone(tiny_llama, random_draft, prompts_file, monkeypatch):
    """A batched reference row that differs from the speculative output (another float rounding) sends the turn
    to be decided alone, as --batch-size 1 decides it: never read as a lossy draft, always counted."""
    import stages.evaluate.speculative as spec

    real_batch = spec.greedy_generate_batch

    def corrupt(*args, **kwargs):
        rows, seconds = real_batch(*args, **kwargs)
        return [[(t + 1) % 50 for t in row] for row in rows], seconds

    monkeypatch.setattr(spec, "greedy_generate_batch", corrupt)
    code, output, report = run_eval("--target", tiny_llama, "--draft", random_draft, "--data", prompts_file,
                                    "--max-new-tokens", 12, "--no-compile", "--json", "--batch-size", 2)
    assert code == 0, output
    assert report["lossless"] is True and report["timing"]["rerun_alone"] == report["num_turns"]


def test_broken_verifier_is_caught_batched(tiny_llama, random_draft, prompts_file, monkeypatch, tmp_path):
    import stages.evaluate.speculative as spec

    def accept_everything(logits, draft_ids):  # wrong: never compares with the target
        return len(draft_ids), int(logits[-1].argmax())

    monkeypatch.setattr(spec, "verify_draft", accept_everything)
    saved = tmp_path / "reports" / "eval.json"
    code, output, report = run_eval("--target", tiny_llama, "--draft", random_draft, "--data", prompts_file,
                                    "--max-new-tokens", 16, "--json", "--no-compile", "--batch-size", 4,
                                    "--report", saved)
    assert code == 2 and report["lossless"] is False
    assert "differs from the target's greedy generate()" in output
    assert json.loads(saved.read_text()) == report  # --report: written before the failed check exits


def test_unbatchable_target_decodes_its_speculative_runs_one_at_a_time(tiny_llama, random_draft, prompts_file,
                                                                       monkeypatch):
    """A target that cannot batch its speculative runs decodes them one at a time (references still batched)."""
    import stages.evaluate.batched as batched

    monkeypatch.setattr(batched, "supports_batched", lambda model: False)
    code, output, report = run_eval("--target", tiny_llama, "--draft", random_draft, "--data", prompts_file,
                                    "--max-new-tokens", 12, "--no-compile", "--json", "--batch-size", 2)
    assert code == 0, output
    assert report["batch_size"] == 2 and report["timing"]["batched_speculative"] is False
    assert report["lossless"] is True and report["timing"]["rerun_alone"] == 0


# ----------------------------------------------------------------------------------------------- the bench
def test_eval_batch_bench_counts_the_rows_it_computes(tiny_llama, random_draft, prompts_file, capsys):
    """bench/perf/eval_batch.py: every arm decodes the same tokens; with rows leaving, fewer row-rounds are computed
    for the same used ones, and never fewer than used."""
    from bench.perf import eval_batch

    report = eval_batch.main(["--target", str(tiny_llama), "--draft", str(random_draft), "--data",
                              str(prompts_file), "--batch-size", "4", "--max-new-tokens", "12", "--arms", "stay,leave"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == report
    stay, leave = report["arms"]
    assert stay["new_tokens"] == leave["new_tokens"] and stay["row_rounds_used"] == leave["row_rounds_used"]
    assert stay["row_rounds"] == stay["rounds"] * report["batch_size"]
    assert leave["row_rounds_used"] <= leave["row_rounds"] <= stay["row_rounds"]
    assert report["prompt_tokens"] <= report["prefill_positions"] <= report["padded_prompt_tokens"]
