"""Run by tests/test_dump_vllm.py in a subprocess (vLLM spawns workers: the main module must be guarded).

    python -m tests.vllm_dump_run ROOT FAMILY...

For each family: build a tiny target (tests/vllm_dump_helpers.py), dump the same chat records with --engine hf
and --engine vllm (fp32, top-k 8), compare them, then for the first family delete a part and rerun the vLLM
dump (resume: only that part is recomputed, to the same bytes). Writes ROOT/results.json after each step:
{family: {"compare": {...}, "hf": summary, "vllm": summary, "*_seconds", "*_verify"} or {"error": ...},
"resume": {...}}. One process, one engine start per vLLM dump.
"""
from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

DUMP_OPTIONS = dict(dtype="float32", aux_layers="1,3,4", teacher="topk", top_k=8, part_tokens=1500,
                    batch_tokens=3000, max_seq_len=512)


def dump(target: Path, data: Path, out: Path, engine: str) -> dict:
    from stages.dump.stage import dump_teacher

    return dump_teacher(target=str(target), data=[str(data)], out=str(out), engine=engine, **DUMP_OPTIONS)


def family_run(root: Path, family: str, data: Path) -> dict:
    from stages.shards.verify import verify_dump
    from tests.vllm_dump_helpers import build_family, compare_dumps

    target = build_family(family, root / family / "target")
    result = {}
    for engine in ("hf", "vllm"):
        start = time.perf_counter()
        result[engine] = dump(target, data, root / family / engine, engine)
        result[f"{engine}_seconds"] = time.perf_counter() - start
        result[f"{engine}_verify"] = verify_dump(root / family / engine)
    result["compare"] = compare_dumps(root / family / "hf", root / family / "vllm")
    return result


def resume_run(root: Path, family: str, data: Path) -> dict:
    """Delete the second part and done.json of the family's vLLM dump, rerun: one part computed, same bytes."""
    from stages import shards

    out = root / family / "vllm"
    directory = shards.shard_dir(out, 0, 1)
    before = {p.name: shards.sha256_file(p) for p in sorted(directory.glob("part-*.safetensors"))}
    victim = sorted(before)[1]
    (directory / victim).unlink()
    (directory / "done.json").unlink()
    summary = dump(root / family / "target", data, out, "vllm")
    after = {p.name: shards.sha256_file(p) for p in sorted(directory.glob("part-*.safetensors"))}
    return {"parts": len(before), "recomputed": victim, "tokens_computed": summary["tokens_computed"],
            "same_bytes": before == after}


def main(root: Path, families: list[str]) -> None:
    import torch

    from tests.dump_helpers import write_chat_data

    torch.set_num_threads(1)
    root.mkdir(parents=True, exist_ok=True)
    data = write_chat_data(root / "chat.jsonl", n=24)
    results: dict = {}

    def save():  # after each step: a crash later still leaves what was measured
        (root / "results.json").write_text(json.dumps(results, indent=1, default=str))

    for family in families:
        try:
            results[family] = family_run(root, family, data)
        except BaseException as exc:  # report it and go on: which families work is part of the answer
            results[family] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        save()
    first = next((f for f in families if "error" not in results[f]), None)
    if first is not None:
        results["resume"] = resume_run(root, first, data)
        save()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
