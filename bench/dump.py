"""Benchmark dump-teacher: its tokens/s against a bare target forward over the same batches, and its bytes/token
against the formula 3*H*dtype_bytes + k*(4+4) + small.

Builds a random Llama of the requested size in a temp dir (WordLevel tokenizer, pre-tokenized random records),
runs the real `dump_teacher` on it, then times `model(input_ids, attention_mask).logits` (what any consumer of the
target would run) on exactly the batches the dump planned. Prints one JSON object. Goal: overhead <= 1.15.

Both sides are timed warm: the dump's rate (its own timer: from the first batch to the last part on disk, so
including the writer's sha256/fsync, excluding model load, tokenization and the one-off self-check probe) is the
best of `--dump-runs` full dumps into fresh directories; the bare forward is the best of 2 passes after a
one-sequence warm-up.

    python bench/dump.py                       # CPU defaults, well under 2 minutes
    python bench/dump.py --device cuda --dtype bfloat16 --hidden 2048 --layers 16 --vocab 128256 \
        --records 512 --batch-tokens 16384
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build_target(directory: Path, a) -> None:
    import torch
    from tokenizers import Tokenizer, models
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(a.vocab)}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
                                  pad_token="t0", eos_token="t1", bos_token="t2")
    cfg = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, num_hidden_layers=a.layers,
                      num_attention_heads=a.heads, num_key_value_heads=a.kv_heads, intermediate_size=a.intermediate,
                      max_position_embeddings=max(2048, a.max_len), pad_token_id=0, eos_token_id=1, bos_token_id=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)


def write_records(path: Path, a) -> None:
    rng = random.Random(0)
    with path.open("w") as f:
        for _ in range(a.records):
            n = rng.randint(a.min_len, a.max_len)
            f.write(json.dumps({"input_ids": [rng.randrange(3, a.vocab) for _ in range(n)]}) + "\n")


def bare_forward_seconds(model_dir: Path, out: Path, a, dtype, device: str) -> tuple[float, float, int]:
    """Seconds for a plain forward over the dump's own batches, best of 2 passes each: (full CausalLM forward
    with logits at every position, decoder only without lm_head (a lower bound for any dump), tokens)."""
    import torch
    from transformers import AutoModelForCausalLM

    from stages import shards
    from stages.dump_plan import Sequence, pad_batch, plan_parts

    seqs = []
    for path in shards.iter_parts(out):
        t = shards.load_part(path, ["input_ids", "loss_mask", "cu_seqlens", "sample_index"])
        cu = t["cu_seqlens"].tolist()
        for s, idx in enumerate(t["sample_index"].tolist()):
            seqs.append(Sequence(idx, t["input_ids"][cu[s]:cu[s + 1]].numpy(), t["loss_mask"][cu[s]:cu[s + 1]].numpy()))
    parts = plan_parts(seqs, a.part_tokens, a.batch_tokens)
    batches = [pad_batch(p.sequences[lo:hi], 0) for p in parts for lo, hi in p.batches]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    times = {"full": [], "decoder": []}
    with torch.inference_mode():
        model(input_ids=batches[0][0][:1].to(device), attention_mask=batches[0][1][:1].to(device))  # warm-up
        for _ in range(2):
            for kind, fn in (("full", model), ("decoder", model.get_decoder())):
                sync()
                start = time.perf_counter()
                for ids, mask, _, _ in batches:
                    fn(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
                sync()
                times[kind].append(time.perf_counter() - start)
    return min(times["full"]), min(times["decoder"]), sum(len(s) for s in seqs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=688)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--records", type=int, default=32)
    p.add_argument("--min-len", type=int, default=64)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--batch-tokens", type=int, default=2048)
    p.add_argument("--part-tokens", type=int, default=8192)
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--teacher", default="topk", choices=["topk", "argmax", "softmax"])
    p.add_argument("--dtype", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--dump-runs", type=int, default=2,
                   help="Full dumps to run (fresh OUT each); the fastest is reported, as the bare forward's best "
                        "pass is (default 2: both sides get one warm-up-like first pass).")
    p.add_argument("--keep", help="Directory to build in and keep (default: a temp dir, removed).")
    a = p.parse_args()

    import torch

    from stages.dump_target import resolve_dtype
    from stages.dump_teacher import dump_teacher, resolve_device

    device = resolve_device(a.device)
    dtype = resolve_dtype(a.dtype, device)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(a.keep or tmp)
        root.mkdir(parents=True, exist_ok=True)
        model_dir, data = root / "target", root / "records.jsonl"
        build_target(model_dir, a)
        write_records(data, a)
        summaries = []
        for run in range(a.dump_runs):  # fresh OUT each time: every run computes every part
            summaries.append(dump_teacher(
                target=str(model_dir), data=[str(data)], out=str(root / f"dump{run}"), dtype=a.dtype,
                device=device, aux_layers=f"1,{a.layers // 2},{a.layers - 1}", teacher=a.teacher, top_k=a.top_k,
                batch_tokens=a.batch_tokens, part_tokens=a.part_tokens, max_seq_len=a.max_len, loss_on="all",
                overwrite=True))
        summary = max(summaries, key=lambda s: s["tokens_per_s"])
        out = root / f"dump{summaries.index(summary)}"
        bare_s, decoder_s, tokens = bare_forward_seconds(model_dir, out, a, dtype, device)
    assert tokens == summary["tokens"]
    dtype_bytes = torch.empty((), dtype=dtype).element_size()
    per_token = {"topk": a.top_k * (4 + 4), "argmax": 4, "softmax": a.vocab * dtype_bytes}[a.teacher]
    formula = 3 * a.hidden * dtype_bytes + per_token
    result = {
        "device": device, "dtype": str(dtype).removeprefix("torch."), "torch_threads": torch.get_num_threads(),
        "shape": {k: getattr(a, k) for k in ("layers", "hidden", "heads", "kv_heads", "intermediate", "vocab")},
        "teacher": a.teacher, "top_k": a.top_k, "records": a.records, "tokens": tokens,
        "padding_fraction": round(summary["padding_fraction"], 4),
        "dump_tokens_per_s": round(summary["tokens_per_s"], 1),
        "dump_tokens_per_s_runs": [round(s["tokens_per_s"], 1) for s in summaries],
        "bare_forward_tokens_per_s": round(tokens / bare_s, 1),
        "overhead_ratio": round(tokens / bare_s / summary["tokens_per_s"], 3),
        "overhead_goal": 1.15,
        "decoder_only_tokens_per_s": round(tokens / decoder_s, 1),
        "ratio_vs_decoder_only": round(tokens / decoder_s / summary["tokens_per_s"], 3),
        "bytes_per_token": round(summary["bytes_per_token"], 1),
        "formula_bytes_per_token": formula,
        "small_bytes_per_token": round(summary["bytes_per_token"] - formula, 1),
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
