"""Time NVIDIA Model-Optimizer 0.47's EAGLE-3 *offline* training step: the baseline eagle-pipe must beat.

Run it with the interpreter of the separate venv made by ``bench/peers/modelopt/venv.sh`` (Model-Optimizer 0.47 pins
transformers 5.14.x, which the project's own environment does not use)::

    bash bench/peers/modelopt/venv.sh                      # once: creates .venv-modelopt
    .venv-modelopt/bin/python -m bench.peers.modelopt.step --hidden 256 --heads 8 --kv-heads 4 --intermediate 688 \\
        --vocab 8192 --draft-vocab 4096 --seq-len 512 --batch 4 --ttt-steps 3 --steps 10 --json [--no-compile]

With ``--json`` stdout holds exactly one JSON object (everything Model-Optimizer prints goes to stderr), so
``bench/perf/train_step.py`` can run this script as a subprocess and print the ratio.

Code path exercised (the same one ``examples/speculative_decoding/main.py`` of Model-Optimizer takes for
``data.offline_data_path`` recipes with the default ``general/speculative_decoding/eagle3.yaml`` settings):

1. Target: ``transformers.LlamaForCausalLM`` built from a ``LlamaConfig`` of the given shapes with
   ``num_hidden_layers=0`` and ``config.num_orig_hidden_layers = --target-layers``, exactly what
   ``modelopt.torch.speculative.utils.load_vlm_or_llm(use_offline_training=True)`` produces (only the embedding,
   final norm and lm_head exist; weights are random instead of loaded).
2. ``mtsp.convert(model, [("eagle", EagleConfig(...).model_dump())])`` with ``eagle_offline=True`` (what
   ``ModelOptEagleRecipe`` derives for offline data), ``eagle_ttt_steps=--ttt-steps``,
   ``eagle_use_torch_compile`` = not ``--no-compile`` (the recipe default is True), every other EagleConfig field
   at its default (logit self-distillation, frozen base, loss decay 0.9, no mixed hidden states, llama decoder).
   ``eagle_architecture_config`` overrides only the shapes of the EAGLE-3 default (``eagle3_default_config``):
   ``intermediate_size``, ``num_attention_heads``, ``num_key_value_heads``, ``head_dim = hidden // heads``,
   ``draft_vocab_size``; one decoder layer, aux hidden states from the 3 default layers
   (``default_eagle_aux_layer_ids``), attention ``sdpa`` (modelopt's default; ``--attn flex_attention`` as in the
   example ``eagle_config.json``). This runs ``HFEagleModel.modify`` (plugins/hf_eagle.py), which freezes the
   base, builds ``EagleModule`` with its own draft-vocab lm_head and ``d2t`` buffer, drops the base layers and,
   when compiling, wraps ``_prepare_eagle_inputs`` (default mode), ``_eagle_forward`` (``mode="max-autotune"``)
   and ``_eagle_loss`` (``fullgraph=True``) in ``torch.compile(dynamic=False)`` with
   ``torch._dynamo.config.suppress_errors = True`` (``_activate_torch_compile``). That is Model-Optimizer's own
   compile; its launcher does not compile the whole model. Because suppress_errors can fall back to eager
   silently, the JSON reports dynamo's graph and graph-break counts.
3. The draft-to-target map ``eagle_module.d2t`` is filled with a random sorted subset of the target vocab (the
   in-memory equivalent of ``HFEagleModel.load_draft_vocab_cache``, which ``torch.load``s the same tensor).
4. The batch is what ``eagle.utils.EagleOfflineDataCollator(train_len=--seq-len)`` yields for full-length
   samples: ``input_ids``, ``attention_mask`` (ones), ``loss_mask`` (ones), ``labels`` (shifted ids, -100 last)
   and ``base_model_outputs = {base_model_hidden_states [B,S,H], aux_hidden_states [B,S,3H],
   base_hidden_prenorm: False}``, random normal hidden states, random token ids. Every row is full, so no
   compute is wasted on padding here (modelopt pads shorter samples to train_len; this is its best case).
   Like the real dumps, no ``base_model_logits`` are given, so ``HFEagleModel.forward`` recomputes the teacher
   logits with the base lm_head (full target vocab) at every step and ``_prepare_eagle_inputs`` gathers the
   draft-vocab columns and takes their softmax (plugins/hf_eagle.py lines 715-721 and 527-531 in 0.47.0);
   the input embeddings are likewise looked up in the base embedding each step (line 484).
5. One timed step = what HF ``Trainer`` does per optimizer step with the recipe's settings: ``model(**batch)``
   (train mode, the loop over TTT steps inside modelopt), ``loss.backward()``, ``clip_grad_norm_(1.0)``
   (Trainer default ``max_grad_norm``), ``AdamW(lr=1e-4, weight_decay=0, fused=True)`` (Trainer's default
   ``adamw_torch_fused`` for torch >= 2.8), linear LR schedule step, ``zero_grad``. The Trainer's data loader,
   logging and callbacks are not timed. Median over ``--steps`` after ``--warmup`` untimed steps (the first
   one includes compilation, reported separately as ``first_step_ms``).

What was needed to run on CPU: nothing patched. All weights are float32 by default (``--dtype``); the recipe's
``bf16: true`` only matters on GPU, where ``--bf16-autocast`` mirrors it. Note that modelopt's training forward
restricts SDPA to the cuDNN and MATH backends (``utils.enable_cp_ttt_patch``, entered by ``_enable_cp_ttt`` in
training), so on CPU its attention always runs the MATH kernel; that is modelopt's behaviour, left as is.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys

from bench.common import Stopwatch, print_step_timing  # standard library only, as shapes: the peers' venvs import both
from bench.peers.shapes import add_shape_flags


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags; the shape flags are bench/peers/shapes.py's, as in bench/perf/train_step.py."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shape_flags(p)
    p.add_argument("--target-layers", type=int, default=16,
                   help="layer count of the (absent) target; picks the 3 default aux layers")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (the first one compiles)")
    p.add_argument("--no-compile", action="store_true", help="eagle_use_torch_compile=False (eager)")
    p.add_argument("--attn", choices=["sdpa", "flex_attention"], default="sdpa")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="weight dtype")
    p.add_argument("--bf16-autocast", action="store_true", help="bf16 autocast as HF Trainer bf16=True does")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print only one JSON object on stdout")
    args = p.parse_args(argv)
    if args.hidden % args.heads or args.heads % args.kv_heads:
        p.error("--hidden must be divisible by --heads, and --heads by --kv-heads")
    if not 0 < args.draft_vocab <= args.vocab:
        p.error("--draft-vocab must be in 1..--vocab")
    if args.steps < 1 or args.warmup < 1:
        p.error("--steps and --warmup must be >= 1")
    return args


def build_model(args, torch, transformers, mtsp):
    """Offline Llama target (no decoder layers) converted to Model-Optimizer's EAGLE-3 model."""
    from modelopt.torch.speculative.plugins.hf_eagle import default_eagle_aux_layer_ids

    aux_ids = default_eagle_aux_layer_ids(args.target_layers)
    if len(aux_ids) != 3:
        raise SystemExit(f"--target-layers {args.target_layers} gives aux layers {aux_ids}; need 3 distinct")
    config = transformers.LlamaConfig(
        hidden_size=args.hidden, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        intermediate_size=args.intermediate, vocab_size=args.vocab, num_hidden_layers=0,
        max_position_embeddings=max(4096, args.seq_len), tie_word_embeddings=False,
    )
    dtype = getattr(torch, args.dtype)
    model = transformers.LlamaForCausalLM(config).to(dtype=dtype)
    model.config.num_orig_hidden_layers = args.target_layers  # as load_vlm_or_llm does offline
    arch = {
        "intermediate_size": args.intermediate,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.kv_heads,
        "head_dim": args.hidden // args.heads,
        "draft_vocab_size": args.draft_vocab,
    }
    if args.attn != "sdpa":
        arch["_attn_implementation"] = args.attn
    eagle_cfg = mtsp.EagleConfig(
        eagle_offline=True,
        eagle_ttt_steps=args.ttt_steps,
        eagle_use_torch_compile=not args.no_compile,
        eagle_architecture_config=arch,
    ).model_dump()
    mtsp.convert(model, [("eagle", eagle_cfg)])
    if args.draft_vocab < args.vocab:
        gen = torch.Generator().manual_seed(args.seed + 1)
        draft_ids = torch.randperm(args.vocab, generator=gen)[: args.draft_vocab].sort().values
        model.eagle_module.d2t.copy_(draft_ids - torch.arange(args.draft_vocab))
    return model.to(args.device)


def make_batch(args, torch):
    """One batch shaped like EagleOfflineDataCollator's output for full-length samples."""
    gen = torch.Generator().manual_seed(args.seed + 2)
    b, s, h = args.batch, args.seq_len, args.hidden
    dtype = getattr(torch, args.dtype)
    input_ids = torch.randint(0, args.vocab, (b, s), generator=gen)
    labels = torch.full_like(input_ids, -100)
    labels[:, :-1] = input_ids[:, 1:]
    batch = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "loss_mask": torch.ones_like(input_ids),
        "labels": labels,
        "base_model_outputs": {
            "base_model_hidden_states": torch.randn(b, s, h, generator=gen).to(dtype),
            "aux_hidden_states": torch.randn(b, s, 3 * h, generator=gen).to(dtype),
            "base_hidden_prenorm": False,
        },
    }

    def to_device(x):
        if isinstance(x, dict):
            return {k: to_device(v) for k, v in x.items()}
        return x.to(args.device) if hasattr(x, "to") else x

    return to_device(batch)


def run(args) -> dict:
    """Build, warm up and time the step; returns the result dict."""
    import torch
    import transformers

    import modelopt
    import modelopt.torch.speculative as mtsp

    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_model(args, torch, transformers, mtsp)
    model.train()
    batch = make_batch(args, torch)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, fused=True)
    total = args.warmup + args.steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: max(0.0, 1.0 - i / total))
    autocast = (torch.autocast(device_type=torch.device(args.device).type, dtype=torch.bfloat16)
                if args.bf16_autocast else contextlib.nullcontext())
    sync = torch.cuda.synchronize if torch.device(args.device).type == "cuda" else (lambda: None)

    def step() -> float:
        with autocast:
            out = model(**batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return float(out.loss.detach())

    times, cpu_times, losses = [], [], []
    for i in range(total):
        sync()
        with Stopwatch() as watch:
            losses.append(step())
            sync()
        times.append(watch.wall * 1000.0)
        cpu_times.append(watch.cpu * 1000.0)  # this process's CPU time, all threads
    timed = times[args.warmup:]
    median_ms = statistics.median(timed)
    counters = torch._dynamo.utils.counters
    return {
        "impl": "modelopt-0.47",
        "compiled": not args.no_compile,
        "median_ms": round(median_ms, 2),
        "tokens_per_s": round(args.batch * args.seq_len / (median_ms / 1000.0), 1),
        "step_ms": [round(t, 2) for t in timed],
        "median_cpu_ms": round(statistics.median(cpu_times[args.warmup:]), 2),
        "first_step_ms": round(times[0], 2),
        "loss_first_last": [round(losses[0], 4), round(losses[-1], 4)],
        "dynamo_unique_graphs": int(counters["stats"]["unique_graphs"]),
        "dynamo_graph_breaks": int(sum(counters["graph_break"].values())),
        "shapes": {
            "hidden": args.hidden, "heads": args.heads, "kv_heads": args.kv_heads,
            "intermediate": args.intermediate, "vocab": args.vocab, "draft_vocab": args.draft_vocab,
            "seq_len": args.seq_len, "batch": args.batch, "ttt_steps": args.ttt_steps,
        },
        "trainable_params": sum(p.numel() for p in params),
        "attn": args.attn,
        "dtype": args.dtype,
        "bf16_autocast": args.bf16_autocast,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "modelopt": modelopt.__version__,
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # Model-Optimizer prints progress to stdout; keep stdout for the result alone.
    with contextlib.redirect_stdout(sys.stderr):
        result = run(args)
    print_step_timing(result, args.json)


if __name__ == "__main__":
    main()
