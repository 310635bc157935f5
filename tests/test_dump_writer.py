"""The part writer: bytes and streamed sha256 against an independent serialization, assembling that never waits
for the disk, and disk errors reaching the main thread."""
from __future__ import annotations

import hashlib
import json
import os
import struct
import threading

import numpy as np
import pytest
import torch
from safetensors import safe_open

from stages import shards
from stages.dump import writer as dump_writer
from stages.dump.plan import PartPlan, Sequence

SPECS = {"aux_hidden_states": ((12,), torch.bfloat16), "teacher_topk_ids": ((3,), torch.int32),
         "teacher_topk_logprobs": ((3,), torch.float32)}


def reference_bytes(tensors: dict, metadata: dict) -> bytes:
    """The documented layout written out by hand: u64 header length, compact sorted JSON padded with spaces to
    8 bytes, then the data ordered by (itemsize descending, name)."""
    names = sorted(tensors, key=lambda n: (-tensors[n].element_size(), n))
    dtypes = {torch.bfloat16: "BF16", torch.float32: "F32", torch.int32: "I32", torch.int64: "I64",
              torch.uint8: "U8"}
    header, data, offset = {"__metadata__": metadata}, b"", 0
    for n in names:
        raw = tensors[n].contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        header[n] = {"dtype": dtypes[tensors[n].dtype], "shape": list(tensors[n].shape),
                     "data_offsets": [offset, offset + len(raw)]}
        data, offset = data + raw, offset + len(raw)
    blob = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob + data


def random_tensors(n: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"aux_hidden_states": torch.randn(n, 12, generator=g).bfloat16(),
            "teacher_topk_ids": torch.randint(0, 50, (n, 3), generator=g, dtype=torch.int32),
            "teacher_topk_logprobs": torch.randn(n, 3, generator=g),
            "cu_seqlens": torch.tensor([0, n], dtype=torch.int64), "empty": torch.zeros(0, 4)}


def direct_io_supported(directory) -> bool:
    try:
        fd = os.open(directory / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT)
    except (OSError, AttributeError):
        return False
    os.close(fd)
    return True


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("block", [7, 5000, 1 << 20])
def test_part_bytes_and_streamed_sha256_match_reference(tmp_path, monkeypatch, block, direct):
    """Both disk paths (O_DIRECT through bounce buffers, buffered) write the documented bytes and hash them."""
    if direct and not direct_io_supported(tmp_path):
        pytest.skip(f"{tmp_path}: file system without O_DIRECT (the buffered path is tested)")
    monkeypatch.setattr(shards, "WRITE_BLOCK", block)  # odd sizes cut tensors mid-element and bounce buffers
    monkeypatch.setenv(shards.BUFFERED_ENV, "0" if direct else "1")
    sinks = []
    monkeypatch.setattr(shards, "_DirectSink", lambda *a: sinks.append(real_sink(*a)) or sinks[-1])
    tensors = random_tensors(301)
    sha, size = shards.write_part(tmp_path / "p.safetensors", tensors, {"part_index": "3"})
    assert len(sinks) == direct, "the O_DIRECT path ran where supported, and only there"
    got = (tmp_path / "p.safetensors").read_bytes()
    meta = {"format": shards.PART_FORMAT, "part_index": "3", "schema_version": str(shards.SCHEMA_VERSION)}
    assert got == reference_bytes(tensors, meta)
    assert sha == hashlib.sha256(got).hexdigest() == shards.sha256_file(tmp_path / "p.safetensors")
    assert size == len(got)
    with safe_open(str(tmp_path / "p.safetensors"), framework="pt") as f:
        for name, t in tensors.items():
            assert torch.equal(f.get_tensor(name), t)


real_sink = shards._DirectSink


def make_part(index: int, lengths: list[int], batches: list[tuple[int, int]], first_sample: int) -> PartPlan:
    rng = np.random.default_rng(index)
    seqs = [Sequence(first_sample + i, rng.integers(0, 50, n).astype(np.int32), np.ones(n, dtype=np.uint8))
            for i, n in enumerate(lengths)]
    return PartPlan(index, seqs, batches)


def batch_outputs(part: PartPlan, seed: int) -> list[dict]:
    """Random outputs per planned batch (what the target would produce)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for lo, hi in part.batches:
        n = sum(len(s) for s in part.sequences[lo:hi])
        out.append({"aux_hidden_states": torch.randn(n, 12, generator=g).bfloat16(),
                    "teacher_topk_ids": torch.randint(0, 50, (n, 3), generator=g, dtype=torch.int32),
                    "teacher_topk_logprobs": torch.randn(n, 3, generator=g)})
    return out


def submit_part(writer, part, outputs) -> None:
    offset = 0
    for b, out in enumerate(outputs):
        writer.submit(part, offset, out, last=b == len(outputs) - 1)
        offset += out["aux_hidden_states"].shape[0]


def test_assembling_never_waits_for_the_disk_and_parts_match_reference(tmp_path, monkeypatch):
    """While part 0 sits in a stalled disk write, all batches of part 1 (more than the writer queues hold) are
    accepted; every part's bytes equal write_part of its concatenated outputs (reused buffers leak nothing)."""
    parts = [make_part(0, [5, 6], [(0, 1), (1, 2)], 0),
             make_part(1, [3] * 12, [(i, i + 1) for i in range(12)], 10),
             make_part(2, [2, 4], [(0, 2)], 30)]            # smaller than part 0: a reused, larger buffer
    outputs = [batch_outputs(p, p.index) for p in parts]
    release, real_write_part = threading.Event(), shards.write_part

    def stalled_write_part(path, tensors, metadata, **kw):
        if metadata["part_index"] == "0":
            assert release.wait(60)
        return real_write_part(path, tensors, metadata, **kw)

    monkeypatch.setattr(dump_writer, "write_part", stalled_write_part)
    (tmp_path / "out").mkdir()
    writer = dump_writer.PartWriter(tmp_path / "out", SPECS, 12, torch.device("cpu"), {"k": "v"}, num_slots=1)
    submit_part(writer, parts[0], outputs[0])
    feeder = threading.Thread(target=submit_part, args=(writer, parts[1], outputs[1]))
    feeder.start()
    feeder.join(30)
    stalled = feeder.is_alive()
    release.set()
    feeder.join()
    assert not stalled, "the main thread waited for the disk while a part buffer was free"
    submit_part(writer, parts[2], outputs[2])
    written = writer.close()
    assert [w.index for w in written] == [0, 1, 2]
    for w, part, outs in zip(written, parts, outputs):
        tensors = dump_writer.sequence_tensors(part)
        tensors.update({name: torch.cat([o[name] for o in outs]) for name in SPECS})
        ref_sha, ref_size = real_write_part(tmp_path / f"ref-{part.index}", tensors, {"k": "v",
                                                                                     "part_index": str(part.index)})
        path = tmp_path / "out" / w.file
        assert path.read_bytes() == (tmp_path / f"ref-{part.index}").read_bytes()
        assert (w.sha256, w.bytes) == (ref_sha, ref_size)
        assert (w.num_tokens, w.num_sequences) == (part.num_tokens, len(part.sequences))


def test_disk_errors_reach_the_main_thread(tmp_path, monkeypatch):
    def failing_write_part(path, tensors, metadata, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(dump_writer, "write_part", failing_write_part)
    writer = dump_writer.PartWriter(tmp_path, SPECS, 12, torch.device("cpu"), {})
    part = make_part(0, [4, 4], [(0, 1), (1, 2)], 0)
    with pytest.raises(OSError, match="No space left"):
        for _ in range(50):  # the failure surfaces at a later submit or at close
            submit_part(writer, part, batch_outputs(part, 0))
        writer.close()
