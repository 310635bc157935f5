"""`eagle-pipe verify OUT`: is a teacher dump complete, intact and self-consistent?

Checks, each reported as one line naming the file: the manifest parses and has the known schema; OUT/target
holds config.json, tokenizer files and a weights.safetensors whose sha256 matches the manifest; every shard
directory exists with a done.json written under this manifest; every listed part exists with the recorded
size and sha256 (streamed), has the tensors and shapes the manifest promises (for FP8 aux states also
`aux_scales` float32 [N, 3]), and holds exactly the sample indices done.json says; no unlisted part files;
the shards agree on the number of input records and, together, account for every record exactly once
(written or skipped), each in the shard `index % num_shards` says.

`verify_dump(out) -> list[str]` returns the problems (empty = good); the train stage calls it before training.
"""
from __future__ import annotations

from pathlib import Path

import click

from stages import shards
from stages.dtypes import SAFETENSORS
from stages.errors import StageError
from stages.shards.tokenizer_files import load_kwargs_kept


def _check_target(out: Path, manifest: dict) -> list[str]:
    problems = []
    tdir = out / "target"
    for name in ("config.json", "weights.safetensors"):
        if not (tdir / name).is_file():
            problems.append(f"{tdir / name}: missing")
    if not any(p.name.startswith("tokenizer") for p in tdir.glob("*")):
        problems.append(f"{tdir}: no tokenizer files")
    weights = tdir / "weights.safetensors"
    if weights.is_file() and shards.sha256_file(weights) != manifest["target"].get("weights_sha256"):
        problems.append(f"{weights}: sha256 differs from manifest.json target.weights_sha256")
    kept = load_kwargs_kept(tdir)
    if kept:
        problems.append(f"{tdir / 'tokenizer_config.json'}: holds load-time keys ({', '.join(kept)}), written by a "
                        "dump-teacher before it dropped them, so its tokenizer hash differs from newer dumps of "
                        "the same tokenizer: re-run dump-teacher with this version (into a new --out)")
    return problems


def _expected_tensors(manifest: dict) -> dict[str, tuple[list, str]]:
    """name -> (shape with None for the token dimension N / sequences, safetensors dtype)."""
    target = manifest["target"]
    dtype = SAFETENSORS.get(target["dtype"], target["dtype"])
    teacher = manifest["teacher"]
    aux = manifest["aux_dtype"]
    out = {"input_ids": ([None], "I32"), "loss_mask": ([None], "U8"), "cu_seqlens": ([None], "I64"),
           "sample_index": ([None], "I64"),
           "aux_hidden_states": ([None, len(manifest["aux_layer_ids"]) * target["hidden_size"]],
                                 SAFETENSORS.get(aux, aux))}
    if aux == "float8_e4m3fn":
        out["aux_scales"] = ([None, len(manifest["aux_layer_ids"])], "F32")
    if teacher["kind"] == "topk":
        out["teacher_topk_ids"] = ([None, teacher["k"]], "I32")
        out["teacher_topk_logprobs"] = ([None, teacher["k"]], "F32")
    elif teacher["kind"] == "argmax":
        out["teacher_argmax"] = ([None], "I32")
    else:
        out["teacher_probs"] = ([None, target["vocab_size"]], dtype)
    return out


def _check_part(path: Path, entry: dict, expected: dict, manifest_hash: str) -> tuple[list[str], list[int]]:
    """Problems of one listed part and the sample indices it holds."""
    if not path.is_file():
        return [f"{path}: missing"], []
    size = path.stat().st_size
    if size != entry["bytes"]:
        return [f"{path}: {size} bytes, done.json says {entry['bytes']} (truncated or replaced)"], []
    if shards.sha256_file(path) != entry["sha256"]:
        return [f"{path}: sha256 mismatch (corrupt)"], []
    try:
        header = shards.part_header(path)
    except ValueError as exc:
        return [str(exc)], []
    problems = []
    if header["metadata"].get("manifest_sha256") != manifest_hash:
        problems.append(f"{path}: written under another manifest")
    tokens, sequences = entry["num_tokens"], entry["num_sequences"]
    for name, (shape, dtype) in expected.items():
        if name not in header["tensors"]:
            problems.append(f"{path}: tensor {name} missing")
            continue
        got_shape, got_dtype = header["tensors"][name]
        want = [{"cu_seqlens": sequences + 1, "sample_index": sequences}.get(name, tokens) if d is None else d
                for d in shape]
        if got_shape != want or got_dtype != dtype:
            problems.append(f"{path}: {name} is {got_dtype}{got_shape}, expected {dtype}{want}")
    if problems:
        return problems, []
    stored = shards.load_part(path, ["sample_index", "cu_seqlens"])
    if int(stored["cu_seqlens"][-1]) != tokens or int(stored["cu_seqlens"][0]) != 0:
        problems.append(f"{path}: cu_seqlens does not span the part's {tokens} tokens")
    return problems, stored["sample_index"].tolist()


def verify_dump(out, check_checksums: bool = True) -> list[str]:
    """Every problem with the dump in `out`, one line each; [] when it is complete and consistent."""
    out = Path(out)
    mpath = out / "manifest.json"
    if not mpath.is_file():
        return [f"{mpath}: missing (not a teacher dump, or dump-teacher never started)"]
    try:
        manifest = shards.read_json(mpath)
        problem = shards.schema_problem(manifest, mpath)
        if problem:
            return [problem]
        num_shards = int(manifest["num_shards"])
        expected = _expected_tensors(manifest)
    except (ValueError, KeyError, TypeError) as exc:
        return [f"{mpath}: unreadable or incomplete ({type(exc).__name__}: {exc})"]
    manifest_hash = shards.manifest_sha256(manifest)
    problems = _check_target(out, manifest)
    seen: dict[int, str] = {}       # sample index -> where it was accounted for
    num_records = set()
    present = {p.name for p in (out / "shards").glob("shard-*")} if (out / "shards").is_dir() else set()
    expected_dirs = {shards.shard_dir(out, i, num_shards).name for i in range(num_shards)}
    for name in sorted(present - expected_dirs):
        problems.append(f"{out / 'shards' / name}: not a shard of this {num_shards}-shard dump")

    def account(index: int, where: str, shard_index: int):
        if index in seen:
            problems.append(f"record {index}: accounted for twice ({seen[index]} and {where})")
        seen[index] = where
        if index % num_shards != shard_index:
            problems.append(f"record {index}: in shard {shard_index}, but {index} % {num_shards} != {shard_index}")

    for i in range(num_shards):
        sdir = shards.shard_dir(out, i, num_shards)
        if not sdir.is_dir():
            problems.append(f"{sdir}: shard missing")
            continue
        try:
            done = shards.read_done(out, i, num_shards)
        except ValueError:
            problems.append(f"{sdir / 'done.json'}: not valid JSON")
            continue
        if done is None:
            problems.append(f"{sdir}: shard not done (no done.json)")
            continue
        if done.get("manifest_sha256") != manifest_hash:
            problems.append(f"{sdir / 'done.json'}: written under another manifest.json")
            continue
        num_records.add(done["num_records"])
        listed = {p["file"] for p in done["parts"]}
        for stray in sorted(f.name for f in sdir.glob("part-*.safetensors") if f.name not in listed):
            problems.append(f"{sdir / stray}: part not listed in done.json")
        in_parts: list[int] = []
        for entry in done["parts"]:
            if check_checksums:
                part_problems, indices = _check_part(sdir / entry["file"], entry, expected, manifest_hash)
            else:
                part_problems, indices = ([] if (sdir / entry["file"]).is_file() else
                                          [f"{sdir / entry['file']}: missing"]), []
            problems.extend(part_problems)
            in_parts.extend(indices)
            for index in indices:
                account(index, f"{sdir.name}/{entry['file']}", i)
        written = done["written_sample_indices"]
        if check_checksums and sorted(in_parts) != written and not any(str(sdir) in p for p in problems):
            problems.append(f"{sdir / 'done.json'}: written_sample_indices differ from the parts' sample_index")
        if not check_checksums:
            for index in written:
                account(index, f"{sdir.name}", i)
        for reason, indices in done["skipped_sample_indices"].items():
            for index in indices:
                account(index, f"{sdir.name} (skipped: {reason})", i)
        if done["records"]["assigned"] != len(written) + sum(map(len, done["skipped_sample_indices"].values())):
            problems.append(f"{sdir / 'done.json'}: records.assigned does not equal written + skipped")
    if len(num_records) > 1:
        problems.append(f"shards disagree on the number of input records: {sorted(num_records)}")
    elif num_records and not problems:
        total = num_records.pop()
        missing = [i for i in range(total) if i not in seen]
        if missing:
            problems.append(f"{len(missing)} input record(s) neither written nor skipped, e.g. {missing[:5]}")
        extra = [i for i in seen if not 0 <= i < total]
        if extra:
            problems.append(f"records outside the input's 0..{total - 1}: {sorted(extra)[:5]}")
    return problems


def dump_summary(out: Path) -> dict:
    manifest = shards.read_json(out / "manifest.json")
    n = manifest["num_shards"]
    dones = [shards.read_done(out, i, n) for i in range(n)]
    skipped: dict[str, int] = {}
    for d in dones:
        for reason, count in d["records"]["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + count
    return {"out": str(out), "ok": True, "num_shards": n, "parts": sum(len(d["parts"]) for d in dones),
            "records": dones[0]["num_records"] if dones else 0,
            "written": sum(d["records"]["written"] for d in dones), "skipped": skipped,
            "tokens": sum(d["num_tokens"] for d in dones),
            "supervised_tokens": sum(d["num_supervised_tokens"] for d in dones),
            "bytes": sum(p["bytes"] for d in dones for p in d["parts"])}


@click.command("verify")
@click.argument("out", required=False, type=click.Path(file_okay=False))
def command(out):
    """Check the teacher dump in OUT: shards complete, checksums, every record accounted for."""
    if not out:
        raise StageError("verify: give the dump directory (eagle-pipe verify OUT)")
    out = Path(out)
    problems = verify_dump(out)
    if problems:
        for line in problems:
            click.echo(f"problem: {line}", err=True)
        raise StageError(f"{out}: {len(problems)} problem(s) in the teacher dump (listed above)")
    summary = dump_summary(out)
    click.echo(f"{out}: OK: {summary['num_shards']} shard(s), {summary['parts']} parts, "
               f"{summary['written']} of {summary['records']} records written "
               f"({sum(summary['skipped'].values())} skipped), {summary['tokens']} tokens, "
               f"{summary['bytes'] / 2**20:.1f} MiB")
    return summary
