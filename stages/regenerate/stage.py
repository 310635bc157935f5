"""`eagle-pipe regenerate`: on-policy training data, the target answering its own prompts.

A draft learns to predict the target, so it should train on the target's answers rather than on whatever model
wrote the dataset. This stage reads the same inputs as dump-teacher (stages/data/records.py: same `sample_index`,
skip reasons and `--strict`), keeps each conversation's system and user turns, and replaces every assistant
turn with the target's own answer to the conversation so far (earlier answers already regenerated), turn by
turn. The engine is the target in-process (`hf`: transformers; `vllm`: vLLM's offline engine) or an
OpenAI-compatible server (`openai`): stages/regenerate/engines.py.

The output layout (read as is by `dump-teacher --data OUT`, in sample_index order) is specified in
stages/data/regenerated.py.

Records go to shards by `sample_index % num_shards` (like the dump); a shard's records, in sample_index order,
are cut into parts of `--part-records`. Every file is written atomically. A rerun keeps the parts whose
bookkeeping matches the plan and computes only the rest; the batches of a part depend only on the part, so
with greedy decoding (and per-record seeds when sampling) the result equals an uninterrupted run. The claim of
OUT/manifest.json, the reuse of finished parts, done.json's accounting and the summary are the sharded job's
that dump-teacher shares (stages/sharded_job.py).
"""
from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from pathlib import Path

import click

from stages import sharded_job, shards
from stages.data.regenerated import (FORMAT, SCHEMA_VERSION, bookkeeping_name, compared_manifest,
                                     manifest_identity_sha256, part_name, shard_dir)
from stages.errors import StageError
from stages.options import click_options, split_options
from stages.paths import data_fingerprint, ensure_writable, local_or_name
from stages.regenerate.engines import Decoding, Request, make_engine, request_seed
from stages.regenerate.options import TURNS, RegenerateOptions
from stages.sharding import in_shard, shard_from_env
from stages.vllm_runtime import VLLM_PARAM_NAMES as VLLM_PARAMS, vllm_options



# ------------------------------------------------------------------------------------------------ records
def prompt_segments(messages: list[dict]) -> list[list[dict]]:
    """The system/user turns before each answer: the target answers at the end of every run of turns that
    holds a user turn. Assistant turns with no user turn before them (a greeting that opens the conversation,
    a second answer in a row) are dropped; a conversation ending with a user turn gets an answer too."""
    segments, pending = [], []
    for m in messages:
        if m["role"] != "assistant":
            pending.append(m)
        elif any(p["role"] == "user" for p in pending):
            segments.append(pending)
            pending = []
    if any(p["role"] == "user" for p in pending):
        segments.append(pending)
    return segments


class _Job:
    """One record being regenerated: its prompt segments and the answers so far."""

    def __init__(self, sample_index: int, where: str, segments: list[list[dict]]):
        self.sample_index, self.where, self.segments = sample_index, where, segments
        self.messages: list[dict] = []
        self.finish_reasons: list[str] = []
        self.num_tokens: list[int] = []
        self.failed: tuple[str, str] | None = None

    def next_request(self, seed: int) -> Request:
        turn = len(self.finish_reasons)
        return Request(self.messages + self.segments[turn], request_seed(seed, self.sample_index, turn))

    @property
    def pending(self) -> bool:
        return self.failed is None and len(self.finish_reasons) < len(self.segments)

    def record(self) -> dict:
        return {"messages": self.messages, "source": {"sample_index": self.sample_index, "location": self.where},
                "generation": {"finish_reasons": self.finish_reasons, "num_tokens": self.num_tokens}}


def collect_jobs(data, *, shard_index: int, num_shards: int, turns: str, strict: bool, limit: int | None):
    """This shard's records as jobs, in sample_index order: (jobs, skips [(index, reason, where, message)],
    records in the input)."""
    from stages.data.records import BadRecord, RecordError, parse_record, read_records

    seen = [0]

    def select(i: int) -> bool:
        if limit is not None and i >= limit:
            return False
        seen[0] = i + 1
        return in_shard(i, shard_index, num_shards)

    jobs, skips = [], []
    for index, where, record in read_records(list(data), select=select):
        try:
            kind, payload = parse_record(record)
        except RecordError as exc:
            if strict:
                raise BadRecord(f"{where}: {exc.reason}: {exc.message} (without --strict it would be skipped)") \
                    from None
            skips.append((index, exc.reason, where, exc.message))
            continue
        segments = prompt_segments(payload) if kind == "chat" else []
        if not segments:
            skips.append((index, "no_user_turn", where, f"a {kind} record has no user turn to answer"))
            continue
        jobs.append(_Job(index, where, segments[:1] if turns == "first" else segments))
    return jobs, skips, seen[0]


# ------------------------------------------------------------------------------------------------ generation
def generate_part(engine, jobs: list[_Job], *, seed: int, drop_truncated: bool, strict: bool, progress) -> None:
    """Answer every job turn by turn: round r asks the engine for the r-th answer of every job still going."""
    while True:
        active = [j for j in jobs if j.pending]
        if not active:
            return
        requests = [j.next_request(seed) for j in active]
        for i, resp in engine.generate(requests):
            job = active[i]
            if resp.error:
                if strict and resp.error == "template_error":
                    raise StageError(f"{job.where}: template_error: {resp.message} "
                                     "(without --strict it would be skipped)")
                job.failed = (resp.error, resp.message)
            elif not resp.text.strip():
                job.failed = ("empty_response", f"turn {len(job.finish_reasons)}: the target answered nothing")
            elif resp.finish_reason == "length" and drop_truncated:
                job.failed = ("truncated", f"turn {len(job.finish_reasons)} hit --max-new-tokens")
            else:
                job.messages += job.segments[len(job.finish_reasons)] + [{"role": "assistant", "content": resp.text}]
                job.finish_reasons.append(resp.finish_reason)
                job.num_tokens.append(resp.num_tokens)
            progress(resp.num_tokens, finished=not job.pending)


def part_bookkeeping(index: int, jobs: list[_Job], sha256: str, size: int) -> dict:
    written = [j for j in jobs if j.failed is None]
    skipped: dict[str, list[int]] = {}
    for j in jobs:
        if j.failed is not None:
            skipped.setdefault(j.failed[0], []).append(j.sample_index)
    return {"part_index": index, "sample_indices": [j.sample_index for j in jobs],
            "file": part_name(index), "sha256": sha256, "bytes": size,
            "written_sample_indices": [j.sample_index for j in written],
            "skipped_sample_indices": dict(sorted(skipped.items())),
            "skips": [[j.sample_index, j.failed[0], j.where, j.failed[1]] for j in jobs if j.failed is not None],
            "turns": sum(len(j.finish_reasons) for j in written),
            "generated_tokens": sum(sum(j.num_tokens) for j in written),
            "finish_reasons": dict(sorted(Counter(r for j in written for r in j.finish_reasons).items()))}


def finished_part(directory: Path, index: int, planned: list[int]) -> dict | None:
    """The bookkeeping of a finished part (stages/sharded_job.py reusable_part) whose records are the planned
    ones and whose JSONL has the recorded size and sha256; None for one to compute."""
    def holds_plan(path: Path) -> dict | None:
        book = shards.read_json(directory / bookkeeping_name(index))
        if (book["sample_indices"] == planned and book["bytes"] == path.stat().st_size
                and book["sha256"] == shards.sha256_file(path)):
            return book
        return None
    return sharded_job.reusable_part(directory / part_name(index), holds_plan,
                                     marker=directory / bookkeeping_name(index))


def write_part(directory: Path, index: int, jobs: list[_Job]) -> dict:
    """The part's JSONL, then its bookkeeping (whose presence marks the part finished); both atomic."""
    import os

    blob = "".join(json.dumps(j.record(), ensure_ascii=False) + "\n" for j in jobs if j.failed is None).encode()
    path = directory / part_name(index)
    pause = float(os.environ.get("EAGLE_PIPE_TEST_PART_PAUSE", 0) or 0)  # widens the kill window in the crash test

    def write(tmp):
        tmp.write_bytes(blob)
        if pause:
            time.sleep(pause)

    shards.write_file_atomic(path, write)
    book = part_bookkeeping(index, jobs, hashlib.sha256(blob).hexdigest(), len(blob))  # the bytes written
    shards.atomic_write_json(directory / bookkeeping_name(index), book)
    return book


# ------------------------------------------------------------------------------------------------ manifest
def build_manifest(*, target, data, engine_info: dict, endpoint, decoding: Decoding, turns, seed,
                   drop_truncated, num_shards, part_records, limit) -> dict:
    sources = [local_or_name(source) for source in data]
    settings = {"target": local_or_name(target), "data": sources, "turns": turns, "engine": engine_info["kind"],
                "max_new_tokens": decoding.max_new_tokens, "temperature": decoding.temperature,
                "top_p": decoding.top_p, "seed": seed, "chat_template_kwargs": decoding.chat_template_kwargs,
                "drop_truncated": drop_truncated, "num_shards": num_shards, "part_records": part_records,
                "limit": limit}
    return {"format": FORMAT, "schema_version": SCHEMA_VERSION, "target": settings["target"],
            "engine": engine_info, "endpoint": endpoint, "settings": settings,
            "data": {"sources": sources, "fingerprint": data_fingerprint(sources)}, "num_shards": num_shards}


# ------------------------------------------------------------------------------------------------ the stage
def parse_template_kwargs(text) -> dict:
    if text in (None, ""):
        return {}
    if isinstance(text, dict):
        return text
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise StageError(f"--chat-template-kwargs: not JSON ({exc})") from None
    if not isinstance(value, dict):
        raise StageError("--chat-template-kwargs: expected a JSON object, e.g. '{\"enable_thinking\": false}'")
    return value


def vllm_engine_options(engine: str, device_map, params: dict):
    """The VllmOptions of --engine vllm (None for the other engines, which ignore the vLLM flags)."""
    from stages.vllm_runtime import VLLM_PARAM_NAMES, VllmOptions, refuse_device_map

    unknown = sorted(set(params) - set(VLLM_PARAM_NAMES))
    if unknown:
        raise TypeError(f"regenerate() got unexpected keyword arguments: {', '.join(unknown)}")
    if engine != "vllm":
        return None
    refuse_device_map(engine, device_map)
    options = VllmOptions.from_params(params)
    if options.data_parallel_size > 1:
        raise StageError("--data-parallel-size: regenerate's data parallelism is its shards; run one regenerate "
                         "per model replica with --num-shards N --shard-index i (or a SLURM array)")
    return options


def regenerate(*, retry_backoff: float = 1.0, **options) -> dict:
    """Regenerate one shard; returns the summary dict (also printed). `options`: `RegenerateOptions` fields (the
    CLI's; defaults from there) plus the @vllm_options flags (stages/vllm_runtime.py), read with --engine vllm;
    `retry_backoff` (seconds, doubled per retry) is for tests."""
    from tqdm import tqdm

    o, vllm_params = split_options(RegenerateOptions, options)
    if not o.target:
        raise StageError("--target is required (the model whose answers to train on)")
    if not o.data:
        raise StageError("--data is required (one or more data files, dataset dirs or names)")
    if not o.out:
        raise StageError("--out is required")
    for name, value in (("--max-new-tokens", o.max_new_tokens), ("--batch-size", o.batch_size),
                        ("--batch-tokens", o.batch_tokens), ("--part-records", o.part_records),
                        ("--concurrency", o.concurrency)):
        if value < 1:
            raise StageError(f"{name} must be >= 1, got {value}")
    if o.temperature < 0 or not 0 < o.top_p <= 1:
        raise StageError(f"--temperature must be >= 0 and --top-p in (0, 1], got {o.temperature} and {o.top_p}")
    if o.limit is not None and o.limit < 0:
        raise StageError(f"--limit must be >= 0, got {o.limit}")
    if o.turns not in TURNS:
        raise StageError(f"--turns must be one of {TURNS}, got {o.turns!r}")
    decoding = Decoding(o.max_new_tokens, float(o.temperature), float(o.top_p),
                        parse_template_kwargs(o.chat_template_kwargs))
    shard_index, num_shards = shard_from_env(o.shard_index, o.num_shards)
    out = Path(o.out)
    ensure_writable(out)
    jobs, read_skips, num_records = collect_jobs(o.data, shard_index=shard_index, num_shards=num_shards,
                                                 turns=o.turns, strict=o.strict, limit=o.limit)
    vllm = vllm_engine_options(o.engine, o.device_map, vllm_params)
    engine = make_engine(o.engine, o.target, decoding, dtype=o.dtype, device=o.device, device_map=o.device_map,
                         vllm=vllm, trust_remote_code=o.trust_remote_code, compile=o.compile,
                         batch_size=o.batch_size, batch_tokens=o.batch_tokens, base_url=o.base_url,
                         served_model=o.served_model, api_key_env=o.api_key_env, concurrency=o.concurrency,
                         request_timeout=o.request_timeout, max_retries=o.max_retries, retry_backoff=retry_backoff)
    manifest = build_manifest(target=o.target, data=o.data, engine_info=engine.describe(), endpoint=o.base_url,
                              decoding=decoding, turns=o.turns, seed=o.seed, drop_truncated=o.drop_truncated,
                              num_shards=num_shards, part_records=o.part_records, limit=o.limit)
    sharded_job.claim_manifest(out, manifest, overwrite=o.overwrite, kind="regenerated output",
                               outputs=sorted(out.glob("shard-*-of-*")), compared=compared_manifest)
    manifest_sha256 = manifest_identity_sha256(manifest)
    directory = shard_dir(out, shard_index, num_shards)
    done = sharded_job.open_shard(directory, manifest_sha256)
    if done is not None:
        return summary_from_done(out, done, tokens_now=0, seconds=0.0)

    parts = [jobs[lo:lo + o.part_records] for lo in range(0, len(jobs), o.part_records)]
    books, tokens_now, started = {}, [0], time.perf_counter()
    with tqdm(total=len(jobs), desc="regenerate", unit="rec", mininterval=1.0) as bar:
        def progress(tokens: int, finished: bool) -> None:
            tokens_now[0] += tokens
            bar.update(int(finished))
            bar.set_postfix_str(f"{tokens_now[0] / max(time.perf_counter() - started, 1e-9):,.0f} tok/s",
                                refresh=False)

        for index, part in enumerate(parts):
            book = finished_part(directory, index, [j.sample_index for j in part])
            if book is None:
                generate_part(engine, part, seed=o.seed, drop_truncated=o.drop_truncated, strict=o.strict,
                              progress=progress)
                book = write_part(directory, index, part)
            else:
                bar.update(len(part))
            books[index] = book
    seconds = time.perf_counter() - started

    done = done_record(shard_index, num_shards, manifest_sha256, num_records, [books[i] for i in range(len(parts))],
                       read_skips, assigned=len(jobs) + len(read_skips))
    sharded_job.write_done(directory, done)
    summary = summary_from_done(out, done, tokens_now=tokens_now[0], seconds=seconds)
    print_summary(summary, done)
    return summary


def done_record(shard_index: int, num_shards: int, manifest_sha256: str, num_records: int, books: list[dict],
                read_skips: list, *, assigned: int) -> dict:
    """done.json from the parts' bookkeeping (in part order) and the records skipped while reading: the sharded
    job's accounting, up to three examples per skip reason, turns, tokens and finish reasons."""
    skipped: dict[str, list[int]] = {}
    skips = [tuple(skip) for skip in read_skips] + [tuple(skip) for book in books for skip in book["skips"]]
    for index, reason, _, _ in skips:
        skipped.setdefault(reason, []).append(index)
    examples: dict[str, list] = {}
    for index, reason, where, message in sorted(skips):
        if len(examples.setdefault(reason, [])) < 3:
            examples[reason].append({"sample_index": index, "where": where, "message": message})
    return sharded_job.done_record(
        shard_index=shard_index, num_shards=num_shards, manifest_sha256=manifest_sha256, num_records=num_records,
        parts=[{"file": b["file"], "sha256": b["sha256"], "bytes": b["bytes"],
                "num_records": len(b["written_sample_indices"])} for b in books],
        assigned=assigned, written=[i for b in books for i in b["written_sample_indices"]], skipped=skipped,
        skipped_examples=examples, turns=sum(b["turns"] for b in books),
        generated_tokens=sum(b["generated_tokens"] for b in books),
        finish_reasons=dict(sorted(sum((Counter(b["finish_reasons"]) for b in books), Counter()).items())))


def summary_from_done(out: Path, done: dict, *, tokens_now: int, seconds: float) -> dict:
    """regenerate's summary: stages/sharded_job.py's, with the records written, turns, tokens and finish reasons."""
    return sharded_job.summary_from_done(
        out, done, records_written=done["records"]["written"], turns=done["turns"],
        generated_tokens=done["generated_tokens"], finish_reasons=done["finish_reasons"],
        tokens_now_key="tokens_generated_now", tokens_now=tokens_now, seconds=seconds)


def print_summary(summary: dict, done: dict) -> None:
    details = [f"  written {summary['records_written']}, turns {summary['turns']}, generated tokens "
               f"{summary['generated_tokens']}, finish reasons {sharded_job.counts(summary['finish_reasons'])}"]
    for reason, examples in done["skipped_examples"].items():
        details += [f"  {reason}: {e['where']}: {e['message']}" for e in examples]
    sharded_job.print_summary(summary, details, tokens_now_key="tokens_generated_now", verb="generated")


def is_complete(options: dict) -> tuple[bool, str]:
    """(every shard of OUT is done under a manifest made with these options, why not), without loading the
    target: what `eagle-pipe run` checks before skipping the stage."""
    from stages.target import dtype_name, resolve_dtype

    out = Path(options.get("out") or "")
    path = out / "manifest.json"
    if not options.get("out") or not path.is_file():
        return False, f"{path} does not exist"
    try:
        existing = shards.read_json(path)
        _, num_shards = shard_from_env(options.get("shard_index"), options.get("num_shards"))
        engine = options.get("engine", "hf")
        if engine == "hf":
            import torch

            device = options.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
            info = {"kind": "hf", "dtype": dtype_name(resolve_dtype(options.get("dtype"), device)),
                    "batch_size": options["batch_size"], "batch_tokens": options["batch_tokens"]}
        elif engine == "vllm":
            from stages.target import resolve_device
            from stages.vllm_runtime import vllm_version

            vllm = vllm_engine_options(engine, options.get("device_map"),
                                       {k: v for k, v in options.items() if k in VLLM_PARAMS})
            info = {"kind": "vllm", "dtype": dtype_name(resolve_dtype(options.get("dtype"),
                                                                      resolve_device(options.get("device")))),
                    "vllm_version": vllm_version(), **vllm.record()}
        else:
            info = existing["engine"]   # the served model is only known by asking the server
        decoding = Decoding(options["max_new_tokens"], float(options["temperature"]), float(options["top_p"]),
                            parse_template_kwargs(options.get("chat_template_kwargs")))
        expected = build_manifest(target=options["target"], data=options["data"], engine_info=info,
                                  endpoint=options.get("base_url"), decoding=decoding, turns=options["turns"],
                                  seed=options["seed"], drop_truncated=options["drop_truncated"],
                                  num_shards=num_shards, part_records=options["part_records"],
                                  limit=options["limit"])
        diff = shards.manifest_difference(compared_manifest(existing), compared_manifest(expected))
    except (ValueError, KeyError, TypeError, StageError) as exc:
        return False, f"{path}: cannot compare settings ({exc})"
    if diff is not None:
        return False, f"settings changed ({diff})"
    manifest_sha256 = manifest_identity_sha256(expected)
    for i in range(num_shards):
        done = shard_dir(out, i, num_shards) / sharded_job.DONE
        if not done.is_file() or shards.read_json(done).get("manifest_sha256") != manifest_sha256:
            return False, f"{done} is missing"
    return True, "complete"


@click.command("regenerate")
@click_options(RegenerateOptions)
@vllm_options
def command(**options):
    """Replace the data's assistant turns with the target's own answers (on-policy training data)."""
    return regenerate(**options)
