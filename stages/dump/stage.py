"""Stage one, `eagle-pipe dump-teacher`: run the target once and write teacher shards (format: stages/shards).

One invocation dumps one shard (`--shard-index/--num-shards`, or SLURM array / torchrun variables), in named
steps that `dump_teacher` calls in order, each reading the frozen `DumpSettings`:

1. `plan_dump`: check and resolve the options (device, dtypes, shard) into `DumpSettings`;
2. `load_checked_target`: load the target (for `--engine vllm` only its embedding, norm and lm_head), resolve the
   aux layers;
3. `claim_dump`: stage OUT/target/ and claim OUT/manifest.json (refusing a dump made with another target,
   tokenizer or settings);
4. `plan_shard`: tokenize the shard's records (stages/data/records.py), plan parts and batches (stages/dump/plan.py);
5. `run_parts`: run the target batch by batch in its engine (stages/dump/engines.py: HF with hooks, or vLLM's
   offline LLM, started only when a part is missing), compute the chunked teacher (stages/dump/forward.py), encode
   the aux states on the device (stages/shards/aux.py), hand outputs to the background writer
   (stages/dump/writer.py);
6. `finish_shard`: write done.json last.

Parts already on disk are kept, so a rerun after a crash only computes what is missing and yields the same bytes.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import click
import numpy as np

from stages import sharded_job, shards
from stages.dtypes import AUX_DTYPE_CHOICES, dtype_name
from stages.dump.options import ENGINE_CHOICES, DumpOptions
from stages.dump.plan import Sequence, plan_parts, token_counts
from stages.errors import StageError
from stages.options import click_options, split_options
from stages.paths import data_fingerprint, ensure_writable, local_or_name
from stages.sharding import shard_from_env
from stages.vllm_runtime import VllmOptions, vllm_options

if TYPE_CHECKING:
    from collections.abc import Callable

    import torch

SOFTMAX_MAX_PART_BYTES = 8 << 30     # --teacher softmax: refuse parts above 8 GiB ...
SOFTMAX_MAX_TOTAL_BYTES = 1 << 40    # ... or a dump estimated above 1 TiB, unless --allow-large-softmax
DUMP_FORMAT = "eagle-pipe-teacher-dump"


class _LimitReached(Exception):
    pass


class _ShardSelector:
    """`select` for tokenize_records: picks this shard's records and counts the records in the input."""

    def __init__(self, shard_index: int, num_shards: int, limit: int | None):
        self.shard_index, self.num_shards, self.limit = shard_index, num_shards, limit
        self.num_records = 0

    def __call__(self, sample_index: int) -> bool:
        if self.limit is not None and sample_index >= self.limit:
            raise _LimitReached
        self.num_records = max(self.num_records, sample_index + 1)
        return sample_index % self.num_shards == self.shard_index


def collect_shard(data, tokenizer, selector: _ShardSelector, *, max_seq_len, loss_on, strict):
    """Tokenize this shard's records: (sequences, skipped, truncated count)."""
    import nvtx
    from tqdm import tqdm

    from stages.data.records import Example, tokenize_records

    sequences, skipped, truncated = [], [], 0
    items = tokenize_records(list(data), tokenizer, max_seq_len=max_seq_len, loss_on=loss_on, strict=strict,
                             select=selector)
    with nvtx.annotate("tokenize", color="blue"), tqdm(desc="tokenize", unit="rec", mininterval=1.0) as bar:
        try:
            for item in items:
                if isinstance(item, Example):
                    sequences.append(Sequence(item.sample_index, np.asarray(item.input_ids, dtype=np.int32),
                                              np.asarray(item.loss_mask, dtype=np.uint8)))
                    truncated += bool(item.truncated)
                else:
                    skipped.append(item)
                bar.update(1)
        except _LimitReached:
            pass
    return sequences, skipped, truncated


def planned_part(part, metadata: dict) -> Callable[[Path], dict | None]:
    """The dump's check of a part on disk (for sharded_job.reusable_part): written under this manifest and shard
    (its safetensors metadata) and holding exactly the planned records; returns its done.json entry."""
    import torch

    def holds_plan(path: Path) -> dict | None:
        found = shards.part_header(path)["metadata"]
        if any(found.get(key) != value for key, value in {**metadata, "part_index": str(part.index)}.items()):
            return None
        got = shards.load_part(path, ["sample_index"])["sample_index"]
        if not torch.equal(got, torch.tensor(part.sample_indices(), dtype=torch.int64)):
            return None
        return {"file": path.name, "sha256": shards.sha256_file(path), "bytes": path.stat().st_size,
                "num_tokens": part.num_tokens, "num_sequences": len(part.sequences)}
    return holds_plan


def run_parts(target, aux_ids, parts, directory: Path, *, teacher: str, k: int, metadata: dict, aux_dtype=None,
              engine=None):
    """Compute every part not already on disk; returns ({index: file entry}, tokens computed, seconds).
    `aux_dtype` is the stored aux dtype (default the target's); FP8 is quantized on the device. `engine`
    (stages/dump/engines.py) is called, only when a part is missing, for the engine that turns a batch's
    sequences into aux and final states (default: HFEngine); it is closed at the end."""
    import nvtx
    import torch
    from tqdm import tqdm

    from stages.shards.aux import aux_specs, encode_aux
    from stages.dump.engines import HFEngine
    from stages.dump.forward import teacher_outputs
    from stages.dump.writer import PartWriter

    H, V = target.hidden_size, target.vocab_size
    aux_dtype = aux_dtype or target.dtype
    specs = aux_specs(H, aux_dtype, len(aux_ids))
    specs.update({"topk": {"teacher_topk_ids": ((k,), torch.int32), "teacher_topk_logprobs": ((k,), torch.float32)},
                  "argmax": {"teacher_argmax": ((), torch.int32)},
                  "softmax": {"teacher_probs": ((V,), target.dtype)}}[teacher])
    entries, todo = {}, []
    for part in parts:
        entry = sharded_job.reusable_part(directory / shards.part_name(part.index), planned_part(part, metadata))
        if entry is not None:
            entries[part.index] = entry
        else:
            todo.append(part)
    if not todo:
        return entries, 0, 0.0
    max_rows = max(sum(len(s) for s in p.sequences[a:b]) for p in todo for a, b in p.batches)
    engine = engine() if engine is not None else HFEngine(target, aux_ids)
    total = sum(p.num_tokens for p in todo)
    start = time.perf_counter()
    writer = PartWriter(directory, specs, max_rows, torch.device(target.device), metadata)
    try:
        with tqdm(total=total, desc="dump", unit="tok", unit_scale=True, mininterval=1.0) as bar:
            for i, part in enumerate(todo):
                offset = 0
                batches = engine.part_batches(part, todo[i + 1] if i + 1 < len(todo) else None)
                for b in range(len(part.batches)):
                    with nvtx.annotate("forward", color="red"):
                        aux, final = next(batches)
                    with nvtx.annotate("teacher", color="yellow"):
                        outputs = teacher_outputs(target, final, teacher, k)
                    outputs.update(encode_aux(aux, aux_dtype, len(aux_ids)))
                    writer.submit(part, offset, outputs, last=b == len(part.batches) - 1)
                    offset += aux.shape[0]
                    bar.update(aux.shape[0])
            written = writer.close()
        seconds = time.perf_counter() - start   # not the engine's shutdown
    except BaseException:
        writer.abort()
        raise
    finally:
        engine.close()
    for w in written:
        entries[w.index] = {"file": w.file, "sha256": w.sha256, "bytes": w.bytes, "num_tokens": w.num_tokens,
                            "num_sequences": w.num_sequences}
    return entries, total, seconds


@dataclass(frozen=True)
class DumpSettings:
    """dump-teacher's options after `plan_dump` checked and resolved them: what every later step reads."""

    target: str                   # local directory or hub id, as given (messages name it so)
    data: tuple[str, ...]         # as given (record reports name them so)
    out: Path
    device: str                   # resolved: cuda:LOCAL_RANK, cpu, or as given
    dtype: torch.dtype            # the target's compute dtype
    aux_dtype: torch.dtype        # the stored aux dtype (--aux-dtype; `model` resolved to `dtype`)
    device_map: str | None
    trust_remote_code: bool
    aux_layers: str | None        # as given; the target's depth resolves the default
    teacher: str
    top_k: int
    batch_tokens: int
    max_seq_len: int
    loss_on: str
    shard_index: int
    num_shards: int
    part_tokens: int
    overwrite: bool
    strict: bool
    allow_large_softmax: bool
    limit: int | None
    engine: str = "hf"            # hf | vllm (stages/dump/engines.py)
    vllm: VllmOptions | None = None  # --engine vllm's engine options (stages/vllm_runtime.py)

    @property
    def k(self) -> int | None:
        return self.top_k if self.teacher == "topk" else None

    @property
    def sources(self) -> list[str]:
        """The data sources as the manifest records them: local ones absolute, so jobs started elsewhere agree."""
        return [local_or_name(x) for x in self.data]

    @property
    def target_source(self) -> str:
        return local_or_name(self.target)

    def record(self, aux_ids: list[int]) -> dict:
        """manifest.json `settings`: every option that changes the output (resumed jobs must agree on them)."""
        engine = {} if self.engine == "hf" else {"engine": self.engine}  # HF dumps keep their settings as before
        return {**engine, "target": self.target_source, "data": self.sources, "dtype": dtype_name(self.dtype),
                "aux_dtype": dtype_name(self.aux_dtype), "aux_layers": aux_ids, "teacher": self.teacher,
                "top_k": self.k, "max_seq_len": self.max_seq_len, "loss_on": self.loss_on,
                "num_shards": self.num_shards, "part_tokens": self.part_tokens, "batch_tokens": self.batch_tokens,
                "limit": self.limit}


@dataclass
class ShardWork:
    """This shard's tokenized records and the plan of its parts."""

    sequences: list
    skipped: list
    truncated: int
    num_records: int              # records in the whole input (all shards)
    parts: list


def plan_dump(**options) -> DumpSettings:
    """Step 1: check the options (one line per mistake) and resolve device, dtypes and shard, before the target
    is loaded or anything but a write probe touches --out. `options`: `DumpOptions` fields (the CLI's; defaults
    from there) plus the @vllm_options flags."""
    from stages.shards.aux import storage_dtype
    from stages.dump.forward import load_config
    from stages.target import resolve_device, resolve_dtype

    o, vllm_params = split_options(DumpOptions, options)
    if not o.target:
        raise StageError("--target is required (a model directory or hub id)")
    if not o.data:
        raise StageError("--data is required (one or more data files, dataset dirs or names)")
    if not o.out:
        raise StageError("--out is required")
    for name, value in (("--top-k", o.top_k), ("--batch-tokens", o.batch_tokens), ("--max-seq-len", o.max_seq_len),
                        ("--part-tokens", o.part_tokens)):
        if value < 1:
            raise StageError(f"{name} must be >= 1, got {value}")
    if o.limit is not None and o.limit < 0:
        raise StageError(f"--limit must be >= 0, got {o.limit}")
    if o.aux_dtype not in AUX_DTYPE_CHOICES:
        raise StageError(f"--aux-dtype {o.aux_dtype!r}: expected one of {', '.join(AUX_DTYPE_CHOICES)}")
    vllm = engine_options(o.engine, o.device_map, vllm_params, o.dtype)
    shard_index, num_shards = shard_from_env(o.shard_index, o.num_shards)
    out = Path(o.out)
    ensure_writable(out)
    device = resolve_device(o.device)
    torch_dtype = resolve_dtype(o.dtype, device)
    config = load_config(o.target, o.trust_remote_code)
    vocab = getattr(config.get_text_config(), "vocab_size", None) or 0
    bytes_per_prob = torch_dtype.itemsize
    part_bytes = o.part_tokens * vocab * bytes_per_prob
    if o.teacher == "softmax" and not o.allow_large_softmax and part_bytes > SOFTMAX_MAX_PART_BYTES:
        raise StageError(f"--teacher softmax: a part would hold {part_bytes / 2**30:.1f} GiB "
                         f"(vocab {vocab}); lower --part-tokens, use --teacher topk, or pass --allow-large-softmax")
    return DumpSettings(
        target=o.target, data=tuple(o.data), out=out, device=device,
        dtype=torch_dtype, aux_dtype=storage_dtype(o.aux_dtype, torch_dtype), device_map=o.device_map,
        trust_remote_code=o.trust_remote_code, aux_layers=o.aux_layers, teacher=o.teacher, top_k=o.top_k,
        batch_tokens=o.batch_tokens, max_seq_len=o.max_seq_len, loss_on=o.loss_on, shard_index=shard_index,
        num_shards=num_shards, part_tokens=o.part_tokens, overwrite=o.overwrite, strict=o.strict,
        allow_large_softmax=o.allow_large_softmax, limit=o.limit, engine=o.engine,
        vllm=None if vllm is None else replace(vllm, dtype=dtype_name(torch_dtype)))


def engine_options(engine: str, device_map, params: dict, dtype) -> VllmOptions | None:
    """--engine and the vLLM flags, checked; None for --engine hf (which ignores the vLLM flags)."""
    from stages.vllm_runtime import VLLM_PARAM_NAMES, VllmOptions, refuse_device_map, require_vllm

    unknown = sorted(set(params) - set(VLLM_PARAM_NAMES))
    if unknown:
        raise TypeError(f"plan_dump() got unexpected keyword arguments: {', '.join(unknown)}")
    if engine not in ENGINE_CHOICES:
        raise StageError(f"--engine {engine!r}: expected one of {', '.join(ENGINE_CHOICES)}")
    if engine == "hf":
        return None
    refuse_device_map(engine, device_map)
    options = VllmOptions.from_params(params)
    if options.data_parallel_size > 1:
        raise StageError("--data-parallel-size: dump-teacher's data parallelism is its shards; run one "
                         "dump-teacher per model replica with --num-shards N --shard-index i (or a SLURM array), "
                         "each on its own GPUs (CUDA_VISIBLE_DEVICES)")
    require_vllm()
    return options


def load_checked_target(settings: DumpSettings):
    """Step 2: the target and its aux layer ids, refusing a --top-k beyond its vocabulary."""
    from stages.dump.forward import load_target, load_target_head, parse_aux_layers

    target = None
    if settings.engine == "vllm":  # vLLM runs the decoder: only the embedding, norm and lm_head are needed here
        target = load_target_head(settings.target, settings.dtype, settings.device, settings.trust_remote_code)
    if target is None:
        target = load_target(settings.target, settings.dtype, settings.device, settings.device_map,
                             settings.trust_remote_code)
    aux_ids = parse_aux_layers(settings.aux_layers, target.num_layers)
    if settings.teacher == "topk" and settings.top_k > target.vocab_size:
        raise StageError(f"--top-k {settings.top_k} exceeds the target's vocabulary ({target.vocab_size})")
    return target, aux_ids


def claim_dump(settings: DumpSettings, target, aux_ids: list[int]) -> dict:
    """Step 3: stage OUT/target, claim OUT/manifest.json (stages/sharded_job.py: refusing another dump in OUT),
    install OUT/target; returns the manifest."""
    from eagle.config import drafters_served
    from stages.dump.forward import install_target_dir, write_target_dir

    recorded = settings.record(aux_ids)
    out = settings.out
    staged = out / f".target.tmp-{shards.temp_suffix()}"
    try:
        provenance = write_target_dir(target, staged)
        manifest = {
            "format": DUMP_FORMAT, "schema_version": shards.SCHEMA_VERSION,
            "target": {"source": settings.target_source, "architecture": type(target.model).__name__,
                       "model_type": target.config.model_type, **provenance, "num_layers": target.num_layers,
                       "hidden_size": target.hidden_size, "vocab_size": target.vocab_size,
                       "dtype": recorded["dtype"],
                       "tie_word_embeddings": bool(getattr(target.config, "tie_word_embeddings", False))},
            "aux_layer_ids": aux_ids, "drafters": drafters_served(len(aux_ids)),
            "aux_dtype": dtype_name(settings.aux_dtype),
            "teacher": {"kind": settings.teacher, "k": settings.k,
                        "logprob_dtype": "float32" if settings.teacher == "topk" else None,
                        "probs_dtype": recorded["dtype"] if settings.teacher == "softmax" else None},
            "max_seq_len": settings.max_seq_len, "loss_on": settings.loss_on,
            "data": {"sources": settings.sources, "fingerprint": data_fingerprint(settings.sources)},
            "num_shards": settings.num_shards, "part_tokens": settings.part_tokens, "settings": recorded,
        }
        if settings.engine == "vllm":  # HF dumps keep the manifest they always had (no `engine` means hf)
            from stages.dump.engines import vllm_engine_record
            manifest["engine"] = vllm_engine_record(aux_ids, target.num_layers, settings.vllm)
        sharded_job.claim_manifest(out, manifest, overwrite=settings.overwrite, kind="dump",
                                   outputs=[out / "shards", out / "target"])
        install_target_dir(staged, out / "target")
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return manifest


def plan_shard(settings: DumpSettings, target, aux_ids: list[int]) -> ShardWork:
    """Step 4: tokenize this shard's records, refuse an oversized softmax dump, plan parts and batches, and
    self-check the hooked forward on the first sequence."""
    selector = _ShardSelector(settings.shard_index, settings.num_shards, settings.limit)
    sequences, skipped, truncated = collect_shard(list(settings.data), target.tokenizer, selector,
                                                  max_seq_len=settings.max_seq_len, loss_on=settings.loss_on,
                                                  strict=settings.strict)
    shard_tokens = sum(len(seq) for seq in sequences)
    total_probs_bytes = shard_tokens * settings.num_shards * target.vocab_size * settings.dtype.itemsize
    if (settings.teacher == "softmax" and not settings.allow_large_softmax
            and total_probs_bytes > SOFTMAX_MAX_TOTAL_BYTES):
        raise StageError(f"--teacher softmax: the dump would hold about {total_probs_bytes / 2**40:.1f} TiB; "
                         "use --teacher topk or pass --allow-large-softmax")
    if skipped:
        from stages.data.records import format_skip_report
        click.echo(format_skip_report(skipped), err=True)
    parts = plan_parts(sequences, settings.part_tokens, settings.batch_tokens)
    if sequences and settings.engine == "hf":  # the vLLM engine is proven equal to HF's forward by tests instead
        import torch

        from stages.dump.forward import self_check
        self_check(target, aux_ids, torch.from_numpy(sequences[0].input_ids.astype(np.int64)))
    return ShardWork(sequences, skipped, truncated, selector.num_records, parts)


def finish_shard(settings: DumpSettings, directory: Path, manifest_sha256: str, work: ShardWork, entries: dict,
                 computed: int, seconds: float) -> dict:
    """Step 6: write done.json (last: it marks the shard complete), print and return the summary."""
    skipped: dict[str, list[int]] = {}
    for record in work.skipped:
        skipped.setdefault(record.reason, []).append(record.sample_index)
    shard_tokens = sum(len(seq) for seq in work.sequences)
    done = sharded_job.done_record(
        shard_index=settings.shard_index, num_shards=settings.num_shards, manifest_sha256=manifest_sha256,
        num_records=work.num_records, parts=[entries[p.index] for p in work.parts],
        assigned=len(work.sequences) + len(work.skipped), written=[seq.sample_index for seq in work.sequences],
        skipped=skipped, num_tokens=shard_tokens,
        num_supervised_tokens=int(sum(int(seq.loss_mask.sum()) for seq in work.sequences)),
        token_counts=token_counts(work.sequences))
    done["records"]["truncated"] = work.truncated
    sharded_job.write_done(directory, done)
    padded = sum(p.padded_tokens() for p in work.parts)
    summary = summary_from_done(settings.out, done, computed_tokens=computed, seconds=seconds,
                                padding=(1 - shard_tokens / padded) if padded else 0.0)
    print_summary(summary)
    return summary


def dump_teacher(**options) -> dict:
    """Dump one shard (options: those of `plan_dump`, i.e. the CLI's); returns the summary dict (also printed)."""
    settings = plan_dump(**options)
    target, aux_ids = load_checked_target(settings)
    manifest = claim_dump(settings, target, aux_ids)
    manifest_sha256 = shards.manifest_sha256(manifest)
    directory = shards.shard_dir(settings.out, settings.shard_index, settings.num_shards)
    done = sharded_job.open_shard(directory, manifest_sha256)
    if done is not None:
        return summary_from_done(settings.out, done, computed_tokens=0, seconds=0.0, padding=None)
    work = plan_shard(settings, target, aux_ids)
    metadata = {"shard_index": str(settings.shard_index), "num_shards": str(settings.num_shards),
                "teacher": settings.teacher, "manifest_sha256": manifest_sha256}
    entries, computed, seconds = run_parts(target, aux_ids, work.parts, directory, teacher=settings.teacher,
                                           k=settings.k or 0, metadata=metadata, aux_dtype=settings.aux_dtype,
                                           engine=engine_factory(settings, target, aux_ids))     # step 5
    return finish_shard(settings, directory, manifest_sha256, work, entries, computed, seconds)


def engine_factory(settings: DumpSettings, target, aux_ids: list[int]):
    """A callable giving the dump's engine (None: run_parts' default, HF); vLLM starts only when called."""
    if settings.engine == "hf":
        return None

    def start():
        from stages.dump.engines import VllmEngine

        return VllmEngine(target, aux_ids, settings.vllm, max_seq_len=settings.max_seq_len,
                          trust_remote_code=settings.trust_remote_code)
    return start


def summary_from_done(out: Path, done: dict, *, computed_tokens: int, seconds: float, padding) -> dict:
    """The dump's summary (stages/sharded_job.py's, with its tokens, padding and bytes); `padding` is None for a
    shard found complete (the plan is not made then)."""
    total_bytes = sum(p["bytes"] for p in done["parts"])
    tokens = done["num_tokens"]
    return sharded_job.summary_from_done(
        out, done, truncated=done["records"]["truncated"], sequences=done["records"]["written"], tokens=tokens,
        supervised_tokens=done["num_supervised_tokens"], padding_fraction=padding, parts=len(done["parts"]),
        bytes=total_bytes, bytes_per_token=total_bytes / tokens if tokens else 0.0,
        tokens_now_key="tokens_computed", tokens_now=computed_tokens, seconds=seconds)


def print_summary(summary: dict) -> None:
    padding = "n/a" if summary["padding_fraction"] is None else f"{summary['padding_fraction']:.1%}"
    sharded_job.print_summary(summary, [
        f"  sequences {summary['sequences']}, truncated {summary['truncated']}, tokens {summary['tokens']}, "
        f"supervised {summary['supervised_tokens']}, padding {padding}",
        f"  parts {summary['parts']}, {summary['bytes'] / 2**20:.1f} MiB, {summary['bytes_per_token']:.0f} "
        "bytes/token"], tokens_now_key="tokens_computed", verb="computed")


@click.command("dump-teacher")
@click_options(DumpOptions)
@vllm_options
def command(**options):
    """Run the target once over the data and write this shard's teacher parts.

    With --engine vllm, data parallelism is the shards: run one dump-teacher per model replica (--num-shards /
    --shard-index, a SLURM array or torchrun), each over --tensor-parallel-size GPUs; --data-parallel-size
    stays 1. docs/dump.md#engines-hf-and-vllm."""
    return dump_teacher(**options)
