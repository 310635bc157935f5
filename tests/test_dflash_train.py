"""`eagle-pipe train --draft-arch dflash` end to end on a real tiny dump: it learns, exports vLLM's DFlash layout
(loadable back, equal to the checkpoint), resumes bitwise after kill -9, and the loader's anchors and counts are
what the loss counts, whatever the split over micro-batches."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from stages.cli import main
from stages.train import checkpoint as ckpt
from train_dumps import cached_dump
from test_run import demo  # noqa: F401 (fixture)
from train_helpers import straight_and_resumed

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BASE = ["--draft-arch", "dflash", "--block-size", "4", "--draft-layers", "2", "--anchors-per-row", "32",
        "--seq-len", "128", "--batch-size", "2", "--warmup-steps", "3", "--no-compile", "--num-workers", "1",
        "--eval-fraction", "0.1"]


@pytest.fixture(scope="module")
def dump(tmp_path_factory, tiny_llama):
    return cached_dump(tmp_path_factory, "llama-100", tiny_llama, records=100)


def train(args: list[str], expect_ok: bool = True):
    result = CliRunner().invoke(main, ["train", *BASE, *args])
    if expect_ok:
        assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def test_dflash_trains_exports_and_announces_itself(dump, tmp_path):
    from eagle.dflash_export import load_dflash

    run = tmp_path / "run"
    result = train(["--teacher-dir", str(dump), "--out", str(run), "--max-steps", "24", "--lr", "3e-3",
                    "--log-every", "4", "--eval-every", "12"])
    assert "train: draft architecture: dflash (2 layer(s), block 4: serve with K = 3" in result.output
    logs = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in logs if "loss" in r]
    assert losses[-1] < 0.95 * losses[0], losses  # (EAGLE-3 on this random target's dump falls as slowly)
    assert len(logs[-1]["eval_acc"]) == 3 and min(logs[-1]["eval_acc"]) > 10 / 512  # per drafted slot; V = 512
    config = json.loads((run / "export" / "config.json").read_text())
    manifest = json.loads((dump / "manifest.json").read_text())
    assert config["architectures"] == ["DFlashDraftModel"] and config["model_type"] == "qwen3"
    assert config["block_size"] == 4 and config["num_hidden_layers"] == 2
    assert config["dflash_config"]["target_layer_ids"] == [k - 1 for k in manifest["aux_layer_ids"]]
    exported = load_file(str(run / "export" / "model.safetensors"))
    assert not any("embed" in k or "lm_head" in k for k in exported)
    final = ckpt.latest_checkpoint(run / "checkpoints")
    saved = load_file(str(final / "model.safetensors"))
    assert exported.keys() == saved.keys() and all(torch.equal(exported[k], saved[k]) for k in saved)
    target = load_file(str(dump / "target" / "weights.safetensors"))
    draft = load_dflash(run / "export", target["embed_tokens.weight"], target["lm_head.weight"])
    assert draft.cfg.mask_token_id == config["dflash_config"]["mask_token_id"]
    # `eagle-pipe export CKPT OUT` writes the same files
    out = CliRunner().invoke(main, ["export", str(final), str(tmp_path / "exp2")])
    assert out.exit_code == 0, out.output
    again = load_file(str(tmp_path / "exp2" / "model.safetensors"))
    assert again.keys() == exported.keys() and all(torch.equal(again[k], exported[k]) for k in again)
    assert json.loads((tmp_path / "exp2" / "config.json").read_text()) == config


def test_loader_counts_equal_the_losss_and_anchors_do_not_depend_on_the_split(dump):
    from eagle.dflash import dflash_loss
    from stages.train.loader import AnchorPlan, DumpIndex, PackedLoader
    from stages.train.setup import build_dflash, token_counts

    index = DumpIndex(dump)
    model = build_dflash(dump, index.manifest, token_counts(index), block_size=4, draft_layers=1,
                         mask_token_id=None, seed=0)
    common = dict(seq_len=64, steps=3, t2d=torch.ones(model.cfg.vocab_size, dtype=torch.bool),
                  anchors=AnchorPlan(4, 10, seed=5))
    whole = PackedLoader(index, np.arange(index.num_documents), batch_size=4, **common)
    split = PackedLoader(index, np.arange(index.num_documents), batch_size=2, grad_accum=2, **common)
    for n, (a, b) in enumerate(zip(whole, split)):
        (batch, counts), = a
        assert torch.equal(batch["anchors"], torch.cat([m["anchors"] for m, _ in b]))
        assert torch.equal(counts, sum(c for _, c in b))
        _, metrics = dflash_loss(model, batch, counts, index.teacher_kind, gamma=2.0)
        assert torch.equal(metrics["valid"], counts)
        if n == 2:
            break
    assert counts[0] > 0


def test_kill_9_then_resume_gives_bitwise_the_same_dflash_weights(dump, tmp_path):
    straight, killed = straight_and_resumed(dump, tmp_path, *BASE, "--save-every", 6, "--log-every", 3,
                                            "--eval-every", 12, "--lr", "2e-3", max_steps=30)
    a = load_file(str(straight / "export" / "model.safetensors"))
    b = load_file(str(killed / "export" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    changed = train(["--teacher-dir", str(dump), "--out", str(killed), "--max-steps", "31", "--resume",
                     "--anchors-per-row", "8"], expect_ok=False)
    assert changed.exit_code == 2 and "was trained with anchors_per_row=32, now 8" in changed.output
    other = train(["--teacher-dir", str(dump), "--out", str(killed), "--max-steps", "31", "--resume",
                   "--block-size", "8"], expect_ok=False)
    assert other.exit_code == 2 and "was trained as a different draft (block_size=4" in other.output


def test_pipeline_yaml_runs_a_dflash_draft_end_to_end(demo):
    """`eagle-pipe run` with `draft_arch: dflash` in the train section: dump, train, export and eval (its K, the
    block's, without a draft_tokens key), lossless."""
    import yaml

    from test_run import run

    config = yaml.safe_load(demo.read_text())
    config["train"] |= {"draft_arch": "dflash", "block_size": 3, "draft_layers": 2, "anchors_per_row": 16}
    del config["eval"]["draft_tokens"]
    demo.write_text(yaml.safe_dump(config))
    code, output, summary = run(demo, "--json")
    assert code == 0, output
    assert summary["lossless"] is True and summary["draft_tokens"] == 2 and summary["acceptance_length"] >= 1.0
    exported = json.loads((demo.parent / "work/run/export/config.json").read_text())
    assert exported["architectures"] == ["DFlashDraftModel"] and exported["block_size"] == 3


@pytest.mark.parametrize("aux_dtype", ["model", "fp8"])
def test_a_dump_of_five_aux_layers_trains_dflash_and_refuses_eagle3(tiny_llama, tmp_path_factory, aux_dtype):
    """--aux-layers takes any number of ids: the dump verifies, a DFlash draft trains on all five (FP8 with a scale
    per layer), exports them as target_layer_ids - 1 and evaluates lossless; EAGLE-3 is refused in one line."""
    from test_evaluate import run_eval, write_jsonl

    root = tmp_path_factory.mktemp(f"aux5-{aux_dtype}")
    dump = cached_dump(tmp_path_factory, f"llama-aux5-{aux_dtype}", tiny_llama, records=40,
                       extra=["--aux-layers", "1,2,4,5,6", "--aux-dtype", aux_dtype])
    manifest = json.loads((dump / "manifest.json").read_text())
    assert manifest["aux_layer_ids"] == [1, 2, 4, 5, 6] and manifest["drafters"] == ["dflash"]
    assert CliRunner().invoke(main, ["verify", str(dump)]).exit_code == 0
    refused = CliRunner().invoke(main, ["train", "--teacher-dir", str(dump), "--out", str(root / "eagle"),
                                        "--max-steps", "1", "--no-compile"])
    assert refused.exit_code == 2 and refused.output.strip().splitlines()[-1] == (
        f"Error: {dump / 'manifest.json'}: the dump holds 5 aux layers [1, 2, 4, 5, 6]; an EAGLE-3 draft fuses "
        "exactly three: train --draft-arch dflash on it, or dump with three --aux-layers")
    run = root / "run"
    train(["--teacher-dir", str(dump), "--out", str(run), "--max-steps", "4", "--eval-every", "0"])
    config = json.loads((run / "export" / "config.json").read_text())
    assert config["dflash_config"]["target_layer_ids"] == [0, 1, 3, 4, 5]
    assert load_file(str(run / "export" / "model.safetensors"))["fc.weight"].shape[1] == 5 * 64
    prompts = write_jsonl(root / "prompts.jsonl", [{"messages": [{"role": "user", "content": "What is a list?"}]}])
    code, output, report = run_eval("--target", tiny_llama, "--draft", run / "export", "--data", prompts,
                                    "--max-new-tokens", 12, "--json")
    assert code == 0 and report["lossless"], output


def test_dflash_two_ranks_and_accumulation_match_one_big_batch(dump, tmp_path):
    """torchrun --nproc_per_node 2 (gloo, CPU) and gradient accumulation train the same DFlash draft as one
    process with the same global batch: the anchors follow the row, not the rank (fp32, as tests/test_train_ddp.py)."""
    from test_train_ddp import outcome, run

    arch = ["--draft-arch", "dflash", "--block-size", "4", "--draft-layers", "2", "--anchors-per-row", "16"]
    single, ddp, accum = tmp_path / "single", tmp_path / "ddp", tmp_path / "accum"
    run([*arch, "--teacher-dir", str(dump), "--out", str(single), "--batch-size", "4"])
    run([*arch, "--teacher-dir", str(dump), "--out", str(ddp), "--batch-size", "2"],
        launcher=["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"])
    run([*arch, "--teacher-dir", str(dump), "--out", str(accum), "--batch-size", "1", "--grad-accum", "4"])
    ref_logs, ref_w = outcome(single)
    for other in (ddp, accum):
        logs, w = outcome(other)
        for a, b in zip([r for r in logs if "loss" in r], [r for r in ref_logs if "loss" in r]):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), other.name
            assert a["acc"] == pytest.approx(b["acc"], abs=1e-6), other.name
        for k in ref_w:
            torch.testing.assert_close(w[k], ref_w[k], rtol=1e-4, atol=1e-5, msg=f"{other.name}: {k}")


def test_a_dflash_draft_vocabulary_trains_exports_evaluates_and_is_fixed_on_resume(dump, tmp_path, tiny_llama,
                                                                                   monkeypatch):
    """--draft-vocab-size: the lm_head is the target's rows of the dump's most frequent ids (EAGLE-3's map), frozen
    (still those rows after training), exported as vLLM reads it (draft_vocab_size, lm_head.weight [Vd, H], d2t
    int64), the same by `eagle-pipe export`; eval drafts target ids (d2t-mapped) and stays lossless; a resume
    with another draft vocabulary is refused in one line."""
    import stages.evaluate.speculative as spec
    from eagle.dflash_export import load_dflash
    from eagle.vocab import build_vocab_map, draft_to_target_ids
    from stages.train.loader import DumpIndex
    from stages.train.setup import token_counts
    from test_evaluate import run_eval, write_jsonl

    run = tmp_path / "run"
    result = train(["--teacher-dir", str(dump), "--out", str(run), "--max-steps", "4", "--save-every", "2",
                    "--eval-every", "0", "--lr", "3e-3", "--draft-vocab-size", "64"])
    assert "; draft vocabulary 64 of 512)" in result.output
    config = json.loads((run / "export" / "config.json").read_text())
    assert config["draft_vocab_size"] == 64 and config["vocab_size"] == 512
    exported = load_file(str(run / "export" / "model.safetensors"))
    d2t, head = exported["d2t"], exported["lm_head.weight"]
    assert d2t.dtype == torch.int64 and "t2d" not in exported and "embed_tokens.weight" not in exported
    assert torch.equal(d2t, build_vocab_map(token_counts(DumpIndex(dump)), 64)[0])
    target = load_file(str(dump / "target" / "weights.safetensors"))
    assert torch.equal(head, target["lm_head.weight"][draft_to_target_ids(d2t)].to(head.dtype))  # frozen rows
    final = ckpt.latest_checkpoint(run / "checkpoints")
    out = CliRunner().invoke(main, ["export", str(final), str(tmp_path / "exp2")])
    assert out.exit_code == 0, out.output
    again = load_file(str(tmp_path / "exp2" / "model.safetensors"))
    assert again.keys() == exported.keys() and all(torch.equal(again[k], exported[k]) for k in again)
    assert json.loads((tmp_path / "exp2" / "config.json").read_text()) == config
    draft = load_dflash(run / "export", target["embed_tokens.weight"], target["lm_head.weight"])
    assert draft.cfg.draft_vocab_size == 64 and torch.equal(draft.d2t, d2t)

    in_vocab, proposals, real_verify = set(draft_to_target_ids(d2t).tolist()), [], spec.verify_draft

    def recording_verify(logits, draft_ids):
        proposals.extend(draft_ids)
        return real_verify(logits, draft_ids)

    monkeypatch.setattr(spec, "verify_draft", recording_verify)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"messages": [{"role": "user", "content": "What is a list?"}]}])
    code, output, report = run_eval("--target", tiny_llama, "--draft", run / "export", "--data", prompts,
                                    "--max-new-tokens", 12, "--no-compile", "--json")
    assert code == 0 and report["lossless"], output
    assert proposals and set(proposals) <= in_vocab and max(proposals) >= 64  # target ids, not draft ids

    for extra, was in ((["--draft-vocab-size", "32"], "draft_vocab_size=64"), ([], "draft_vocab_size=64")):
        refused = train(["--teacher-dir", str(dump), "--out", str(run), "--max-steps", "5", "--resume", *extra],
                        expect_ok=False)
        assert refused.exit_code == 2 and f"was trained as a different draft ({was}" in refused.output, \
            refused.output
