"""Overlapping the target's forward with device-to-host copies and disk writes.

The main thread runs the target batch after batch. Each batch's outputs ([n, 3H] aux states and teacher tensors)
are copied into one of a few *pinned* host slots with non_blocking copies and a CUDA event, then handed to the
assembler thread. The assembler waits for the event, copies the rows into the part being assembled (a reused
host buffer sized for the part: the plan knows each part's size), returns the slot at once, and hands a part to
the disk thread once its last batch is in. The disk thread serializes it, hashes it while writing and fsyncs it
(`shards.write_part`), then returns the buffer. Assembling never waits for the disk, so the GPU waits only when
the disk's sustained rate is below the GPU's; at most `num_slots` batches plus `num_part_buffers` (2) parts sit
in host memory. On CPU there is nothing to copy: outputs go straight to the assembler.
"""
from __future__ import annotations

import os
import queue
import threading
from dataclasses import dataclass

import numpy as np
import torch

from stages.dump.plan import PartPlan
from stages.shards import part_name, write_part

PAUSE_ENV = "EAGLE_PIPE_TEST_PART_PAUSE"  # seconds between writing a part's temp file and renaming it (tests)


@dataclass
class WrittenPart:
    index: int
    file: str
    sha256: str
    bytes: int
    num_tokens: int
    num_sequences: int


class _Slots:
    """A few reusable pinned host buffers per output name, sized for the largest batch."""

    def __init__(self, specs: dict[str, tuple[tuple[int, ...], torch.dtype]], max_rows: int, num_slots: int):
        self.buffers = [{name: torch.empty((max_rows, *shape), dtype=dtype, pin_memory=True)
                         for name, (shape, dtype) in specs.items()} for _ in range(num_slots)]
        self.free: queue.Queue = queue.Queue()
        for i in range(num_slots):
            self.free.put(i)


class PartWriter:
    """Assembles planned parts from batch outputs (assembler thread) and writes them (disk thread)."""

    def __init__(self, directory, specs: dict[str, tuple[tuple[int, ...], torch.dtype]], max_batch_rows: int,
                 device: torch.device, metadata: dict[str, str], num_slots: int = 3, num_part_buffers: int = 2):
        self.directory, self.specs, self.metadata = directory, specs, metadata
        self.cuda = device.type == "cuda"
        self.slots = _Slots(specs, max_batch_rows, num_slots) if self.cuda else None
        self.inbox: queue.Queue = queue.Queue(maxsize=num_slots + 1)
        self.assembled: queue.Queue = queue.Queue()  # (part, rows, buffer) or ("stop",); bounded by the buffers
        self.part_buffers: queue.Queue = queue.Queue()
        for _ in range(num_part_buffers):
            self.part_buffers.put({})  # allocated on first use, grown for a larger part, then reused
        self.written: list[WrittenPart] = []
        self.error: BaseException | None = None
        self.pause = float(os.environ.get(PAUSE_ENV, "0") or 0)
        self.threads = [threading.Thread(target=self._assemble, name="eagle-pipe-part-assembler", daemon=True),
                        threading.Thread(target=self._write_parts, name="eagle-pipe-part-writer", daemon=True)]
        for t in self.threads:
            t.start()

    # ---- main thread -------------------------------------------------------------------------------------------
    def submit(self, part: PartPlan, row_offset: int, outputs: dict[str, torch.Tensor], last: bool) -> None:
        """Queue one batch's outputs (rows row_offset.. of `part`); `last` closes the part."""
        self._raise_if_failed()
        if self.cuda:
            slot = _get(self.slots.free, self._raise_if_failed)
            bufs = self.slots.buffers[slot]
            host = {}
            for name, t in outputs.items():
                host[name] = bufs[name][: t.shape[0]]
                host[name].copy_(t, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._put(("batch", part, row_offset, host, event, slot, last))
        else:
            self._put(("batch", part, row_offset, outputs, None, None, last))

    def close(self) -> list[WrittenPart]:
        """Wait for every queued part to be on disk; re-raise a writer failure."""
        self._put(("stop",))
        for t in self.threads:
            t.join()
        self._raise_if_failed()
        return self.written

    def abort(self) -> None:
        try:
            self.inbox.put_nowait(("stop",))
        except queue.Full:
            pass

    def _put(self, item) -> None:
        while True:  # never block forever on a writer that died
            try:
                self.inbox.put(item, timeout=1.0)
                return
            except queue.Full:
                self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            raise self.error

    # ---- assembler thread --------------------------------------------------------------------------------------
    def _assemble(self) -> None:
        assembling: dict[int, tuple[dict[str, torch.Tensor], dict]] = {}
        while True:
            item = self.inbox.get()
            if item[0] == "stop":
                self.assembled.put(("stop",))
                return
            _, part, offset, host, event, slot, last = item
            try:
                if self.error is None:
                    if event is not None:
                        event.synchronize()
                    if part.index not in assembling:
                        buffer = _get(self.part_buffers, self._raise_if_failed)
                        assembling[part.index] = (self._part_rows(buffer, part.num_tokens), buffer)
                    rows, buffer = assembling[part.index]
                    for name, t in host.items():
                        rows[name][offset: offset + t.shape[0]].copy_(t)
                    if last:
                        self.assembled.put((part, *assembling.pop(part.index)))
            except BaseException as exc:  # surfaced on the main thread at the next submit/close
                self.error = exc
            if slot is not None:
                self.slots.free.put(slot)

    def _part_rows(self, buffer: dict, num_tokens: int) -> dict[str, torch.Tensor]:
        """Views of the first num_tokens rows of a reused buffer (reuse skips first-touch page faults)."""
        for name, (shape, dtype) in self.specs.items():
            if name not in buffer or buffer[name].shape[0] < num_tokens:
                buffer[name] = torch.empty((num_tokens, *shape), dtype=dtype)
        return {name: buffer[name][:num_tokens] for name in self.specs}

    # ---- disk thread -------------------------------------------------------------------------------------------
    def _write_parts(self) -> None:
        import nvtx

        while True:
            item = self.assembled.get()
            if item[0] == "stop":
                return
            part, rows, buffer = item
            try:
                if self.error is None:
                    with nvtx.annotate("write", color="green"):
                        tensors = dict(sequence_tensors(part))
                        tensors.update(rows)
                        name = part_name(part.index)
                        meta = dict(self.metadata, part_index=str(part.index))
                        sha, size = write_part(self.directory / name, tensors, meta, pause_before_rename=self.pause)
                        self.written.append(WrittenPart(part.index, name, sha, size, part.num_tokens,
                                                        len(part.sequences)))
            except BaseException as exc:  # surfaced on the main thread at the next submit/close
                self.error = exc
            self.part_buffers.put(buffer)


def _get(q: queue.Queue, raise_if_failed):
    """q.get() that gives up with the other side's error instead of waiting forever on a thread that died."""
    while True:
        try:
            return q.get(timeout=1.0)
        except queue.Empty:
            raise_if_failed()


def sequence_tensors(part: PartPlan) -> dict[str, torch.Tensor]:
    """input_ids, loss_mask, cu_seqlens, sample_index of a part (everything that does not need the target)."""
    seqs = part.sequences
    cu = np.zeros(len(seqs) + 1, dtype=np.int64)
    cu[1:] = np.cumsum([len(s) for s in seqs])
    return {
        "input_ids": torch.from_numpy(np.concatenate([s.input_ids for s in seqs]).astype(np.int32)),
        "loss_mask": torch.from_numpy(np.concatenate([s.loss_mask for s in seqs]).astype(np.uint8)),
        "cu_seqlens": torch.from_numpy(cu),
        "sample_index": torch.tensor([s.sample_index for s in seqs], dtype=torch.int64),
    }
