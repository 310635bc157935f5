"""Reading raw records from data sources: JSONL (.jsonl, .jsonl.gz), JSON, Parquet, `datasets` dirs and names.

Every reader is a generator `reader(source, start, select)` that yields `(sample_index, where, record)` for
the selected records and *returns* how many records the source holds, so `read_records` can number records
globally without parsing the ones another shard will tokenize. `record` is a dict (or any JSON value) or a
`RecordError` for a record that could not even be parsed (bad bytes, malformed JSON line).

Numbering: a JSONL source has one record per non-blank line; a JSON source one per list element; Parquet and
`datasets` one per row. Sources are read in the order given; a directory of data files in sorted name order;
the output directory of `eagle-pipe regenerate` by the original sample_index (every shard must be complete).
"""
from __future__ import annotations

import gzip
import heapq
import json
import os
from pathlib import Path
from typing import Callable, Iterator

from stages import shards
from stages.data import regenerated
from stages.errors import StageError

DATA_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet")
PARQUET_BATCH_ROWS = 1024


class RecordError(Exception):
    """One record that cannot be used: `reason` is a short machine-readable code, the message says why."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


Select = Callable[[int], bool] | None


def _selected(select: Select, index: int) -> bool:
    return select is None or select(index)


def _open_bytes(path: Path):
    return gzip.open(path, "rb") if path.name.endswith(".gz") else path.open("rb")


def read_jsonl(path: Path, start: int, select: Select) -> Iterator:
    """One record per non-blank line; lines are decoded one by one so bad bytes only cost their record."""
    n = 0
    try:
        with _open_bytes(path) as f:
            for line_no, raw in enumerate(f, 1):
                if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]
                if not raw.strip():
                    continue
                index = start + n
                n += 1
                if not _selected(select, index):
                    continue
                yield index, f"{path}:{line_no}", parse_json_line(raw)
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise StageError(f"{path}: cannot read: {exc}") from None
    return n


def parse_json_line(raw: bytes):
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return RecordError("bad_encoding", f"not valid UTF-8 (byte {exc.start}: {raw[exc.start:exc.start + 1]!r})")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        return RecordError("malformed_json", f"malformed JSON: {exc.msg} (column {exc.colno})")


def read_json(path: Path, start: int, select: Select) -> Iterator:
    """A JSON document: a list of records, or an object holding the list under "data" (else one record).

    A `.json` file that is really JSON Lines (several documents) is read as JSONL.
    """
    try:
        with _open_bytes(path) as f:
            data = f.read()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise StageError(f"{path}: cannot read: {exc}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise StageError(f"{path}: not valid UTF-8 at byte {exc.start}") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # several JSON documents: JSON Lines under a .json name
            return (yield from read_jsonl(path, start, select))
        raise StageError(f"{path}:{exc.lineno}: malformed JSON: {exc.msg} (column {exc.colno})") from None
    if isinstance(doc, dict) and isinstance(doc.get("data"), list):
        records = doc["data"]
    elif isinstance(doc, list):
        records = doc
    else:
        records = [doc]
    for i, rec in enumerate(records):
        if _selected(select, start + i):
            yield start + i, f"{path}[{i}]", rec
    return len(records)


def read_parquet(path: Path, start: int, select: Select) -> Iterator:
    """Row batches via pyarrow (never the whole file in memory); a batch becomes Python objects only when one
    of its rows is selected."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        n = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=PARQUET_BATCH_ROWS):
            yield from _rows_of_batch(batch.num_rows, batch.to_pylist, f"{path}", start, n, select)
            n += batch.num_rows
    except (OSError, pa.ArrowException) as exc:
        raise StageError(f"{path}: cannot read Parquet: {exc}") from None
    return n


def read_dataset(ds, label: str, start: int, select: Select) -> Iterator:
    """Rows of a `datasets.Dataset`, fetched a batch at a time; `where` is `label[row]`."""
    n, step = len(ds), 1000
    for lo in range(0, n, step):
        hi = min(n, lo + step)

        def rows(lo=lo, hi=hi):
            columns = ds[lo:hi]
            return [{k: v[r] for k, v in columns.items()} for r in range(hi - lo)]

        yield from _rows_of_batch(hi - lo, rows, label, start, lo, select)
    return n


def _rows_of_batch(num_rows: int, to_rows, label: str, start: int, first_row: int, select: Select) -> Iterator:
    """Yield the selected rows of one batch. `select` is called once per row, in order, each selected row
    yielded before the next call (so a select that stops the run early by raising loses nothing)."""
    rows = None
    for r in range(num_rows):
        index = start + first_row + r
        if not _selected(select, index):
            continue
        if rows is None:
            rows = to_rows()
        yield index, f"{label}[{first_row + r}]", rows[r]


def read_regenerated(out: Path, start: int, select) -> Iterator:
    """A complete output of `eagle-pipe regenerate` (layout: stages/data/regenerated.py): the written records of
    every shard, merged by their original sample_index, so the order does not depend on the number of shards.
    `where` is `part.jsonl:LINE`; returns the number of records."""
    out = Path(out)
    try:
        num_shards = int(shards.read_json(out / "manifest.json")["num_shards"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StageError(f"{out}/manifest.json: unreadable ({exc})") from None
    streams = []
    for i in range(num_shards):
        directory = regenerated.shard_dir(out, i, num_shards)
        if not (directory / "done.json").is_file():
            raise StageError(f"{directory}: not complete (no done.json); finish `eagle-pipe regenerate` for "
                             f"shard {i} of {num_shards} first")
        files = [directory / p["file"] for p in shards.read_json(directory / "done.json")["parts"]]
        streams.append(_part_lines(files))
    n = 0
    for _, where, record in heapq.merge(*streams, key=lambda item: item[0]):
        if select is None or select(start + n):
            yield start + n, where, record
        n += 1
    return n


def _part_lines(files: list[Path]):
    for path in files:
        with open(path, "rb") as f:
            for line_no, raw in enumerate(f, 1):
                record = parse_json_line(raw)
                try:
                    index = int(record["source"]["sample_index"])
                except (KeyError, TypeError, ValueError):
                    raise StageError(f"{path}:{line_no}: not a regenerated record (no source.sample_index)") \
                        from None
                yield index, f"{path}:{line_no}", record


def is_regenerated_dir(path: Path) -> bool:
    """The output of `eagle-pipe regenerate` (its manifest.json says so): read as its records, not as files."""
    return regenerated.is_regenerated_dir(path)


def is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any(
        (path / f).exists() for f in ("dataset_info.json", "state.json", "dataset_dict.json"))


def load_saved_dataset(path: Path):
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:
        raise StageError(f"{path}: cannot load the saved dataset: {exc}") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" in ds:
            return ds["train"], f"{path}/train"
        if len(ds) == 1:
            (split, only), = ds.items()
            return only, f"{path}/{split}"
        raise StageError(f"{path}: a DatasetDict with splits {sorted(ds)}; save the split you want")
    return ds, str(path)


def load_hub_dataset(spec: str):
    """`name` or `name:split` (default split "train") through `datasets.load_dataset`."""
    import datasets

    name, _, split = spec.partition(":")
    split = split or "train"
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as exc:
        raise StageError(f"data source {spec!r} is not a file and could not be loaded as a datasets "
                         f"dataset (split {split!r}): {type(exc).__name__}: {exc}") from None
    return ds, f"{name}:{split}"


def looks_like_path(source: str) -> bool:
    return source.startswith(("/", ".", "~")) or source.lower().endswith(DATA_SUFFIXES)


def expand_source(source: str) -> list[tuple[str, object]]:
    """A source as a list of (kind, target): files, a saved dataset dir, a dir of data files, or a hub name."""
    path = Path(os.path.expanduser(source))
    if path.is_dir():
        if is_saved_dataset(path):
            return [("saved", path)]
        if is_regenerated_dir(path):
            return [("regenerated", path)]
        files = sorted(p for p in path.iterdir() if p.is_file() and p.name.lower().endswith(DATA_SUFFIXES))
        if not files:
            raise StageError(f"{source}: a directory with no data files (.jsonl, .json, .parquet) "
                             "and not a dataset saved with save_to_disk")
        return [(file_kind(p), p) for p in files]
    if path.is_file():
        return [(file_kind(path), path)]
    if looks_like_path(source):
        raise StageError(f"data source not found: {source}")
    return [("hub", source)]


def file_kind(path: Path) -> str:
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz")):
        return "jsonl"
    if name.endswith((".json", ".json.gz")):
        return "json"
    if name.endswith(".parquet"):
        return "parquet"
    raise StageError(f"{path}: unknown data file type (expected .jsonl, .jsonl.gz, .json, .json.gz or .parquet)")


def iter_source(kind: str, target, start: int, select: Select) -> Iterator:
    """Dispatch to the reader for one expanded source; returns its record count."""
    if kind == "jsonl":
        return (yield from read_jsonl(target, start, select))
    if kind == "json":
        return (yield from read_json(target, start, select))
    if kind == "parquet":
        return (yield from read_parquet(target, start, select))
    if kind == "regenerated":
        return (yield from read_regenerated(target, start, select))
    ds, label = load_saved_dataset(target) if kind == "saved" else load_hub_dataset(target)
    return (yield from read_dataset(ds, label, start, select))
