"""Training data from teacher shards: memory-mapped parts -> packed, fixed-shape batches for `eagle.ttt`.

A document of n stored tokens gives n-1 training positions t = 0..n-2 (the batch contract of `eagle/ttt.py`):
position t carries f_t (aux features of stored token t), x_{t+1} (the token fed at t), the teacher of stored
position t+1 (the target's distribution over x_{t+2}) and the loss mask of token t+2 (False for t = n-2, whose
token does not exist). Documents with more positions than `seq_len` are split into independent chunks whose
positions restart at 0 (`long_sequences="split"`), or cut to their first `seq_len` positions ("truncate").

Chunks are packed into rows of exactly `seq_len` positions (best fit decreasing inside windows of the shuffled
chunk order; the rest of a row is padding, one padding "document" with loss_mask False), so every batch has the
same shape and the compiled step never recompiles. Everything is deterministic per (seed, epoch): the plan is a
pure function of the shard contents, so every rank builds the same plan and takes its own slice of each global
batch — micro-batch m of rank r of optimizer step s holds rows s*G + (m*W + r)*B .. +B (G = B*W*A rows per step),
so W ranks x A micro-batches of B rows see exactly the rows one process with B*W*A rows would.

The held-out split is by document (a hash of the record's sample_index and the seed), so no document is split
between training and evaluation. Parts are read with positioned reads (`PartFile`: each chunk is one preadv per
tensor from the file straight into the batch, so a batch costs one kernel copy per byte that runs without the GIL);
batches are built in background threads, into pinned memory when training on CUDA and into reused host buffers
on CPU.
"""
from __future__ import annotations

import bisect
import json
import math
import os
import queue
import struct
import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from stages.shards.aux import AUX_KEYS
from stages.dtypes import SAFETENSORS, from_safetensors
from stages.errors import StageError
from stages.shards import TEACHER_KINDS, read_json, schema_problem, shard_dir

PACK_WINDOW = 1024  # chunks packed together; bigger windows pack tighter but cost more planning time
ADVISE_MIN_BYTES = 128 << 10  # smaller reads are one readahead window anyway: not worth a WILLNEED syscall


class DumpIndex:
    """Every document of one teacher dump: its part, first token, length and sample index (numpy arrays)."""

    def __init__(self, teacher_dir: str | Path):
        self.root = Path(teacher_dir)
        manifest_path = self.root / "manifest.json"
        if not manifest_path.is_file():
            raise StageError(f"{manifest_path}: missing (not a teacher dump)")
        self.manifest = read_json(manifest_path)
        problem = schema_problem(self.manifest, manifest_path)
        if problem:
            raise StageError(problem)
        teacher = self.manifest.get("teacher") or {}
        self.teacher_kind = teacher.get("kind")
        if self.teacher_kind not in TEACHER_KINDS:
            raise StageError(f"{manifest_path}: teacher kind {self.teacher_kind!r} is not one of {TEACHER_KINDS}")
        self.topk = int(teacher.get("k") or 0)
        num_shards = int(self.manifest.get("num_shards", 0))
        self.parts: list[Path] = []
        self.done: list[dict] = []
        part_ids, starts, lengths, samples = [], [], [], []
        for i in range(num_shards):
            sdir = shard_dir(self.root, i, num_shards)
            done_path = sdir / "done.json"
            if not done_path.is_file():
                raise StageError(f"{done_path}: missing (shard {i} of {num_shards} is not complete)")
            done = read_json(done_path)
            self.done.append(done)
            for entry in done.get("parts", []):
                path = sdir / entry["file"]
                with safe_open(str(path), framework="pt") as f:
                    cu = f.get_tensor("cu_seqlens").to(torch.int64).numpy()
                    si = f.get_tensor("sample_index").to(torch.int64).numpy()
                if len(cu) != len(si) + 1:
                    raise StageError(f"{path}: cu_seqlens has {len(cu)} entries for {len(si)} sequences")
                part_ids.append(np.full(len(si), len(self.parts), dtype=np.int64))
                starts.append(cu[:-1])
                lengths.append(np.diff(cu))
                samples.append(si)
                self.parts.append(path)
        cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0, dtype=np.int64)  # noqa: E731
        self.part_id, self.start, self.length, self.sample_index = map(cat, (part_ids, starts, lengths, samples))

    @property
    def num_documents(self) -> int:
        return len(self.length)

    def split(self, eval_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """(train doc ids, held-out doc ids): a document is held out when a hash of (seed, sample_index) falls
        under eval_fraction; stable whatever the sharding. At least one held-out document when fraction > 0."""
        n = self.num_documents
        if eval_fraction <= 0 or n < 2:
            return np.arange(n), np.zeros(0, dtype=np.int64)
        u = _hash_unit(self.sample_index, seed)
        held = u < eval_fraction
        if not held.any():
            held[np.argmin(u)] = True
        return np.flatnonzero(~held), np.flatnonzero(held)


def _hash_unit(values: np.ndarray, seed: int) -> np.ndarray:
    """splitmix64 of (value, seed) mapped to [0, 1)."""
    with np.errstate(over="ignore"):
        z = values.astype(np.uint64) + np.uint64((seed * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) % 2**64)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(2**53)


@dataclass
class Chunks:
    """Training pieces of documents: chunk c is positions pos[c]..pos[c]+count[c]-1 of document doc[c]."""

    doc: np.ndarray
    pos: np.ndarray
    count: np.ndarray
    documents: int = 0
    split_documents: int = 0
    truncated_documents: int = 0
    dropped_positions: int = 0
    short_documents: int = 0

    def report(self) -> dict:
        d = asdict(self)
        for k in ("doc", "pos", "count"):
            d.pop(k)
        d["chunks"] = int(len(self.doc))
        d["positions"] = int(self.count.sum())
        return d


def make_chunks(index: DumpIndex, doc_ids: np.ndarray, seq_len: int, long_sequences: str = "split") -> Chunks:
    """Cut documents into chunks of at most seq_len positions (split) or keep only the first (truncate)."""
    if long_sequences not in ("split", "truncate"):
        raise ValueError(f"long_sequences must be 'split' or 'truncate', got {long_sequences!r}")
    positions = index.length[doc_ids] - 1
    usable = positions >= 1
    docs, positions = doc_ids[usable], positions[usable]
    long = positions > seq_len
    if long_sequences == "split":
        pieces = -(-positions // seq_len)
        doc = np.repeat(docs, pieces)
        first = np.repeat(np.cumsum(pieces) - pieces, pieces)
        pos = (np.arange(len(doc)) - first) * seq_len
        count = np.minimum(np.repeat(positions, pieces) - pos, seq_len)
        dropped = 0
    else:
        doc, pos, count = docs, np.zeros(len(docs), dtype=np.int64), np.minimum(positions, seq_len)
        dropped = int((positions - count).sum())
    return Chunks(doc=doc.astype(np.int64), pos=pos.astype(np.int64), count=count.astype(np.int64),
                  documents=int(len(docs)), split_documents=int(long.sum()) if long_sequences == "split" else 0,
                  truncated_documents=int(long.sum()) if long_sequences == "truncate" else 0,
                  dropped_positions=dropped, short_documents=int((~usable).sum()))


def pack_rows(counts: np.ndarray, order: np.ndarray, seq_len: int, window: int = PACK_WINDOW) -> list[list[int]]:
    """Best-fit-decreasing packing of chunks (visited in `order`, window by window) into rows of seq_len."""
    rows: list[list[int]] = []
    for w in range(0, len(order), window):
        group = order[w:w + window]
        group = group[np.argsort(-counts[group], kind="stable")]
        free: list[tuple[int, int]] = []  # sorted (remaining capacity, row index)
        for c in group.tolist():
            need = int(counts[c])
            i = bisect.bisect_left(free, (need, -1))
            if i < len(free):
                room, r = free.pop(i)
            else:
                room, r = seq_len, len(rows)
                rows.append([])
            rows[r].append(c)
            if room - need > 0:
                bisect.insort(free, (room - need, r))
    return rows


def epoch_rows(chunks: Chunks, seq_len: int, seed: int, epoch: int, shuffle: bool = True) -> list[list[int]]:
    """The packed rows of one epoch, in training order: a pure function of (chunks, seed, epoch)."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(chunks.doc)) if shuffle else np.arange(len(chunks.doc))
    rows = pack_rows(chunks.count, order, seq_len)
    if shuffle:
        rows = [rows[i] for i in rng.permutation(len(rows))]
    return rows


SAFETENSORS_DTYPES = {st: from_safetensors(st) for st in SAFETENSORS.values()}   # header name -> torch dtype


class PartFile:
    """One part file opened for positioned reads: `read_rows(name, lo, hi, out)` copies the stored bytes of rows
    lo:hi of a tensor straight into `out` with preadv (one syscall per range: the kernel copies from the page cache
    at memory-copy speed without the GIL, and without the page faults of a mapping, so worker threads copy in
    parallel). The bytes are copied as stored, whatever the element type; only a destination of another dtype
    (int32 ids into int64, uint8 mask into bool) goes through a scratch buffer and one conversion.
    `advise(name, lo, hi)` asks the kernel to start reading a range of at least ADVISE_MIN_BYTES
    (POSIX_FADV_WILLNEED), so the large reads of a cold batch are in flight together."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.fd = os.open(self.path, os.O_RDONLY)
        try:
            (n,) = struct.unpack("<Q", self._pread(8, 0))
            header = json.loads(self._pread(min(n, os.fstat(self.fd).st_size), 8))
        except (struct.error, ValueError) as exc:
            self.close()
            raise StageError(f"{self.path}: not a readable safetensors part ({exc})") from None
        header.pop("__metadata__", None)
        self._tensors = {}
        for name, t in header.items():
            dtype, shape = SAFETENSORS_DTYPES[t["dtype"]], t["shape"]
            row_bytes = math.prod(shape[1:]) * torch.empty((), dtype=dtype).element_size()
            self._tensors[name] = (dtype, shape, 8 + n + t["data_offsets"][0], row_bytes)

    def _pread(self, n: int, offset: int) -> bytes:
        data = os.pread(self.fd, n, offset)
        if len(data) != n:
            raise StageError(f"{self.path}: ends at byte {offset + len(data)}, inside its header (truncated part?)")
        return data

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def shape(self, name: str) -> list[int]:
        return list(self._tensors[name][1])

    def dtype(self, name: str) -> torch.dtype:
        return self._tensors[name][0]

    def advise(self, name: str, lo: int, hi: int) -> None:
        _, _, start, row_bytes = self._tensors[name]
        if (hi - lo) * row_bytes >= ADVISE_MIN_BYTES:
            os.posix_fadvise(self.fd, start + lo * row_bytes, (hi - lo) * row_bytes, os.POSIX_FADV_WILLNEED)

    def read_rows(self, name: str, lo: int, hi: int, out: torch.Tensor, scratch) -> None:
        """out[:] = rows lo:hi of `name`; `scratch(nbytes)` lends a reusable uint8 buffer for conversions."""
        dtype, shape, start, row_bytes = self._tensors[name]
        if hi <= lo:
            return
        direct = out.dtype == dtype and out.is_contiguous()
        dst = out if direct else scratch((hi - lo) * row_bytes).view(dtype).view(hi - lo, *shape[1:])
        view = memoryview(dst.reshape(-1).view(torch.uint8).numpy())
        offset, done = start + lo * row_bytes, 0
        while done < len(view):
            got = os.preadv(self.fd, [view[done:]], offset + done)
            if got == 0:
                raise StageError(f"{self.path}: ends at byte {offset + done}, inside {name} (truncated part?)")
            done += got
        if not direct:
            out.copy_(dst)

    def close(self) -> None:
        if getattr(self, "fd", -1) >= 0:  # a failed os.open leaves no fd; never close a number twice
            os.close(self.fd)
            self.fd = -1

    __del__ = close


class PartReader:
    """Open parts of a dump and a scratch buffer, per thread (an LRU cache of at most `max_open` files)."""

    def __init__(self, index: DumpIndex, max_open: int = 64):
        self.index = index
        self.max_open = max_open
        self._local = threading.local()

    def open(self, part: int) -> PartFile:
        cache = getattr(self._local, "cache", None)
        if cache is None:
            cache = self._local.cache = OrderedDict()
        handle = cache.get(part)
        if handle is None:
            handle = PartFile(self.index.parts[part])
            cache[part] = handle
            if len(cache) > self.max_open:
                cache.popitem(last=False)[1].close()
        else:
            cache.move_to_end(part)
        return handle

    def scratch(self, nbytes: int) -> torch.Tensor:
        buf = getattr(self._local, "scratch", None)
        if buf is None or buf.numel() < nbytes:
            buf = self._local.scratch = torch.empty(max(nbytes, 1 << 20), dtype=torch.uint8)
        return buf[:nbytes]


def empty_batch(batch_size: int, seq_len: int, aux_width: int, aux_dtype: torch.dtype, teacher_kind: str,
                topk: int, vocab_size: int, pin: bool = False, aux_scales: int = 0) -> dict[str, torch.Tensor]:
    """Host tensors of the batch contract (values are filled by `fill_batch`). Aux states keep the stored dtype;
    FP8 ones come with their `aux_scales` [B, T, aux_scales] (one per aux layer) and are dequantized in the step
    (stages/shards/aux.py)."""
    B, T = batch_size, seq_len
    shapes = {
        "aux_hidden_states": ((B, T, aux_width), aux_dtype), "input_ids": ((B, T), torch.int64),
        "position_ids": ((B, T), torch.int64), "document_ids": ((B, T), torch.int64),
        "loss_mask": ((B, T), torch.bool),
    }
    if aux_scales:
        shapes["aux_scales"] = ((B, T, aux_scales), torch.float32)
    if teacher_kind == "topk":
        shapes["teacher_topk_ids"] = ((B, T, topk), torch.int64)
        shapes["teacher_topk_logprobs"] = ((B, T, topk), torch.float32)
    elif teacher_kind == "argmax":
        shapes["teacher_argmax"] = ((B, T), torch.int64)
    else:
        shapes["teacher_probs"] = ((B, T, vocab_size), torch.float32)
    return {k: torch.empty(s, dtype=d, pin_memory=pin) for k, (s, d) in shapes.items()}


# where position t of a chunk reads its rows: stored token t + shift (features of token t; the token fed and the
# teacher both belong to stored token t+1)
ROW_SHIFT = {"aux_hidden_states": 0, "aux_scales": 0, "input_ids": 1, "teacher_topk_ids": 1, "teacher_topk_logprobs": 1,
             "teacher_argmax": 1, "teacher_probs": 1}


def fill_batch(batch: dict, reader: PartReader, chunks: Chunks, rows: list[list[int]]) -> None:
    """Write the given packed rows into `batch` (rows beyond len(rows) become all padding).

    Each chunk costs one contiguous read per tensor (n rows of the stored bytes). All reads of the batch are
    first announced to the kernel (WILLNEED), then done in file order (part, offset), so a cold batch streams."""
    index, T = reader.index, batch["input_ids"].shape[1]
    kind = index.teacher_kind
    copied = [key for key in ROW_SHIFT if key in batch]
    aux_keys = [key for key in AUX_KEYS if key in batch]
    arange = torch.arange(T)
    reads = []  # (part, first stored token, positions, end of the document's mask range, row, offset)
    for b in range(batch["input_ids"].shape[0]):
        o = 0
        segments = rows[b] if b < len(rows) else []
        for j, c in enumerate(segments):
            d, a, n_pos = int(chunks.doc[c]), int(chunks.pos[c]), int(chunks.count[c])
            s0, n = int(index.start[d]), int(index.length[d])
            lo = s0 + a                              # stored tokens lo..lo+n_pos-1 of this chunk
            m_hi = min(lo + n_pos + 2, s0 + n)       # token t+2 exists only for t <= n-3
            reads.append((int(index.part_id[d]), lo, n_pos, m_hi, b, o))
            batch["position_ids"][b, o:o + n_pos] = arange[:n_pos]
            batch["document_ids"][b, o:o + n_pos] = j
            o += n_pos
        if o < T:  # padding: one extra document, never supervised, with harmless finite teacher values
            pad = slice(o, T)
            for key in aux_keys:
                batch[key][b, pad] = 0
            batch["input_ids"][b, pad] = 0
            batch["position_ids"][b, pad] = arange[:T - o]
            batch["document_ids"][b, pad] = len(segments)
            batch["loss_mask"][b, pad] = False
            if kind == "topk":
                k = batch["teacher_topk_ids"].shape[2]
                batch["teacher_topk_ids"][b, pad] = torch.arange(k)
                batch["teacher_topk_logprobs"][b, pad] = -math.log(k)
            elif kind == "argmax":
                batch["teacher_argmax"][b, pad] = 0
            else:
                batch["teacher_probs"][b, pad] = 1.0 / batch["teacher_probs"].shape[2]
    reads.sort()
    for part, lo, n_pos, _, _, _ in reads:
        f = reader.open(part)
        for key in copied:
            f.advise(key, lo + ROW_SHIFT[key], lo + ROW_SHIFT[key] + n_pos)
    for part, lo, n_pos, m_hi, b, o in reads:
        f = reader.open(part)
        for key in copied:
            f.read_rows(key, lo + ROW_SHIFT[key], lo + ROW_SHIFT[key] + n_pos, batch[key][b, o:o + n_pos],
                        reader.scratch)
        mask = batch["loss_mask"][b, o:o + n_pos]
        mask.zero_()
        f.read_rows("loss_mask", lo + 2, m_hi, mask[:max(m_hi - lo - 2, 0)], reader.scratch)


def teacher_in_draft(batch: dict, t2d: torch.Tensor, teacher_kind: str) -> torch.Tensor:
    """bool [B, T]: the teacher leaves some mass inside the draft vocab (the loss's own rule, in float32)."""
    if teacher_kind == "topk":
        probs = batch["teacher_topk_logprobs"].float().exp()
        return (probs * t2d[batch["teacher_topk_ids"]]).sum(-1) > 0
    if teacher_kind == "argmax":
        return t2d[batch["teacher_argmax"]]
    return (batch["teacher_probs"].float() * t2d).sum(-1) > 0


def valid_counts(batch: dict, steps: int, t2d: torch.Tensor, teacher_kind: str) -> torch.Tensor:
    """float32 [steps]: positions counted by the loss at each TTT step (loss_mask, teacher in the draft vocab,
    and at least j earlier positions of the same document). Computed on the host from the CPU batch."""
    base = batch["loss_mask"] & teacher_in_draft(batch, t2d, teacher_kind)
    pos = batch["position_ids"]
    return torch.stack([(base & (pos >= j)).sum() for j in range(steps)]).to(torch.float32)


@dataclass(frozen=True)
class AnchorPlan:
    """DFlash training: `count` anchor blocks of `block_size` per packed row (eagle/dflash.py sample_anchors),
    drawn from a generator seeded by (seed, epoch, the row's index in the epoch's rows): the same anchors whatever
    the ranks, accumulation and resume, new ones each epoch."""

    block_size: int
    count: int
    seed: int

    def add(self, batch: dict, epoch: int, first_row: int, in_draft: torch.Tensor | None = None) -> torch.Tensor:
        """Put "anchors" / "anchor_valid" (B, N) into the batch; returns the loss's counts per slot [block-1]
        (`in_draft` (B, T): rows whose teacher keeps mass in the draft vocabulary, `teacher_in_draft`)."""
        from eagle.dflash import sample_anchors, target_counts

        picked = []
        for b in range(batch["input_ids"].shape[0]):
            seed = int(_hash_unit(np.array([first_row + b]), self.seed * 1_000_003 + epoch)[0] * 2**53)
            row = {k: batch[k][b:b + 1] for k in ("document_ids", "loss_mask")}
            picked.append(sample_anchors(row, self.count, torch.Generator().manual_seed(seed)))
        batch["anchors"] = torch.cat([a for a, _ in picked])
        batch["anchor_valid"] = torch.cat([v for _, v in picked])
        return target_counts(batch, self.block_size, in_draft)


class PackedLoader:
    """Optimizer steps of packed batches for one rank: iterate to get, per step, `grad_accum` pairs
    (batch dict of host tensors, valid counts [steps] of that micro-batch). Stateful for resume.
    With `anchors` (DFlash) each batch also holds its anchor blocks and the counts are per block slot."""

    def __init__(self, index: DumpIndex, doc_ids: np.ndarray, *, seq_len: int, batch_size: int, steps: int,
                 t2d: torch.Tensor, rank: int = 0, world_size: int = 1, grad_accum: int = 1, seed: int = 0,
                 long_sequences: str = "split", shuffle: bool = True, drop_last: bool = True, pin: bool = False,
                 num_workers: int = 1, prefetch: int = 2, reuse_buffers: bool = False,
                 anchors: AnchorPlan | None = None):
        self.index, self.seq_len, self.batch_size, self.steps, self.t2d = index, seq_len, batch_size, steps, t2d
        self.anchors = anchors
        self.rank, self.world_size, self.grad_accum, self.seed = rank, world_size, grad_accum, seed
        self.shuffle, self.drop_last, self.pin = shuffle, drop_last, pin
        self.num_workers, self.prefetch = max(1, num_workers), max(1, prefetch)
        # Reusing host buffers avoids first-touch page faults of fresh ~GB tensors (5x faster batches on CPU).
        # Safe only for a consumer that is done with a step when it asks for the next (the CPU trainer); on
        # CUDA, pinned memory comes from torch's caching host allocator, which already reuses it safely.
        self.reuse_buffers = reuse_buffers and not pin
        self._buffers: dict[tuple[int, int, int], dict] = {}
        self.chunks = make_chunks(index, doc_ids, seq_len, long_sequences)
        self.reader = PartReader(index)
        self.epoch, self.step = 0, 0      # position: next optimizer step `step` of epoch `epoch`
        self._rows_cache: tuple[int, list[list[int]]] | None = None
        self.aux_width, self.aux_dtype, self.aux_scales = self._aux_layout()

    def _aux_layout(self) -> tuple[int, torch.dtype, int]:
        """(aux width, stored dtype, FP8 scales per row: one per aux layer, 0 without)."""
        if not self.index.parts:
            raise StageError(f"{self.index.root}: the dump holds no parts")
        part = PartFile(self.index.parts[0])
        try:
            scales = part.shape("aux_scales")[1] if "aux_scales" in part else 0
            return part.shape("aux_hidden_states")[1], part.dtype("aux_hidden_states"), scales
        finally:
            part.close()

    @property
    def rows_per_step(self) -> int:
        return self.batch_size * self.world_size * self.grad_accum

    def rows(self, epoch: int) -> list[list[int]]:
        if self._rows_cache is None or self._rows_cache[0] != epoch:
            self._rows_cache = (epoch, epoch_rows(self.chunks, self.seq_len, self.seed, epoch, self.shuffle))
        return self._rows_cache[1]

    def steps_per_epoch(self) -> int:
        n = len(self.rows(self.epoch if self.shuffle else 0))
        return n // self.rows_per_step if self.drop_last else -(-n // self.rows_per_step)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.step = int(state["epoch"]), int(state["step"])

    def first_row(self, step: int, micro: int) -> int:
        """Index in the epoch's rows of the first row of this rank's micro-batch `micro` of optimizer step `step`."""
        return step * self.rows_per_step + (micro * self.world_size + self.rank) * self.batch_size

    def micro_rows(self, rows: list[list[int]], step: int, micro: int) -> list[list[int]]:
        first = self.first_row(step, micro)
        return rows[first:first + self.batch_size]

    def build(self, rows: list[list[int]], slot: tuple[int, int, int] | None = None,
              where: tuple[int, int] = (0, 0)) -> tuple[dict, torch.Tensor]:
        """The batch of `rows`; `where` = (epoch, index of rows[0] in the epoch's rows) seeds DFlash anchors."""
        batch = self._buffers.get(slot) if slot is not None else None
        if batch is None:
            batch = empty_batch(self.batch_size, self.seq_len, self.aux_width, self.aux_dtype,
                                self.index.teacher_kind, self.index.topk, int(self.t2d.numel()), pin=self.pin,
                                aux_scales=self.aux_scales)
            if slot is not None:
                self._buffers[slot] = batch
        fill_batch(batch, self.reader, self.chunks, rows)
        if self.anchors is not None:
            return batch, self.anchors.add(batch, *where,
                                           in_draft=teacher_in_draft(batch, self.t2d, self.index.teacher_kind))
        return batch, valid_counts(batch, self.steps, self.t2d, self.index.teacher_kind)

    def epoch_plan(self) -> list[tuple[int, int]]:
        """(epoch, step) pairs left in the current epoch, from the saved position."""
        return [(self.epoch, s) for s in range(self.step, self.steps_per_epoch())]

    def __iter__(self):
        """Yield the rest of the current epoch, one optimizer step (list of grad_accum micro-batches) at a time;
        the position advances as steps are taken, then moves to the next epoch."""
        plan = self.epoch_plan()
        epoch = self.epoch
        rows = self.rows(epoch)

        ring = self.prefetch + 2  # per worker: queued items + the one being built + the one in use

        def produce(i: int, step: int) -> list[tuple[dict, torch.Tensor]]:
            worker, slot = i % self.num_workers, (i // self.num_workers) % ring
            return [self.build(self.micro_rows(rows, step, m), (worker, slot, m) if self.reuse_buffers else None,
                               where=(epoch, self.first_row(step, m))) for m in range(self.grad_accum)]

        for step, item in _prefetched([s for _, s in plan], produce, self.num_workers, self.prefetch):
            self.epoch, self.step = epoch, step + 1
            yield item
        self.epoch, self.step = epoch + 1, 0


def _prefetched(keys: list, produce, num_workers: int, depth: int):
    """Yield (key, produce(i, key)) for keys[i] in order, computed ahead by `num_workers` threads (worker w makes
    items w, w+n, ...; at most `depth` finished ones wait per worker). A worker's exception is re-raised here."""
    if not keys:
        return
    stop = threading.Event()
    queues = [queue.Queue(maxsize=depth) for _ in range(num_workers)]

    def work(w: int):
        for i in range(w, len(keys), num_workers):
            key = keys[i]
            if stop.is_set():
                return
            try:
                item = (key, produce(i, key), None)
            except BaseException as e:  # noqa: BLE001 - handed to the consumer
                item = (key, None, e)
            while not stop.is_set():
                try:
                    queues[w].put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item[2] is not None:
                return

    threads = [threading.Thread(target=work, args=(w,), daemon=True, name=f"eagle-loader-{w}")
               for w in range(num_workers)]
    for t in threads:
        t.start()
    try:
        for i in range(len(keys)):
            key, value, error = queues[i % num_workers].get()
            if error is not None:
                raise error
            yield key, value
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=5)
