"""verify: a three-shard dump covers every record exactly once; truncation, a flipped byte, a missing shard and
inconsistent bookkeeping are each reported with the file named and a non-zero exit."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from dump_helpers import write_chat_data

from stages import shards
from stages.cli import main
from stages.dump.stage import dump_teacher
from stages.shards.verify import verify_dump

NUM_SHARDS = 3


@pytest.fixture(scope="module")
def three_shard_dump(tiny_llama, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("verify")
    data = write_chat_data(root / "chat.jsonl", n=16, seed=3)
    out = root / "dump"
    for i in range(NUM_SHARDS):
        dump_teacher(target=str(tiny_llama), data=[str(data)], out=str(out), aux_layers="1,3,5",
                     teacher="argmax", part_tokens=300, batch_tokens=400, max_seq_len=96,
                     shard_index=i, num_shards=NUM_SHARDS, device="cpu")
    return out


@pytest.fixture()
def dump_copy(three_shard_dump, tmp_path) -> Path:
    return Path(shutil.copytree(three_shard_dump, tmp_path / "dump"))


def verify_cli(out: Path):
    return CliRunner().invoke(main, ["verify", str(out)], standalone_mode=False, catch_exceptions=True)


def test_three_shards_cover_every_record_exactly_once(three_shard_dump):
    out = three_shard_dump
    dones = [shards.read_done(out, i, NUM_SHARDS) for i in range(NUM_SHARDS)]
    num_records = len((out.parent / "chat.jsonl").read_text().splitlines())  # 16 conversations + 2 bad lines
    assert {d["num_records"] for d in dones} == {num_records}
    accounted = []
    for i, done in enumerate(dones):
        in_parts = []
        for entry in done["parts"]:
            in_parts += shards.load_part(shards.shard_dir(out, i, NUM_SHARDS) / entry["file"],
                                         ["sample_index"])["sample_index"].tolist()
        assert sorted(in_parts) == done["written_sample_indices"]
        mine = in_parts + [j for v in done["skipped_sample_indices"].values() for j in v]
        assert all(j % NUM_SHARDS == i for j in mine)
        accounted += mine
    assert sorted(accounted) == list(range(num_records))  # every record once, none twice
    skipped = {}
    for done in dones:
        for reason, n in done["records"]["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + n
    assert skipped["malformed_json"] == 1 and skipped["no_supervised_tokens"] >= 1

    assert verify_dump(out) == []
    result = CliRunner().invoke(main, ["verify", str(out)], standalone_mode=False)
    assert result.exception is None, result.output
    summary = result.return_value
    assert summary["records"] == num_records
    assert summary["written"] + sum(summary["skipped"].values()) == num_records
    assert summary["parts"] == sum(len(d["parts"]) for d in dones)
    assert CliRunner().invoke(main, ["verify", str(out)]).exit_code == 0


def _assert_reported(out: Path, *fragments):
    problems = verify_dump(out)
    assert any(all(f in p for f in fragments) for p in problems), problems
    result = CliRunner().invoke(main, ["verify", str(out)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert any(all(f in line for f in fragments) for line in result.output.splitlines()), result.output
    return problems


def _a_part(out: Path, shard: int = 1) -> Path:
    return shards.shard_dir(out, shard, NUM_SHARDS) / shards.part_name(0)


def test_truncated_part_is_reported(dump_copy):
    part = _a_part(dump_copy)
    data = part.read_bytes()
    part.write_bytes(data[: len(data) - 100])
    _assert_reported(dump_copy, str(part), "truncated")


def test_flipped_byte_is_reported(dump_copy):
    part = _a_part(dump_copy, 2)
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0x01
    part.write_bytes(bytes(data))
    _assert_reported(dump_copy, str(part), "sha256 mismatch")


def test_missing_shard_and_unfinished_shard_are_reported(dump_copy):
    gone = shards.shard_dir(dump_copy, 0, NUM_SHARDS)
    shutil.rmtree(gone)
    unfinished = shards.shard_dir(dump_copy, 2, NUM_SHARDS)
    (unfinished / "done.json").unlink()
    problems = _assert_reported(dump_copy, str(gone), "shard missing")
    assert any(str(unfinished) in p and "not done" in p for p in problems), problems


def test_inconsistent_bookkeeping_is_reported(dump_copy):
    path = shards.shard_dir(dump_copy, 1, NUM_SHARDS) / "done.json"
    done = json.loads(path.read_text())
    done["skipped_sample_indices"].setdefault("malformed_json", []).append(done["written_sample_indices"][0])
    done["records"]["assigned"] += 1
    path.write_text(json.dumps(done))
    _assert_reported(dump_copy, "accounted for twice")


def test_changed_manifest_is_reported(dump_copy):
    manifest = json.loads((dump_copy / "manifest.json").read_text())
    manifest["settings"]["top_k"] = 3
    (dump_copy / "manifest.json").write_text(json.dumps(manifest))
    _assert_reported(dump_copy, "done.json", "another manifest")


def test_stray_part_is_reported(dump_copy):
    sdir = shards.shard_dir(dump_copy, 0, NUM_SHARDS)
    stray = sdir / shards.part_name(99)
    shutil.copy(_a_part(dump_copy, 0), stray)
    _assert_reported(dump_copy, str(stray), "not listed")


def test_not_a_dump(tmp_path):
    _assert_reported(tmp_path, "manifest.json", "missing")
