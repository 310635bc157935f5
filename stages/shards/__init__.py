"""The teacher-shard format: the public contract between `dump-teacher` (writer) and `train` (reader).

Layout of a dump directory OUT::

    OUT/manifest.json                 schema_version; target provenance (path/id, config_sha256,
                                      tokenizer_sha256, weights_sha256 (of OUT/target/weights.safetensors),
                                      architecture, num_layers, hidden_size, vocab_size, dtype);
                                      aux_layer_ids; aux_dtype (the stored aux dtype);
                                      teacher {kind, k, logprob_dtype, probs_dtype};
                                      max_seq_len; loss_on; data {sources, fingerprint}; num_shards;
                                      part_tokens; settings {every option that changes the output}
                                      (the number of input records is in each done.json: it is only
                                      known once the data has been read)
    OUT/target/                       what stage two needs instead of the target: config.json, tokenizer
                                      files, weights.safetensors {embed_tokens.weight, lm_head.weight,
                                      norm.weight} (lm_head written even when tied)
    OUT/shards/shard-IIIII-of-NNNNN/part-PPPPP.safetensors   packed sequences
    OUT/shards/shard-IIIII-of-NNNNN/done.json                written last: the shard is complete

Tensors in a part (N tokens, S sequences), safetensors metadata {"format": "eagle-pipe-part", ...}:
    input_ids             int32  [N]
    loss_mask             uint8  [N]      1 = token is supervised (assistant turn tokens incl. end-of-turn)
    cu_seqlens            int64  [S+1]    sequence s is tokens cu_seqlens[s]:cu_seqlens[s+1]
    sample_index          int64  [S]      index of the record in the input (global, over all sources)
    aux_hidden_states     aux_dtype [N, 3*H]      layers in ascending order
    aux_scales            float32 [N, 3]  (aux_dtype float8_e4m3fn only) one scale per token and aux layer:
                                          aux ~= float32(q) * scale, scale = absmax / 448 (stages/shards/aux.py)
    teacher_topk_ids      int32  [N, k]   (topk) ids sorted by probability; column 0 is the argmax
    teacher_topk_logprobs float32 [N, k]  (topk) log-probabilities normalised over the full vocabulary
    teacher_argmax        int32  [N]      (argmax)
    teacher_probs         target dtype [N, V]   (softmax)
Position i's teacher is the target's distribution for token i+1 (the logits at position i).

done.json: {"shard_index", "num_shards", "manifest_sha256" (of the manifest this shard was written under),
"num_records" (records in the whole input, all shards), "parts": [{"file", "sha256", "bytes", "num_tokens",
"num_sequences"}], "records": {"assigned", "written", "truncated", "skipped": {reason: count}},
"written_sample_indices" (sorted list), "skipped_sample_indices" {reason: [..]}, "num_tokens",
"num_supervised_tokens", "token_counts" {"ids": [...], "counts": [...]} over supervised tokens (the input_ids
where loss_mask is 1; sparse, ascending ids)}. It holds no timings, so a rerun writes the same bytes.

Parts hold whole sequences; within a shard, sequences are sorted by (length, sample_index) and cut into parts of
about `part_tokens` tokens, so a rerun reproduces the same plan. Part files are never modified once renamed into
place; a rerun keeps the ones present (after checking their sample indices and metadata) and writes the missing ones.

Writes are atomic: write to a temporary name in the same directory (`.NAME.tmp-HOST-PID`), fsync, rename, fsync the
directory. Leftover temporary files never look complete and are removed by the next run of that shard.

Both stages import this module: change the format here and bump SCHEMA_VERSION.
Schema history: 1 = aux states always in the target dtype (no aux_dtype field); 2 = adds manifest aux_dtype
(bfloat16, float16, float32 or float8_e4m3fn, from --aux-dtype) and, for float8_e4m3fn, the aux_scales tensor.
Readers take SCHEMA_VERSION only (`schema_problem`): an older dump is refused in one line saying to re-run
dump-teacher, which rewrites it in this version.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path

SCHEMA_VERSION = 2
TEACHER_KINDS = ("topk", "argmax", "softmax")


def shard_dir(out: Path, shard_index: int, num_shards: int) -> Path:
    return Path(out) / "shards" / f"shard-{shard_index:05d}-of-{num_shards:05d}"


def part_name(part_index: int) -> str:
    return f"part-{part_index:05d}.safetensors"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """Streaming sha256 (constant memory, whatever the part size)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def temp_suffix() -> str:
    """host-pid: unique among jobs sharing a file system (PIDs alone repeat across nodes)."""
    import socket

    return f"{socket.gethostname()}-{os.getpid()}"


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory's fsync makes a rename in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write, fsync, rename: a crash leaves either the old file or the new one, never a torn one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{temp_suffix()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def read_json(path: Path):
    with open(path) as f:
        return json.load(f)


def write_file_atomic(path: Path, write) -> None:
    """`write(tmp_path)` writes the content; then fsync, rename, fsync the directory (for large files)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{temp_suffix()}")
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def remove_stale_temporaries(directory: Path) -> int:
    """Delete `.NAME.tmp-HOST-PID` leftovers of a crashed run (one job per shard directory); returns how many."""
    n = 0
    for tmp in Path(directory).glob(".*.tmp-*"):
        tmp.unlink(missing_ok=True)
        n += 1
    return n


# ---- parts ---------------------------------------------------------------------------------------------------

PART_FORMAT = "eagle-pipe-part"
REQUIRED_PART_TENSORS = ("input_ids", "loss_mask", "cu_seqlens", "sample_index", "aux_hidden_states")
TEACHER_TENSORS = {
    "topk": ("teacher_topk_ids", "teacher_topk_logprobs"),
    "argmax": ("teacher_argmax",),
    "softmax": ("teacher_probs",),
}


WRITE_BLOCK = 16 << 20   # bytes per sha256 update and per disk write: few syscalls, and the hasher stays close behind
DIRECT_ALIGN = 4096      # O_DIRECT offsets, lengths and buffer addresses are multiples of this
BUFFERED_ENV = "EAGLE_PIPE_BUFFERED_WRITES"  # "1": never O_DIRECT (a file system where it is slow)


def write_safetensors(path: Path, tensors: dict, metadata: dict[str, str]) -> tuple[str, int]:
    """A safetensors file with a *deterministic* header (sorted keys; safetensors' own writer orders metadata
    by hash, so equal content could give different bytes). Data is ordered by (itemsize descending, name), which
    keeps every tensor aligned. Returns (sha256, bytes) of what was written.

    The write costs the host one pass of sha256 and one memory copy per byte: the hash is computed from the
    tensors' memory while they are written (the file is never read back), and the data goes to the disk with
    O_DIRECT from two page-aligned bounce buffers (DMA, no page-cache copy and no dirty-page writeback, so a
    dump does not fill the node's memory). Where the file system refuses O_DIRECT, plain buffered writes.
    """
    import struct

    import torch

    from stages.dtypes import safetensors_name

    order = sorted(tensors, key=lambda n: (-tensors[n].element_size(), n))
    header: dict = {"__metadata__": dict(sorted(metadata.items()))}
    offset = 0
    for name in order:
        t = tensors[name]
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": safetensors_name(t.dtype),
                        "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    pieces = [torch.frombuffer(bytearray(struct.pack("<Q", len(blob)) + blob), dtype=torch.uint8)]
    for name in order:
        t = tensors[name].detach().to("cpu").contiguous()
        if t.numel():
            pieces.append(t.reshape(-1).view(torch.uint8))
    if hasattr(os, "O_DIRECT") and os.environ.get(BUFFERED_ENV) != "1":
        try:
            return _write_pieces(path, pieces, direct=True)
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # EINVAL: O_DIRECT unsupported here (or its alignment is larger)
                raise
    return _write_pieces(path, pieces, direct=False)


def _write_pieces(path: Path, pieces: list, direct: bool) -> tuple[str, int]:
    """Write 1-D uint8 tensors back to back (truncating `path`); sha256 on a helper thread as they go."""
    from concurrent.futures import ThreadPoolExecutor

    digest, size = hashlib.sha256(), 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if direct else 0), 0o644)
    try:
        # one worker each: hash updates run in submission order; leaving the block waits for all of them
        with ThreadPoolExecutor(1, "eagle-pipe-sha256") as hasher, ThreadPoolExecutor(1, "eagle-pipe-disk") as disk:
            sink = _DirectSink(fd, disk) if direct else None
            for piece in pieces:
                for lo in range(0, piece.numel(), WRITE_BLOCK):
                    block = piece[lo:lo + WRITE_BLOCK]
                    hasher.submit(digest.update, memoryview(block.numpy()))  # the view keeps `block` alive
                    if sink is not None:
                        sink.put(block)
                    else:
                        _pwrite_all(fd, memoryview(block.numpy()), size)
                    size += block.numel()
            if sink is not None:
                sink.finish(size)
    finally:
        os.close(fd)
    return digest.hexdigest(), size


class _DirectSink:
    """O_DIRECT writes through two page-aligned bounce buffers: one is filled (a torch copy, without the GIL)
    while the disk thread writes the other; the last block is padded to DIRECT_ALIGN, then the file is cut back
    to its true size."""

    def __init__(self, fd: int, disk):
        import mmap

        import torch

        self.fd, self.disk = fd, disk
        self.size = -(-WRITE_BLOCK // DIRECT_ALIGN) * DIRECT_ALIGN
        self.maps = [mmap.mmap(-1, self.size) for _ in range(2)]   # anonymous maps are page-aligned
        self.bufs = [torch.frombuffer(m, dtype=torch.uint8) for m in self.maps]
        self.pending: list = [None, None]
        self.current, self.filled, self.offset = 0, 0, 0

    def put(self, data) -> None:
        pos = 0
        while pos < data.numel():
            n = min(data.numel() - pos, self.size - self.filled)
            self.bufs[self.current][self.filled:self.filled + n].copy_(data[pos:pos + n])
            self.filled, pos = self.filled + n, pos + n
            if self.filled == self.size:
                self._flush(self.size)

    def _flush(self, nbytes: int) -> None:
        view = memoryview(self.maps[self.current])[:nbytes]
        self.pending[self.current] = self.disk.submit(_pwrite_all, self.fd, view, self.offset)
        self.offset += nbytes
        self.current, self.filled = 1 - self.current, 0
        if self.pending[self.current] is not None:   # the other buffer's write must be done before refilling it
            self.pending[self.current].result()
            self.pending[self.current] = None

    def finish(self, size: int) -> None:
        if self.filled:
            padded = -(-self.filled // DIRECT_ALIGN) * DIRECT_ALIGN
            self.bufs[self.current][self.filled:padded] = 0
            self._flush(padded)
        for future in self.pending:
            if future is not None:
                future.result()
        os.ftruncate(self.fd, size)


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def write_part(path: Path, tensors: dict, metadata: dict[str, str], *, pause_before_rename: float = 0.0
               ) -> tuple[str, int]:
    """Write one part atomically; returns (sha256, bytes), hashed while writing. Same tensors + metadata ->
    same bytes.

    `pause_before_rename` (seconds) exists for the crash test: it widens the window in which a kill leaves a
    temporary file behind.
    """
    import time

    meta = {"format": PART_FORMAT, "schema_version": str(SCHEMA_VERSION), **metadata}
    written = []

    def write(tmp):
        written.append(write_safetensors(tmp, tensors, meta))
        if pause_before_rename:
            time.sleep(pause_before_rename)

    write_file_atomic(path, write)
    return written[0]


def part_header(path: Path) -> dict:
    """Metadata, tensor shapes and dtypes of a part without reading its data: {"metadata", "tensors": {name:
    (shape, dtype-string)}}. Raises ValueError on a file that is not a readable safetensors file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {}
            for name in f.keys():
                sl = f.get_slice(name)
                tensors[name] = (list(sl.get_shape()), sl.get_dtype())
            return {"metadata": f.metadata() or {}, "tensors": tensors}
    except Exception as exc:  # safetensors raises its own error types for torn headers
        raise ValueError(f"{path}: not a readable safetensors part ({exc})") from None


def load_part(path: Path, names=None, device: str = "cpu") -> dict:
    """Tensors of one part (all, or `names`). The file is memory-mapped by safe_open; only the requested
    tensors are read."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device=str(device)) as f:
        keys = list(f.keys()) if names is None else list(names)
        return {name: f.get_tensor(name) for name in keys}


def read_done(out: Path, shard_index: int, num_shards: int) -> dict | None:
    path = shard_dir(out, shard_index, num_shards) / "done.json"
    return read_json(path) if path.is_file() else None


def iter_parts(out: Path):
    """Paths of every part of a complete dump, shard by shard, in part order (as listed in each done.json).

    Raises ValueError naming the first shard that is missing or not done; run `verify_dump` for a full check.
    """
    out = Path(out)
    manifest = read_json(out / "manifest.json")
    n = int(manifest["num_shards"])
    for i in range(n):
        done = read_done(out, i, n)
        if done is None:
            raise ValueError(f"{shard_dir(out, i, n)}: shard not complete (no done.json)")
        for part in done["parts"]:
            yield shard_dir(out, i, n) / part["file"]


# ---- manifest ------------------------------------------------------------------------------------------------

def schema_problem(manifest: dict, where) -> str | None:
    """One line when a manifest is not of this eagle-pipe's schema (None when it is)."""
    version = manifest.get("schema_version")
    if version == SCHEMA_VERSION:
        return None
    return (f"{where}: schema_version {version}, this eagle-pipe reads dumps of schema {SCHEMA_VERSION}: re-run "
            f"dump-teacher with this version (into a new --out) to rewrite it")


def canonical_json(obj) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()


def manifest_sha256(manifest: dict) -> str:
    return hashlib.sha256(canonical_json(manifest)).hexdigest()


def _flatten(obj, prefix=""):
    if isinstance(obj, dict):
        out = {}
        for key in obj:
            out.update(_flatten(obj[key], f"{prefix}{key}."))
        return out or {prefix[:-1]: {}}
    return {prefix[:-1]: obj}


def manifest_difference(existing: dict, new: dict) -> str | None:
    """The first field (dotted path, settings first) where two manifests differ, as one line; None if equal."""
    a, b = _flatten(existing), _flatten(new)
    keys = sorted(set(a) | set(b), key=lambda k: (not k.startswith("settings."), k))
    missing = object()
    for key in keys:
        va, vb = a.get(key, missing), b.get(key, missing)
        if va != vb:
            show = lambda v: "(absent)" if v is missing else json.dumps(v)[:80]  # noqa: E731
            return f"{key}: {show(va)} in the existing dump, {show(vb)} in this run"
    return None
