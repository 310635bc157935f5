"""stages/sharded_job.py, the mechanics dump-teacher and regenerate share: claiming OUT/manifest.json (accept,
refuse, overwrite, concurrent jobs), opening a shard (complete, stale), reusing or rejecting a part on disk
(with each stage's own check, on real part files: corrupted, truncated, foreign), done.json's accounting and the
summary."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from stages import sharded_job, shards
from stages.errors import StageError

MANIFEST = {"format": "test-job", "settings": {"target": "a", "limit": None}, "num_shards": 2}


def claim(out, manifest=MANIFEST, overwrite=False, **kw):
    kw.setdefault("outputs", [out / "shards"])
    sharded_job.claim_manifest(out, manifest, overwrite=overwrite, kind="test job", **kw)


# ---- claim_manifest --------------------------------------------------------------------------------------------

def test_claim_writes_then_accepts_the_same_manifest_without_rewriting(tmp_path):
    claim(tmp_path)
    path = tmp_path / "manifest.json"
    assert shards.read_json(path) == MANIFEST
    before = path.stat().st_ino
    claim(tmp_path, json.loads(json.dumps(MANIFEST)))   # an equal manifest, as another shard's job builds it
    assert path.stat().st_ino == before                 # accepted as is (an atomic rewrite would be a new inode)


def test_claim_refuses_another_manifest_in_one_line_naming_the_field(tmp_path):
    claim(tmp_path)
    (tmp_path / "shards").mkdir()
    other = {**MANIFEST, "settings": {"target": "b", "limit": None}}
    with pytest.raises(StageError) as refused:
        claim(tmp_path, other)
    assert str(refused.value) == (f'{tmp_path} holds another test job (settings.target: "a" in the existing dump, '
                                  '"b" in this run); pass --overwrite to replace it, or another --out')
    assert shards.read_json(tmp_path / "manifest.json") == MANIFEST and (tmp_path / "shards").is_dir()


def test_overwrite_removes_the_old_outputs_and_says_so(tmp_path, capsys):
    claim(tmp_path)
    (tmp_path / "shards" / "shard-0").mkdir(parents=True)
    (tmp_path / "stray-file").write_text("x")
    (tmp_path / "keep").write_text("not an output of this job")
    other = {**MANIFEST, "num_shards": 3}
    claim(tmp_path, other, overwrite=True, outputs=[tmp_path / "shards", tmp_path / "stray-file"])
    assert shards.read_json(tmp_path / "manifest.json") == other
    assert not (tmp_path / "shards").exists() and not (tmp_path / "stray-file").exists()
    assert (tmp_path / "keep").read_text() == "not an output of this job"
    assert f"--overwrite: removing the previous test job in {tmp_path} (num_shards: 2" in capsys.readouterr().err


@pytest.mark.parametrize("manifest_text, why", [(None, "manifest.json is missing"),
                                                ("{not json", "manifest.json is not valid JSON"),
                                                ("[1, 2]", "manifest.json is not a JSON object")])
def test_outputs_without_a_readable_manifest_are_refused_then_replaced(tmp_path, manifest_text, why):
    (tmp_path / "shards").mkdir()
    if manifest_text is not None:
        (tmp_path / "manifest.json").write_text(manifest_text)
    with pytest.raises(StageError, match=f"holds another test job \\({why}\\)"):
        claim(tmp_path)
    claim(tmp_path, overwrite=True)
    assert shards.read_json(tmp_path / "manifest.json") == MANIFEST and not (tmp_path / "shards").exists()


def test_an_uncompared_field_is_accepted_and_recorded(tmp_path):
    """regenerate compares its manifest without `endpoint` (a restarted server elsewhere resumes the run); the
    manifest then records where this run's server is."""
    without_endpoint = lambda m: {k: v for k, v in m.items() if k != "endpoint"}  # noqa: E731
    claim(tmp_path, {**MANIFEST, "endpoint": "http://a/v1"}, compared=without_endpoint)
    claim(tmp_path, {**MANIFEST, "endpoint": "http://b/v1"}, compared=without_endpoint)
    assert shards.read_json(tmp_path / "manifest.json")["endpoint"] == "http://b/v1"
    with pytest.raises(StageError, match="endpoint"):
        claim(tmp_path, {**MANIFEST, "endpoint": "http://c/v1"})   # compared whole, it differs


def test_a_different_manifest_written_at_the_same_time_is_refused(tmp_path, monkeypatch):
    """Two jobs with different settings race on an empty OUT: the one whose rename lost reads the other's
    manifest back and stops instead of writing parts under a manifest that is not its own."""
    real_write = shards.atomic_write_json

    def other_job_renames_last(path, obj):
        real_write(path, obj)
        real_write(path, {**obj, "num_shards": 9})

    monkeypatch.setattr(shards, "atomic_write_json", other_job_renames_last)
    with pytest.raises(StageError, match="another job wrote a different manifest at the same time .num_shards"):
        claim(tmp_path)


CLAIM_SCRIPT = """
import json, sys
from pathlib import Path
from stages import sharded_job
sharded_job.claim_manifest(Path(sys.argv[1]), json.loads(sys.argv[2]), overwrite=False, kind="test job", outputs=[])
"""


def test_concurrent_jobs_claiming_one_manifest_all_succeed(tmp_path):
    """Several shard jobs start at once on an empty OUT (each process writes its own temporary, then renames)."""
    jobs = [subprocess.Popen([sys.executable, "-c", CLAIM_SCRIPT, str(tmp_path), json.dumps(MANIFEST)],
                             stderr=subprocess.PIPE, text=True) for _ in range(6)]
    assert all(job.wait() == 0 for job in jobs), [job.stderr.read() for job in jobs]
    assert shards.read_json(tmp_path / "manifest.json") == MANIFEST
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]   # no temporaries left


# ---- open_shard ------------------------------------------------------------------------------------------------

def test_open_shard_skips_a_complete_shard_and_clears_a_stale_one(tmp_path, capsys):
    directory = tmp_path / "shards" / "shard-00001-of-00002"
    assert sharded_job.open_shard(directory, "sha-a") is None and directory.is_dir()
    (directory / ".part-00000.safetensors.tmp-host-1").write_bytes(b"torn")   # a crashed run's temporary
    done = {"shard_index": 1, "num_shards": 2, "manifest_sha256": "sha-a"}
    sharded_job.write_done(directory, done)
    assert sharded_job.open_shard(directory, "sha-a") == done
    assert f"shard 1/2 is already complete in {directory}" in capsys.readouterr().err
    assert not list(directory.glob(".*.tmp-*"))
    assert sharded_job.open_shard(directory, "sha-b") is None            # written under another manifest
    assert not (directory / "done.json").exists()
    (directory / "done.json").write_text("{torn")
    assert sharded_job.open_shard(directory, "sha-a") is None and not (directory / "done.json").exists()


# ---- reusable_part (the mechanism, with a checksum check) -------------------------------------------------------

def sha_check(expected: str):
    return lambda path: {"sha256": expected} if hashlib.sha256(path.read_bytes()).hexdigest() == expected else None


def test_a_part_that_holds_the_plan_is_reused_silently(tmp_path, capsys):
    part = tmp_path / "part-00000.bin"
    part.write_bytes(b"planned bytes")
    assert sharded_job.reusable_part(part, sha_check(hashlib.sha256(b"planned bytes").hexdigest())) is not None
    assert part.is_file() and capsys.readouterr().err == ""


def test_a_missing_or_unfinished_part_is_computed_silently(tmp_path, capsys):
    part, marker = tmp_path / "part-00000.jsonl", tmp_path / "part-00000.json"
    assert sharded_job.reusable_part(part, sha_check("x")) is None
    part.write_bytes(b"written, but its bookkeeping never was (a kill in between)")
    assert sharded_job.reusable_part(part, lambda p: pytest.fail("checked"), marker=marker) is None
    assert part.is_file() and capsys.readouterr().err == ""


@pytest.mark.parametrize("damage", ["corrupted", "truncated", "check raises"])
def test_a_damaged_part_is_removed_with_its_marker_in_one_line(tmp_path, capsys, damage):
    part, marker = tmp_path / "part-00000.jsonl", tmp_path / "part-00000.json"
    good = b"0123456789" * 10
    part.write_bytes({"corrupted": good[:50] + b"X" + good[51:], "truncated": good[:64], "check raises": good}[damage])
    marker.write_text("{}")
    check = sha_check(hashlib.sha256(good).hexdigest())
    if damage == "check raises":
        check = lambda path: json.loads("{torn")  # noqa: E731
    assert sharded_job.reusable_part(part, check, marker=marker) is None
    assert not part.exists() and not marker.exists()
    assert capsys.readouterr().err == f"{part}: does not match the plan; recomputing it\n"


# ---- reusable_part with each stage's own check, on real parts -----------------------------------------------------

def dump_part(directory, metadata):
    """A real dump part (stages/shards format) of two planned sequences, as the dump's writer leaves it."""
    from stages.dump.plan import PartPlan, Sequence
    from stages.dump.writer import sequence_tensors

    seqs = [Sequence(i, np.arange(3 + i, dtype=np.int32), np.ones(3 + i, dtype=np.uint8)) for i in (4, 7)]
    part = PartPlan(0, seqs, [(0, 2)])
    tensors = {**sequence_tensors(part), "aux_hidden_states": torch.randn(part.num_tokens, 12).bfloat16(),
               "teacher_argmax": torch.zeros(part.num_tokens, dtype=torch.int32)}
    path = directory / shards.part_name(0)
    sha, size = shards.write_part(path, tensors, {**metadata, "part_index": "0"})
    return part, path, sha, size


METADATA = {"shard_index": "0", "num_shards": "1", "teacher": "argmax", "manifest_sha256": "m" * 64}


def test_the_dumps_check_reuses_its_part_and_rejects_a_truncated_or_foreign_one(tmp_path):
    from stages.dump.plan import PartPlan
    from stages.dump.stage import planned_part

    part, path, sha, size = dump_part(tmp_path, METADATA)
    entry = sharded_job.reusable_part(path, planned_part(part, METADATA))
    assert entry == {"file": path.name, "sha256": sha, "bytes": size, "num_tokens": part.num_tokens,
                     "num_sequences": 2}
    other_records = PartPlan(0, part.sequences[:1], [(0, 1)])
    assert sharded_job.reusable_part(path, planned_part(other_records, METADATA)) is None and not path.exists()
    part, path, _, size = dump_part(tmp_path, METADATA)
    assert sharded_job.reusable_part(path, planned_part(part, {**METADATA, "manifest_sha256": "n" * 64})) is None
    part, path, _, size = dump_part(tmp_path, METADATA)
    with open(path, "r+b") as f:
        f.truncate(size - 1)
    assert sharded_job.reusable_part(path, planned_part(part, METADATA)) is None and not path.exists()


def test_the_regenerate_check_rejects_a_corrupted_part_and_keeps_an_intact_one(tmp_path, capsys):
    from stages.data.regenerated import bookkeeping_name, part_name
    from stages.regenerate.stage import _Job, finished_part, write_part

    jobs = []
    for i in (2, 5):
        job = _Job(i, f"data.jsonl:{i + 1}", [[{"role": "user", "content": "hi"}]])
        job.messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": f"answer {i}"}]
        job.finish_reasons, job.num_tokens = ["stop"], [3]
        jobs.append(job)
    book = write_part(tmp_path, 0, jobs)
    assert finished_part(tmp_path, 0, [2, 5]) == book
    assert finished_part(tmp_path, 0, [2, 5, 8]) is None            # the plan changed: not these records
    assert not (tmp_path / part_name(0)).exists() and not (tmp_path / bookkeeping_name(0)).exists()
    write_part(tmp_path, 0, jobs)
    path = tmp_path / part_name(0)
    path.write_bytes(path.read_bytes().replace(b"answer 5", b"answer 6"))   # same size, other bytes
    assert finished_part(tmp_path, 0, [2, 5]) is None
    assert capsys.readouterr().err.count("does not match the plan; recomputing it") == 2


# ---- done.json and the summary ----------------------------------------------------------------------------------

def test_done_record_summary_and_printed_summary(tmp_path, capsys):
    done = sharded_job.done_record(shard_index=1, num_shards=3, manifest_sha256="abc", num_records=10,
                                   parts=[{"file": "part-00000.x"}], assigned=4, written=[7, 1],
                                   skipped={"too_long": [4], "bad": [9]}, turns=5)
    assert done == {"shard_index": 1, "num_shards": 3, "manifest_sha256": "abc", "num_records": 10,
                    "parts": [{"file": "part-00000.x"}],
                    "records": {"assigned": 4, "written": 2, "skipped": {"bad": 1, "too_long": 1}},
                    "written_sample_indices": [1, 7], "skipped_sample_indices": {"bad": [9], "too_long": [4]},
                    "turns": 5}
    sharded_job.write_done(tmp_path, done)
    assert shards.read_json(tmp_path / "done.json") == done

    summary = sharded_job.summary_from_done(tmp_path, done, turns=done["turns"], tokens_now_key="tokens_now",
                                            tokens_now=300, seconds=2.0)
    assert summary == {"out": str(tmp_path), "shard_index": 1, "num_shards": 3, "records_in_input": 10,
                       "records_read": 4, "skipped": {"bad": 1, "too_long": 1}, "turns": 5, "tokens_now": 300,
                       "seconds": 2.0, "tokens_per_s": 150.0}
    found_complete = sharded_job.summary_from_done(tmp_path, done, tokens_now_key="tokens_now", tokens_now=0,
                                                   seconds=0.0)
    assert found_complete["tokens_per_s"] is None

    sharded_job.print_summary(summary, ["  turns 5"], tokens_now_key="tokens_now", verb="made")
    sharded_job.print_summary(found_complete, [], tokens_now_key="tokens_now", verb="made")
    assert capsys.readouterr().err.splitlines() == [
        "shard 1/3: records read 4 (of 10 in the input), skipped: bad 1, too_long 1", "  turns 5",
        "  made 300 tokens in 2.0 s (150.0 tokens/s)",
        "shard 1/3: records read 4 (of 10 in the input), skipped: bad 1, too_long 1", "  made 0 tokens in 0.0 s"]
    assert sharded_job.counts({}) == "none"
