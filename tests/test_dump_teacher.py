"""dump-teacher: stored values equal a plain HF forward, crash-resume is byte-identical, bad settings exit 2."""
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

from dump_helpers import dump_args, one_line_error, write_chat_data

from stages import shards
from stages.cli import main
from stages.dump import forward as dump_target
from stages.dump.plan import Sequence, plan_parts
from stages.sharding import shard_from_env
from stages.target import DTYPES
from stages.dump.stage import dump_teacher
from stages.errors import StageError
from stages.shards.verify import verify_dump

REPO = Path(__file__).resolve().parents[1]
AUX = [1, 3, 5]  # 8-layer fixtures; the default (2, 4, 5) is checked in test_default_aux_layers


def invoke(args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def read_parts(out: Path) -> list[dict]:
    return [shards.load_part(p) for p in shards.iter_parts(out)]


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory) -> Path:
    return write_chat_data(tmp_path_factory.mktemp("data") / "chat.jsonl", n=16)


# ---- numerics against an independent plain HF forward ---------------------------------------------------------

@pytest.mark.parametrize("arch,teacher,dtype", [
    ("llama", "topk", "float32"), ("qwen3", "topk", "float32"), ("llama", "argmax", "float32"),
    ("qwen3", "softmax", "float32"), ("llama", "topk", "bfloat16"),
])
def test_dump_equals_plain_hf_forward(arch, teacher, dtype, request, chat_data, tmp_path, monkeypatch):
    model_dir = request.getfixturevalue(f"tiny_{arch}")
    monkeypatch.setattr(dump_target, "TEACHER_CHUNK_BYTES", 7 * 4 * 600)  # several teacher chunks per batch
    check_dump_against_plain_forward(model_dir, chat_data, tmp_path / "out", teacher, dtype, "cpu")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_dump_equals_plain_hf_forward(dtype, tiny_qwen3, chat_data, tmp_path, monkeypatch):
    """The GPU path (pinned slots, non-blocking copies, events, writer thread) against a CPU reference."""
    monkeypatch.setattr(dump_target, "TEACHER_CHUNK_BYTES", 7 * 4 * 600)
    check_dump_against_plain_forward(tiny_qwen3, chat_data, tmp_path / "out", "topk", dtype, "cuda")


def check_dump_against_plain_forward(model_dir, chat_data, out, teacher, dtype, device):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stages.data.records import Example, tokenize_records

    summary = dump_teacher(target=str(model_dir), data=[str(chat_data)], out=str(out), dtype=dtype,
                           device=device, aux_layers="1,3,5", teacher=teacher, top_k=8, batch_tokens=400,
                           part_tokens=500, max_seq_len=100)
    assert summary["padding_fraction"] > 0 and summary["parts"] >= 3  # padded multi-sequence batches, parts
    assert summary["skipped"]["malformed_json"] == 1 and summary["skipped"]["no_supervised_tokens"] >= 1
    assert summary["truncated"] > 0
    assert verify_dump(out) == []

    torch_dtype = DTYPES[dtype]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples = {e.sample_index: e for e in tokenize_records([str(chat_data)], tokenizer, max_seq_len=100)
                if isinstance(e, Example)}
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == "float32" else dict(atol=6e-2, rtol=6e-2)
    seen = []
    for part in read_parts(out):
        cu = part["cu_seqlens"].tolist()
        assert cu[0] == 0 and cu[-1] == part["input_ids"].shape[0]
        for s, index in enumerate(part["sample_index"].tolist()):
            seen.append(index)
            lo, hi = cu[s], cu[s + 1]
            ids = part["input_ids"][lo:hi].long()
            assert ids.tolist() == examples[index].input_ids
            assert part["loss_mask"][lo:hi].tolist() == examples[index].loss_mask
            with torch.no_grad():  # one unpadded sequence, every hidden state, full logits
                ref = model(input_ids=ids[None], output_hidden_states=True)
            want_aux = torch.cat([ref.hidden_states[k][0] for k in AUX], -1)
            got_aux = part["aux_hidden_states"][lo:hi]
            assert got_aux.dtype == torch_dtype
            torch.testing.assert_close(got_aux.float(), want_aux.float(), **tol)
            logp = torch.log_softmax(ref.logits[0].double(), -1)
            top2 = logp.topk(2, -1).values
            clear = (top2[:, 0] - top2[:, 1]) > 0.05  # positions whose argmax is not a near-tie
            if teacher == "topk":
                got_ids = part["teacher_topk_ids"][lo:hi].long()
                got_lp = part["teacher_topk_logprobs"][lo:hi]
                assert got_lp.dtype == torch.float32
                torch.testing.assert_close(got_lp.double(), logp.topk(8, -1).values, **tol)
                torch.testing.assert_close(got_lp.double(), logp.gather(-1, got_ids), **tol)
                assert torch.equal(got_ids[clear, 0], logp.argmax(-1)[clear])
            elif teacher == "argmax":
                got = part["teacher_argmax"][lo:hi].long()
                assert torch.equal(got[clear], logp.argmax(-1)[clear])
            else:
                torch.testing.assert_close(part["teacher_probs"][lo:hi].double(), logp.exp(), atol=1e-6, rtol=1e-4)
    assert sorted(seen) == sorted(examples)

    target_w = shards.load_part(out / "target" / "weights.safetensors")
    assert torch.equal(target_w["lm_head.weight"], model.lm_head.weight)
    assert torch.equal(target_w["embed_tokens.weight"], model.model.embed_tokens.weight)
    assert torch.equal(target_w["norm.weight"], model.model.norm.weight)


# ---- crash safety ---------------------------------------------------------------------------------------------

def test_sigkill_mid_run_then_rerun_is_byte_identical(tiny_llama, chat_data, tmp_path):
    opts = dict(aux_layers="1,3,5", part_tokens=300, batch_tokens=400, max_seq_len=128, top_k=4, device="cpu")
    killed = tmp_path / "killed"
    env = dict(os.environ, EAGLE_PIPE_TEST_PART_PAUSE="0.5")
    proc = subprocess.Popen([sys.executable, "-m", "stages.cli", *dump_args(tiny_llama, chat_data, killed, **opts)],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    shard = shards.shard_dir(killed, 0, 1)
    deadline = time.monotonic() + 240
    while not (shard / shards.part_name(1)).exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "the dump never wrote its second part"
        time.sleep(0.05)
    time.sleep(0.2)  # now inside the next part's pause: its temp file exists, it is not renamed yet
    assert proc.poll() is None, "the dump finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    proc.stderr.close()
    assert not (shard / "done.json").exists()
    assert verify_dump(killed)  # an interrupted dump is reported as incomplete
    n_before = len(list(shard.glob("part-*.safetensors")))

    result = invoke(dump_args(tiny_llama, chat_data, killed, **opts))  # resume
    assert result.exit_code == 0, result.output
    assert not list(shard.glob(".*tmp*"))
    clean = tmp_path / "clean"
    assert invoke(dump_args(tiny_llama, chat_data, clean, **opts)).exit_code == 0
    names = sorted(p.name for p in shards.shard_dir(clean, 0, 1).iterdir())
    assert names == sorted(p.name for p in shard.iterdir())
    assert n_before < len(names) - 1  # the kill really happened before the end
    for name in names:
        assert (shard / name).read_bytes() == (shards.shard_dir(clean, 0, 1) / name).read_bytes(), name
    assert verify_dump(killed) == [] and verify_dump(clean) == []


# ---- refusing another dump, resuming the same one, pipeline.yaml ----------------------------------------------

def test_refuses_other_target_and_settings_and_resumes_same(tiny_llama, tiny_qwen3, chat_data, tmp_path):
    out = tmp_path / "out"
    cfg = tmp_path / "pipeline.yaml"
    cfg.write_text(f"dump-teacher:\n  target: {tiny_llama}\n  data: [{chat_data}]\n  out: {out}\n"
                   f"  aux-layers: '1,3,5'\n  limit: 6\n  part_tokens: 400\n")
    first = invoke(["--config", cfg, "dump-teacher"])
    assert first.exit_code == 0, first.output
    manifest = shards.read_json(out / "manifest.json")
    assert manifest["settings"]["limit"] == 6 and manifest["aux_layer_ids"] == AUX
    assert manifest["drafters"] == ["eagle3", "eagle3.1", "dflash"]  # three aux layers: every drafter
    done = shards.read_done(out, 0, 1)
    assert done["num_records"] == 6 and done["records"]["assigned"] == 6

    again = CliRunner().invoke(main, ["--config", str(cfg), "dump-teacher"])
    assert again.exit_code == 0 and "already complete" in again.output

    other = CliRunner().invoke(main, dump_args(tiny_qwen3, chat_data, out, aux_layers="1,3,5", limit=6,
                                               part_tokens=400))
    assert other.exit_code == 2
    assert other.output.strip().splitlines()[-1].startswith(f"Error: {out} holds another dump (settings.target")
    assert "Traceback" not in other.output
    topk = CliRunner().invoke(main, ["--config", str(cfg), "dump-teacher", "--top-k", "5"])
    assert topk.exit_code == 2 and "settings.top_k: 64 in the existing dump, 5 in this run" in topk.output

    replaced = invoke(dump_args(tiny_qwen3, chat_data, out, aux_layers="1,3,5", limit=6, part_tokens=400,
                                overwrite=True))
    assert replaced.exit_code == 0, replaced.output
    assert shards.read_json(out / "manifest.json")["target"]["model_type"] == "qwen3"
    assert verify_dump(out) == []


def test_dumps_of_one_target_made_offline_and_online_train_together(tiny_llama, chat_data, tmp_path):
    """transformers saves `local_files_only: true` into tokenizer_config.json under HF_HUB_OFFLINE=1; the
    tokenizer hash (which train compares across dumps) must not depend on how the tokenizer was loaded."""
    hashes = []
    for offline in ("1", "0"):
        out = tmp_path / f"offline-{offline}"
        env = dict(os.environ, HF_HUB_OFFLINE=offline, TRANSFORMERS_OFFLINE=offline, OMP_NUM_THREADS="1")
        done = subprocess.run([sys.executable, "-m", "stages.cli", *dump_args(tiny_llama, chat_data, out, limit=2)],
                              env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert "local_files_only" not in (out / "target" / "tokenizer_config.json").read_text()
        assert verify_dump(out) == []
        hashes.append(shards.read_json(out / "manifest.json")["target"]["tokenizer_sha256"])
    assert hashes[0] == hashes[1]


def test_a_dump_made_before_the_tokenizer_fix_is_refused_in_one_line(tiny_llama, chat_data, tmp_path):
    """A dump whose tokenizer_config.json kept `local_files_only` (dump-teacher before it dropped load-time keys)
    recorded another tokenizer hash than a new dump of the same target: verify, and so train, refuse it in one
    line saying to re-run dump-teacher."""
    from stages.train.setup import check_dumps

    old, new = tmp_path / "old", tmp_path / "new"
    keep_keys = ("import sys, stages.dump.forward as f; "
                 "f.drop_load_kwargs = lambda path: None; "  # the old dump-teacher: keys kept, files hashed as is
                 "from stages.cli import main; sys.argv[0] = 'eagle-pipe'; main()")
    for out, cmd, offline in ((old, ["-c", keep_keys], "1"), (new, ["-m", "stages.cli"], "0")):
        env = dict(os.environ, HF_HUB_OFFLINE=offline, TRANSFORMERS_OFFLINE=offline, OMP_NUM_THREADS="1")
        done = subprocess.run([sys.executable, *cmd, *dump_args(tiny_llama, chat_data, out, limit=2)], env=env,
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    assert "local_files_only" in (old / "target" / "tokenizer_config.json").read_text()
    line = (f"{old / 'target' / 'tokenizer_config.json'}: holds load-time keys (local_files_only), written by a "
            "dump-teacher before it dropped them, so its tokenizer hash differs from newer dumps of the same "
            "tokenizer: re-run dump-teacher with this version (into a new --out)")
    assert verify_dump(old) == [line]
    with pytest.raises(StageError, match="re-run dump-teacher"):
        check_dumps(new, old)
    assert verify_dump(new) == []


# ---- one-line errors -------------------------------------------------------------------------------------------

def test_cli_errors_are_one_line_exit_2(tiny_llama, chat_data, tmp_path):
    from transformers import ViTConfig

    runner = CliRunner()
    missing = runner.invoke(main, dump_args(tmp_path / "no-such-model", chat_data, tmp_path / "o1"))
    one_line_error(missing, "no-such-model", "no such model directory")
    assert len(missing.output.strip().splitlines()) == 1

    vit = tmp_path / "vit"
    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(vit)
    one_line_error(runner.invoke(main, dump_args(vit, chat_data, tmp_path / "o2")), "not a causal language model")

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    one_line_error(runner.invoke(main, dump_args(tiny_llama, chat_data, blocker / "out")), "not writable")

    one_line_error(runner.invoke(main, dump_args(tiny_llama, chat_data, tmp_path / "o3", aux_layers="1,9,5")),
                    "ascending")
    one_line_error(runner.invoke(main, dump_args(tiny_llama, chat_data, tmp_path / "o4", aux_layers="1,3,8")),
                    "0..7")
    one_line_error(runner.invoke(main, dump_args(tiny_llama, chat_data, tmp_path / "o5", teacher="softmax",
                                                  part_tokens=10**9)), "--allow-large-softmax")
    one_line_error(runner.invoke(main, ["dump-teacher", "--target", str(tiny_llama), "--out", str(tmp_path)]),
                    "--data is required")
    one_line_error(runner.invoke(main, dump_args(tiny_llama, chat_data, tmp_path / "o6", shard_index=3,
                                                  num_shards=3)), "--shard-index 3")


# ---- plan and defaults (pure functions) ------------------------------------------------------------------------

def test_default_aux_layers_and_validation():
    assert dump_target.parse_aux_layers(None, 32) == [2, 16, 29]
    assert dump_target.parse_aux_layers(None, 8) == [2, 4, 5]
    assert dump_target.parse_aux_layers(" 0, 3 ,7", 8) == [0, 3, 7]


def test_shard_defaults_from_environment():
    assert shard_from_env(None, None, {}) == (0, 1)
    assert shard_from_env(None, None, {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "4",
                                       "SLURM_ARRAY_TASK_MIN": "3", "RANK": "1", "WORLD_SIZE": "8"}) == (2, 4)
    assert shard_from_env(None, None, {"RANK": "1", "WORLD_SIZE": "8"}) == (1, 8)
    assert shard_from_env(2, 3, {"RANK": "1", "WORLD_SIZE": "8"}) == (2, 3)


def test_plan_is_a_deterministic_partition_within_budgets():
    import numpy as np

    rng = np.random.default_rng(0)
    seqs = [Sequence(i, np.zeros(int(n), np.int32), np.ones(int(n), np.uint8))
            for i, n in enumerate(rng.integers(1, 300, size=200))]
    parts = plan_parts(list(reversed(seqs)), part_tokens=1000, batch_tokens=700)
    again = plan_parts(seqs, part_tokens=1000, batch_tokens=700)
    assert [(p.sample_indices(), p.batches) for p in parts] == [(p.sample_indices(), p.batches) for p in again]
    assert sorted(i for p in parts for i in p.sample_indices()) == list(range(200))
    flat = [(len(s), s.sample_index) for p in parts for s in p.sequences]
    assert flat == sorted(flat)
    for p in parts:
        assert p.num_tokens <= 1000 or len(p.sequences) == 1
        covered = [i for a, b in p.batches for i in range(a, b)]
        assert covered == list(range(len(p.sequences)))
        for a, b in p.batches:
            assert (b - a) * len(p.sequences[b - 1]) <= 700 or b - a == 1
