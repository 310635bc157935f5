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
with greedy decoding (and per-record seeds when sampling) the result equals an uninterrupted run.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections import Counter
from pathlib import Path

import click

from stages import shards
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
            progress(resp.num_tokens, done=not job.pending)


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


def reusable_part(directory: Path, index: int, planned: list[int]) -> dict | None:
    """The bookkeeping of a finished part that holds exactly the planned records (and whose file is intact)."""
    book_path, path = directory / bookkeeping_name(index), directory / part_name(index)
    if not (book_path.is_file() and path.is_file()):
        return None
    try:
        book = shards.read_json(book_path)
        if book["sample_indices"] == planned and book["sha256"] == shards.sha256_file(path):
            return book
    except (ValueError, KeyError, TypeError):
        pass
    click.echo(f"{path}: does not match the plan; recomputing it", err=True)
    return None


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
    sources = [local_or_name(s) for s in data]
    settings = {"target": local_or_name(target), "data": sources, "turns": turns, "engine": engine_info["kind"],
                "max_new_tokens": decoding.max_new_tokens, "temperature": decoding.temperature,
                "top_p": decoding.top_p, "seed": seed, "chat_template_kwargs": decoding.chat_template_kwargs,
                "drop_truncated": drop_truncated, "num_shards": num_shards, "part_records": part_records,
                "limit": limit}
    return {"format": FORMAT, "schema_version": SCHEMA_VERSION, "target": settings["target"],
            "engine": engine_info, "endpoint": endpoint, "settings": settings,
            "data": {"sources": sources, "fingerprint": data_fingerprint(sources)}, "num_shards": num_shards}

def claim_manifest(out: Path, manifest: dict, overwrite: bool) -> None:
    """Write OUT/manifest.json or accept one made with the same target, engine and settings; another is
    refused unless --overwrite, which removes its shards."""
    path = out / "manifest.json"
    old_shards = sorted(out.glob("shard-*-of-*"))
    if path.is_file() or old_shards:
        try:
            diff = shards.manifest_difference(compared_manifest(shards.read_json(path)), compared_manifest(manifest))
        except (OSError, ValueError):
            diff = "manifest.json is missing or not valid JSON"
        if diff is None:
            shards.atomic_write_json(path, manifest)
            return
        if not overwrite:
            raise StageError(f"{out} holds other regenerated data ({diff}); pass --overwrite to replace it, "
                             "or another --out")
        click.echo(f"--overwrite: removing the previous output in {out} ({diff})", err=True)
        for d in old_shards:
            shutil.rmtree(d, ignore_errors=True)
    shards.atomic_write_json(path, manifest)


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
    eng = make_engine(o.engine, o.target, decoding, dtype=o.dtype, device=o.device, device_map=o.device_map,
                      vllm=vllm, trust_remote_code=o.trust_remote_code, compile=o.compile,
                      batch_size=o.batch_size, batch_tokens=o.batch_tokens, base_url=o.base_url,
                      served_model=o.served_model, api_key_env=o.api_key_env, concurrency=o.concurrency,
                      request_timeout=o.request_timeout, max_retries=o.max_retries, retry_backoff=retry_backoff)
    manifest = build_manifest(target=o.target, data=o.data, engine_info=eng.describe(), endpoint=o.base_url,
                              decoding=decoding, turns=o.turns, seed=o.seed, drop_truncated=o.drop_truncated,
                              num_shards=num_shards, part_records=o.part_records, limit=o.limit)
    claim_manifest(out, manifest, o.overwrite)
    msha = manifest_identity_sha256(manifest)
    directory = shard_dir(out, shard_index, num_shards)
    directory.mkdir(parents=True, exist_ok=True)
    shards.remove_stale_temporaries(directory)
    done_path = directory / "done.json"
    if done_path.is_file() and shards.read_json(done_path).get("manifest_sha256") == msha:
        click.echo(f"shard {shard_index}/{num_shards} is already complete in {directory}", err=True)
        return summary_from_done(out, shards.read_json(done_path), tokens_now=0, seconds=0.0)
    done_path.unlink(missing_ok=True)

    parts = [jobs[lo:lo + o.part_records] for lo in range(0, len(jobs), o.part_records)]
    books, tokens_now, started = {}, [0], time.perf_counter()
    with tqdm(total=len(jobs), desc="regenerate", unit="rec", mininterval=1.0) as bar:
        def progress(tokens: int, done: bool) -> None:
            tokens_now[0] += tokens
            bar.update(int(done))
            bar.set_postfix_str(f"{tokens_now[0] / max(time.perf_counter() - started, 1e-9):,.0f} tok/s",
                                refresh=False)

        for index, part in enumerate(parts):
            book = reusable_part(directory, index, [j.sample_index for j in part])
            if book is None:
                generate_part(eng, part, seed=o.seed, drop_truncated=o.drop_truncated, strict=o.strict,
                              progress=progress)
                book = write_part(directory, index, part)
            else:
                bar.update(len(part))
            books[index] = book
    seconds = time.perf_counter() - started

    skipped: dict[str, list[int]] = {}
    skips = [tuple(s) for s in read_skips] + [tuple(s) for b in books.values() for s in b["skips"]]
    for index, reason, _, _ in skips:
        skipped.setdefault(reason, []).append(index)
    examples: dict[str, list] = {}
    for index, reason, where, message in sorted(skips):
        if len(examples.setdefault(reason, [])) < 3:
            examples[reason].append({"sample_index": index, "where": where, "message": message})
    ordered = [books[i] for i in range(len(parts))]
    done = {
        "shard_index": shard_index, "num_shards": num_shards, "manifest_sha256": msha, "num_records": num_records,
        "parts": [{"file": b["file"], "sha256": b["sha256"], "bytes": b["bytes"],
                   "num_records": len(b["written_sample_indices"])} for b in ordered],
        "records": {"assigned": len(jobs) + len(read_skips),
                    "written": sum(len(b["written_sample_indices"]) for b in ordered),
                    "skipped": {r: len(v) for r, v in sorted(skipped.items())}},
        "written_sample_indices": sorted(i for b in ordered for i in b["written_sample_indices"]),
        "skipped_sample_indices": {r: sorted(v) for r, v in sorted(skipped.items())},
        "skipped_examples": examples,
        "turns": sum(b["turns"] for b in ordered),
        "generated_tokens": sum(b["generated_tokens"] for b in ordered),
        "finish_reasons": dict(sorted(sum((Counter(b["finish_reasons"]) for b in ordered), Counter()).items())),
    }
    shards.atomic_write_json(done_path, done)
    summary = summary_from_done(out, done, tokens_now=tokens_now[0], seconds=seconds)
    print_summary(summary, done)
    return summary


def summary_from_done(out: Path, done: dict, *, tokens_now: int, seconds: float) -> dict:
    return {"out": str(out), "shard_index": done["shard_index"], "num_shards": done["num_shards"],
            "records_in_input": done["num_records"], "records_read": done["records"]["assigned"],
            "records_written": done["records"]["written"], "skipped": done["records"]["skipped"],
            "turns": done["turns"], "generated_tokens": done["generated_tokens"],
            "finish_reasons": done["finish_reasons"], "tokens_generated_now": tokens_now, "seconds": seconds,
            "tokens_per_s": tokens_now / seconds if seconds and tokens_now else None}


def print_summary(s: dict, done: dict) -> None:
    lines = [f"shard {s['shard_index']}/{s['num_shards']}: records read {s['records_read']} (of "
             f"{s['records_in_input']} in the input), written {s['records_written']}, skipped "
             + (", ".join(f"{r} {n}" for r, n in s["skipped"].items()) or "none"),
             f"  turns {s['turns']}, generated tokens {s['generated_tokens']}, finish reasons "
             + (", ".join(f"{r} {n}" for r, n in s["finish_reasons"].items()) or "none"),
             f"  generated {s['tokens_generated_now']} tokens in {s['seconds']:.1f} s"
             + (f" ({s['tokens_per_s']:,.1f} tokens/s)" if s["tokens_per_s"] else "")]
    for reason, examples in done["skipped_examples"].items():
        lines += [f"  {reason}: {e['where']}: {e['message']}" for e in examples]
    click.echo("\n".join(lines), err=True)


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
    msha = manifest_identity_sha256(expected)
    for i in range(num_shards):
        done = shard_dir(out, i, num_shards) / "done.json"
        if not done.is_file() or shards.read_json(done).get("manifest_sha256") != msha:
            return False, f"{done} is missing"
    return True, "complete"


@click.command("regenerate")
@click_options(RegenerateOptions)
@vllm_options
def command(**options):
    """Replace the data's assistant turns with the target's own answers (on-policy training data)."""
    return regenerate(**options)
