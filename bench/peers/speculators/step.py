"""Time vLLM speculators 0.9.0's EAGLE-3 training step, next to Model-Optimizer's and eagle-pipe's.

Run it with the interpreter of the separate venv made by ``bench/peers/speculators/venv.sh``::

    bash bench/peers/speculators/venv.sh                   # once: creates .venv-speculators
    .venv-speculators/bin/python -m bench.peers.speculators.step --hidden 256 --heads 8 --kv-heads 4 \\
        --intermediate 688 --vocab 8192 --draft-vocab 4096 --seq-len 512 --batch 4 --ttt-steps 3 --steps 10 --json

With ``--json`` stdout holds exactly one JSON object (everything speculators logs goes to stderr), so
``bench/perf/train_step.py --speculators-python`` can run this script as a subprocess and print the ratio.

Code path exercised (file:line in speculators 0.9.0 as installed; what ``speculators train --speculator-type
eagle3`` builds and runs with its default flags, except where noted):

1. Verifier: a ``transformers.LlamaConfig`` of the given shapes (``--target-layers`` layers) saved with
   ``save_pretrained`` into a temporary directory, plus a ``model.safetensors`` holding only
   ``model.embed_tokens.weight``, ``lm_head.weight`` and ``model.norm.weight`` (random): exactly the tensors
   ``DraftVocabMixin._load_verifier_weights`` (model.py:127) reads through ``utils.loading.load_model_layers``.
2. Draft config: ``train/cli.py:113 create_transformer_layer_config`` with the CLI defaults ``num_layers=1``,
   ``draft_arch="llama"``, ``hidden_act="silu"``, ``sliding_window=2048``, no ``--full-attention-indices`` (so
   the one layer is a sliding-window layer; with documents shorter than 2048 tokens the window never binds).
   Draft vocab maps from ``train/vocab_mapping.py:74 build_vocab_mappings_from_distribution`` over a random
   token-frequency table.
3. Model: ``models/eagle3/core.py:368 Eagle3DraftModel.from_training_args`` (as ``train/cli.py:587`` calls it)
   with the CLI's eagle3 defaults ``norm_before_residual=True``, ``norm_before_fc=True``, ``norm_output=True``
   (``TrainConfig._resolve_derived_defaults``; ``--plain-eagle3`` turns the last two off, as in ours),
   ``embed_requires_grad=False``, ``draft_attn_impl="eager"`` on CPU (the CLI default ``simple_flex_attention``,
   kept on CUDA, needs a compiled flex kernel, and speculators compiles only on CUDA; ``--attn sdpa`` is the
   other dense choice). Loss: ``get_trainer_kwargs`` (core.py:429) with ``loss_fn="kl_div"``,
   ``ttt_step_loss_decay=1.0`` (defaults) and on CPU ``loss_implementation="eager"``: the CLI default ``fused``
   (kept on CUDA) is a Triton kernel (losses/fused.py) with no CPU backend; the eager one is
   ``losses/eager.py:11 kl_div_loss`` (fp32 log_softmax + softmax + kl_div over the draft vocab), reduced by
   ``losses/utils.py:233 compound_loss`` / ``:269 loss_function``. Only the CPU path has been run.
4. Batch: what ``train/data.py:336 CollateFn`` yields after ``models/eagle3/data.py shift_batch``: ONE packed
   row ``[1, batch*seq_len]`` (speculators has no batch dimension; samples are concatenated up to
   ``--total-seq-len``), ``document_ids`` per sample, ``position_ids`` restarting per document (from 1, after
   the shift), a boolean ``loss_mask`` (80% ones), ``hidden_states [1, L, 3H]`` (aux) and
   ``verifier_last_hidden_states [1, L, H]``. Documents have the same random lengths (seq_len/8 .. seq_len/2,
   never crossing a seq_len boundary) as bench/perf/train_step.py's batch; every token is real (no -1 padding).
5. One timed step = the body of ``train/trainer.py:483 Trainer.train_epoch`` (lines 539-579, default
   ``log_freq=1`` so every step is a logged step): ``model(**batch, **train_kwargs)`` under
   ``torch.autocast(device_type, bf16)`` (on a CPU host the trainer's ``device_type`` is ``"cuda"``, so autocast
   is off and everything is fp32; on CUDA ``--bf16-autocast`` mirrors its default), ``zero_grad``,
   ``loss.backward()``, ``clip_grad_norm_(model.parameters(), 1.0)``, optimizer step, linear warm-up/decay
   scheduler step, then the logged step's host reads: the token count and every metric ``.item()``. The
   optimizer comes from ``train/optimizers.py:69 build_optimizers``: ``--optimizer adamw`` (default here, like
   ours: ``torch.optim.AdamW`` over ``named_parameters()``, weight decay 0.01, torch's default
   for-loop/foreach implementation) or ``muon`` (the speculators CLI default: ``torch.optim.Muon`` on the 2-D
   weight matrices + AdamW on the rest). The trainer's per-mark ``torch.accelerator.synchronize`` calls
   (``_StepTimer``) are not reproduced; there is one sync at the end of the timed step.

Forward per step (core.py:193-365): build the dense float document/causal/window mask ``[1, 1, L, L]`` with
``create_float_mask`` (models/attention.py:69, bf16 additive, via vmap over the mask_mod), optional RMSNorm over
the 3H aux input, fc; **teacher logits recomputed every step** from the verifier's final norm and draft-vocab
lm_head: ``verifier_lm_head(verifier_norm(verifier_last_hidden_states))`` (core.py:251, an ``L x H x Vd`` GEMM
under no_grad); then for each of the TTT steps: embed lookup (no grad), one Llama decoder layer whose
``LlamaAttention`` runs transformers' ``eager_attention_forward`` (matmul, + mask, fp32 softmax, matmul; GQA via
repeat_kv) with the keys/values of all previous TTT steps appended through a ``DynamicCache`` (key length L,
2L, 3L) and the mask extended by a diagonal block each step (``extend_dense_mask_for_draft_tokens``,
attention.py:115), final norm + lm_head, ``compute_metrics`` (metrics.py:51: KL loss, argmax accuracies), argmax
draft tokens. ``torch.compile``: speculators compiles ``forward`` only when CUDA is available
(``models/utils.py:71 conditional_torch_compile``, applied at import), so on CPU its step is always eager;
``--no-compile`` disables dynamo for it on CUDA.

Differences in what it computes vs eagle-pipe (``stages.train.stage.optimizer_step``) at the same shapes:
- Attention: a dense eager score matrix over the whole packed row, ``L x L*(k+1)`` at TTT step k with
  ``L = B*T`` (the earlier steps' keys are appended as full ``L x L`` blocks of which only the diagonal is
  unmasked), every masked entry computed and then discarded: ``6 (B*T)^2`` score entries over 3 steps. Ours
  (eagle/attention.py, dense path) computes per step one causal ``T x T`` block per row less its skipped
  37.5%, plus one diagonal vector per earlier step: ``~3 * 0.625 * B * T^2``, ~13x fewer at B 4 x T 512.
  ``max_rss_gib`` reports the process's peak memory (2.7 GiB at these shapes).
- Teacher: full draft-vocab teacher distribution from an extra frozen GEMM every step, KL over the draft vocab;
  ours reads the dump's stored top-k teacher log-probs (no teacher GEMM). Its input is 4H floats per token
  (3H aux + H last hidden) vs our 3H + top-k.
- EAGLE-3.1 norms on by default (RMSNorm over the fc input, normed hidden fed to the next step); ours has neither.
- Host syncs: ~20 ``.item()`` metric reads per logged step (every step by default); ours syncs once per log
  interval. Irrelevant on CPU, a pipeline stall per step on GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import resource
import statistics
import sys
import tempfile
from pathlib import Path

from bench.common import Stopwatch, print_step_timing  # standard library only, as shapes: the peers' venvs import both
from bench.peers.shapes import add_shape_flags


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags; the shape flags are bench/peers/shapes.py's, as in bench/perf/train_step.py."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shape_flags(p)
    p.add_argument("--total-seq-len", type=int, default=0,
                   help="packed row length (default batch*seq-len: the same tokens per step as ours)")
    p.add_argument("--target-layers", type=int, default=16, help="verifier layer count (picks the aux layers)")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--no-compile", action="store_true", help="disable speculators' CUDA-only torch.compile")
    p.add_argument("--attn", choices=["auto", "eager", "sdpa", "simple_flex_attention"], default="auto",
                   help="draft_attn_impl (auto: the CLI default simple_flex_attention on CUDA, eager on CPU)")
    p.add_argument("--loss-impl", choices=["auto", "eager", "fused"], default="auto",
                   help="loss_implementation (auto: the CLI default fused Triton kernel on CUDA, eager on CPU)")
    p.add_argument("--optimizer", choices=["adamw", "muon"], default="adamw")
    p.add_argument("--plain-eagle3", action="store_true", help="norm_before_fc=False, norm_output=False")
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16-autocast", action="store_true", help="bf16 autocast as the trainer does on GPU")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print only one JSON object on stdout")
    args = p.parse_args(argv)
    args.total_seq_len = args.total_seq_len or args.batch * args.seq_len
    on_cuda = args.device.startswith("cuda")
    if args.attn == "auto":
        args.attn = "simple_flex_attention" if on_cuda else "eager"
    if args.loss_impl == "auto":
        args.loss_impl = "fused" if on_cuda else "eager"
    if args.hidden % args.heads or args.heads % args.kv_heads:
        p.error("--hidden must be divisible by --heads, and --heads by --kv-heads")
    if not 0 < args.draft_vocab < args.vocab:
        p.error("--draft-vocab must be in 1..--vocab - 1 (speculators maps a smaller draft vocab)")
    if args.steps < 1 or args.warmup < 1:
        p.error("--steps and --warmup must be >= 1")
    return args


def write_verifier(args, directory: Path, torch, transformers) -> None:
    """A verifier checkpoint holding only what speculators reads: config, embedding, lm_head, final norm."""
    from safetensors.torch import save_file

    config = transformers.LlamaConfig(
        hidden_size=args.hidden, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        intermediate_size=args.intermediate, vocab_size=args.vocab, num_hidden_layers=args.target_layers,
        max_position_embeddings=max(4096, args.total_seq_len + args.ttt_steps + 1), rms_norm_eps=1e-5,
        tie_word_embeddings=False, architectures=["LlamaForCausalLM"],
    )
    config.save_pretrained(directory)
    gen = torch.Generator().manual_seed(args.seed + 1)
    save_file({
        "model.embed_tokens.weight": torch.randn(args.vocab, args.hidden, generator=gen) * 0.02,
        "lm_head.weight": torch.randn(args.vocab, args.hidden, generator=gen) * 0.02,
        "model.norm.weight": torch.ones(args.hidden),
    }, str(directory / "model.safetensors"))


def build_model(args, verifier_dir: Path, torch):
    """speculators' own EAGLE-3 draft, built the way `speculators train` builds it."""
    from speculators.models.eagle3 import Eagle3DraftModel
    from speculators.train.cli import create_transformer_layer_config
    from speculators.train.vocab_mapping import build_vocab_mappings_from_distribution

    gen = torch.Generator().manual_seed(args.seed + 2)
    freq = torch.randint(1, 10_000, (args.vocab,), generator=gen).tolist()
    d2t, t2d = build_vocab_mappings_from_distribution(dict(enumerate(freq)), args.draft_vocab, args.vocab)
    layer_config = create_transformer_layer_config(
        verifier_name_or_path=str(verifier_dir), num_layers=1, draft_arch="llama", hidden_act="silu",
        sliding_window=2048, full_attention_indices=[],
    )
    model = Eagle3DraftModel.from_training_args(
        verifier_config=layer_config, t2d=t2d, d2t=d2t, verifier_name_or_path=str(verifier_dir),
        draft_vocab_size=args.draft_vocab, norm_before_residual=True, norm_before_fc=not args.plain_eagle3,
        fc_norm=False, norm_output=not args.plain_eagle3, embed_requires_grad=False, draft_attn_impl=args.attn,
        ttt_steps=args.ttt_steps, target_layer_ids=None,
    )
    train_kwargs, _ = Eagle3DraftModel.get_trainer_kwargs(
        ttt_steps=args.ttt_steps, ttt_step_loss_decay=1.0, loss_fn="kl_div", loss_implementation=args.loss_impl)
    return model.to(args.device), train_kwargs


def make_batch(args, torch) -> dict:
    """One packed row as CollateFn + shift_batch yield it; documents as in bench/perf/train_step.py's batch."""
    gen = torch.Generator().manual_seed(args.seed)
    L, T, h = args.total_seq_len, args.seq_len, args.hidden
    doc = torch.empty(L, dtype=torch.long)
    pos = torch.empty(L, dtype=torch.long)
    d = 0
    for row in range(0, L, T):
        o = row
        while o < min(row + T, L):
            n = min(int(torch.randint(T // 8, T // 2 + 1, (1,), generator=gen)), min(row + T, L) - o)
            doc[o:o + n], pos[o:o + n] = d, torch.arange(1, n + 1)
            o, d = o + n, d + 1
    batch = {
        "input_ids": torch.randint(0, args.vocab, (1, L), generator=gen),
        "hidden_states": torch.randn(1, L, 3 * h, generator=gen),
        "verifier_last_hidden_states": torch.randn(1, L, h, generator=gen),
        "loss_mask": torch.rand(1, L, generator=gen) < 0.8,
        "position_ids": pos.unsqueeze(0),
        "document_ids": doc.unsqueeze(0),
    }
    dtype = torch.bfloat16 if args.bf16_autocast else torch.float32  # CollateFn casts hidden states
    return {k: (v.to(dtype) if v.is_floating_point() else v).to(args.device) for k, v in batch.items()}


def run(args) -> dict:
    """Build, warm up and time the step; returns the result dict."""
    import torch
    import transformers
    from speculators.train.optimizers import build_optimizers
    from speculators.train.trainer import TrainerConfig
    from speculators.version import version
    from transformers import get_linear_schedule_with_warmup

    logging.basicConfig(stream=sys.stderr, level=logging.WARNING)
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.no_compile:
        torch._dynamo.config.disable = True
    with tempfile.TemporaryDirectory() as tmp:
        write_verifier(args, Path(tmp), torch, transformers)
        model, train_kwargs = build_model(args, Path(tmp), torch)
    model.train()
    batch = make_batch(args, torch)
    total = args.warmup + args.steps
    config = TrainerConfig(lr=1e-3, num_epochs=1, save_path="", optimizer=args.optimizer, weight_decay=0.01)
    optimizers = build_optimizers(model, config)
    schedulers = [get_linear_schedule_with_warmup(o, num_warmup_steps=total // 100, num_training_steps=total)
                  for o in optimizers]
    device_type = torch.device(args.device).type
    autocast = (torch.autocast(device_type=device_type, dtype=torch.bfloat16) if args.bf16_autocast
                else contextlib.nullcontext())
    sync = torch.cuda.synchronize if device_type == "cuda" else (lambda: None)

    def step() -> float:
        with autocast:
            _draft_tokens, loss, metrics = model(**batch, **train_kwargs)
        for o in optimizers:
            o.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for optimizer in optimizers:
            optimizer.step()
        for scheduler in schedulers:
            scheduler.step()
        int((batch["document_ids"] != -1).sum().item())  # the logged step's host reads (log_freq=1)
        logged = {k: v.item() for k, v in metrics.items()}
        return logged["loss_sum"]

    times, cpu_times, losses = [], [], []
    for _ in range(total):
        sync()
        with Stopwatch() as watch:
            losses.append(step())
            sync()
        times.append(watch.wall * 1000.0)
        cpu_times.append(watch.cpu * 1000.0)  # this process's CPU time, all threads
    timed = times[args.warmup:]
    median_ms = statistics.median(timed)
    params = [p for p in model.parameters() if p.requires_grad]
    return {
        "impl": f"speculators-{version}",
        "compiled": device_type == "cuda" and not args.no_compile,
        "median_ms": round(median_ms, 2),
        "tokens_per_s": round(args.total_seq_len / (median_ms / 1000.0), 1),
        "step_ms": [round(t, 2) for t in timed],
        "median_cpu_ms": round(statistics.median(cpu_times[args.warmup:]), 2),
        "first_step_ms": round(times[0], 2),
        "loss_first_last": [round(losses[0], 4), round(losses[-1], 4)],
        "finite": bool(all(torch.isfinite(p).all() for p in params)),
        "shapes": {
            "hidden": args.hidden, "heads": args.heads, "kv_heads": args.kv_heads,
            "intermediate": args.intermediate, "vocab": args.vocab, "draft_vocab": args.draft_vocab,
            "seq_len": args.seq_len, "batch": args.batch, "ttt_steps": args.ttt_steps,
        },
        "total_seq_len": args.total_seq_len,
        "trainable_params": sum(p.numel() for p in params),
        "attn": args.attn,
        "loss_impl": args.loss_impl,
        "optimizer": args.optimizer,
        "eagle31_norms": not args.plain_eagle3,
        "dtype": "float32",
        "bf16_autocast": args.bf16_autocast,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "max_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "speculators": version,
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with contextlib.redirect_stdout(sys.stderr):  # keep stdout for the result alone
        result = run(args)
    print_step_timing(result, args.json)


if __name__ == "__main__":
    main()
