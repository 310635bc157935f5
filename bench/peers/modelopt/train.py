"""Train and export a Model-Optimizer 0.47 EAGLE-3 draft offline from bench/peers/quality_data.py's files.

Run with the interpreter of the venv made by ``bench/peers/modelopt/venv.sh`` (bench/peers/quality.py does)::

    .venv-modelopt/bin/python -m bench.peers.modelopt.train --peer-data DIR --target TARGET --work WORK \\
        --steps N --batch B --train-len L --ttt-steps K --lr LR --warmup-steps W --json

What it runs is the offline path of Model-Optimizer's ``examples/speculative_decoding/main.py`` (repository
examples, not in the wheel; read at the commit whose ``plugins/hf_eagle.py`` equals 0.47.0's) with the wheel's own
pieces, recipe ``modelopt_recipes/general/speculative_decoding/eagle3.yaml``:

1. Data: one ``.pt`` file per conversation, the keys ``OfflineSupervisedDataset`` (eagle/utils.py) reads with
   ``torch.load(weights_only=True)``: ``input_ids`` int64 [n], ``hidden_states`` [n, H] (the target's last hidden
   state *after* the final norm: ``hidden_states_prenorm`` absent = False, so ``lm_head(hidden_states)`` are the
   teacher logits), ``aux_hidden_states`` [n, 3H] and ``loss_mask`` [n] (the per-token mask it reads with
   ``training.answer_only_loss: true``; bench/peers/quality_data.py explains the one-token shift that makes it
   supervise the same positions as eagle-pipe). ``torch.save`` is this peer's own format (a pickle container);
   only this driver writes it, and Model-Optimizer reads it with ``weights_only=True``. The draft vocabulary is
   ``data.draft_vocab_cache``: a ``torch.save``'d int64 ``d2t`` [Vd] that ``HFEagleModel.load_draft_vocab_cache``
   loads: eagle-pipe's own map, so all three drafts share one vocabulary.
2. Model: ``load_vlm_or_llm(target, use_offline_training=True)`` (``num_hidden_layers=0``: embedding, final
   norm, lm_head), ``mtsp.convert(model, [("eagle", eagle_cfg)])`` with the recipe's ``eagle:`` section
   (``eagle_offline`` derived True, ``eagle_ttt_steps`` = ``--ttt-steps``, loss decay 0.9, self logit
   distillation) and ``eagle_architecture_config`` overriding only: the draft's attention/MLP shapes (the
   target's heads, kv heads, head_dim, intermediate size, so the three drafts have one size: Model-Optimizer's
   default is a Llama-3-8B-shaped layer), ``eagle_aux_hidden_state_layer_ids`` (the dump's layers minus 1: its
   ids are *outputs* of layer i, eagle-pipe's the residual *entering* layer k) and ``draft_vocab_size``.
   ``eagle_use_torch_compile`` off unless ``--compile`` (its max-autotune compile costs minutes on CPU).
3. Loop: ``transformers.Trainer`` (``EagleTrainerWithAccLog`` adds only logging) over
   ``OfflineSupervisedDataset(answer_only_loss=True)`` + ``EagleOfflineDataCollator(train_len)``: ``--batch``
   conversations per step, each padded to ``--train-len``; ``max_steps`` = ``--steps``; the recipe's optimizer
   settings (AdamW fused, weight decay 0, ``max_grad_norm`` 1.0 = Trainer's default) and
   ``lr_scheduler_type`` = ``--schedule`` (``cosine``: linear warmup then cosine to 0, the schedule the bench
   gives all three; the recipe's own default is ``linear``).
4. Export: ``modelopt.torch.export.export_speculative_decoding(model, export_dir)`` (what
   ``examples/speculative_decoding/scripts/export_hf_checkpoint.py`` calls), into WORK/export.

stdout (with ``--json``): one JSON object: export dir, steps, wall seconds, median step seconds, training-time
accuracies per TTT step (last log), settings as applied.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from bench.common import median_gap  # standard library only: the peer's venv imports it


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--peer-data", required=True, help="bench/peers/quality_data.py output directory")
    p.add_argument("--target", required=True)
    p.add_argument("--work", required=True, help="data/, run/ and export/ go here")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--batch", type=int, required=True, help="conversations per optimizer step")
    p.add_argument("--train-len", type=int, required=True, help="training_seq_len: every sample padded/cut to it")
    p.add_argument("--ttt-steps", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--schedule", default="cosine", help="HF lr_scheduler_type (recipe default: linear)")
    p.add_argument("--loss-decay", type=float, default=None, help="eagle_loss_decay_factor (recipe: 0.9)")
    p.add_argument("--export-rope-scaling", choices=["recipe", "none"], default="recipe",
                   help="recipe: the YaRN x32 the recipe injects at export; none: export the trained RoPE")
    p.add_argument("--compile", action="store_true", help="eagle_use_torch_compile (recipe default True)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    return p.parse_args(argv)


def write_offline_files(peer_data: Path, data_dir: Path) -> int:
    """conv-*.safetensors -> conv-*.pt with the keys OfflineSupervisedDataset reads; returns the count."""
    import torch
    from safetensors.torch import load_file

    data_dir.mkdir(parents=True, exist_ok=True)
    n = 0
    for src in sorted((peer_data / "conversations").glob("conv-*.safetensors")):
        dst = data_dir / (src.stem + ".pt")
        n += 1
        if dst.is_file():
            continue
        t = load_file(str(src))
        torch.save({"input_ids": t["input_ids"].to(torch.int64),
                    "hidden_states": t["last_hidden_postnorm"],
                    "aux_hidden_states": t["aux_hidden_states"],
                    "loss_mask": t["loss_mask"].to(torch.int64)}, str(dst) + ".tmp")
        Path(str(dst) + ".tmp").rename(dst)
    return n


def main(argv=None) -> dict:
    args = parse_args(argv)
    real_stdout = sys.stdout
    if args.json:
        sys.stdout = sys.stderr   # everything the peer prints goes to stderr; stdout holds one JSON object
    import torch
    import transformers
    from safetensors.torch import load_file

    import modelopt.torch.opt as mto
    import modelopt.torch.speculative as mtsp
    from modelopt.torch.export import export_speculative_decoding
    from modelopt.torch.speculative.eagle.utils import EagleOfflineDataCollator, OfflineSupervisedDataset
    from modelopt.torch.speculative.utils import load_vlm_or_llm

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    mto.enable_huggingface_checkpointing()
    peer_data, work = Path(args.peer_data), Path(args.work)
    meta = json.loads((peer_data / "quality_data.json").read_text())
    n_files = write_offline_files(peer_data, work / "data")
    vocab = load_file(str(peer_data / "vocab.safetensors"))
    d2t_path = work / "d2t.pt"
    torch.save(vocab["d2t"].to(torch.int64), str(d2t_path))

    model = load_vlm_or_llm(args.target, use_offline_training=True, dtype=torch.float32, device_map="cpu")
    tcfg = transformers.AutoConfig.from_pretrained(args.target)
    tcfg = getattr(tcfg, "text_config", None) or tcfg
    heads = tcfg.num_attention_heads
    arch = {
        "num_attention_heads": heads,
        "num_key_value_heads": getattr(tcfg, "num_key_value_heads", heads),
        "head_dim": getattr(tcfg, "head_dim", None) or tcfg.hidden_size // heads,
        "intermediate_size": tcfg.intermediate_size,
        "draft_vocab_size": int(vocab["d2t"].numel()),
        "eagle_aux_hidden_state_layer_ids": [k - 1 for k in meta["aux_layer_ids"]],
    }
    eagle = dict(  # modelopt_recipes/general/speculative_decoding/eagle3.yaml `eagle:` + derived eagle_offline
        eagle_offline=True, eagle_decoder_type="llama", eagle_ttt_steps=args.ttt_steps, eagle_mix_hidden_states=False,
        eagle_use_torch_compile=args.compile, eagle_self_logit_distillation=True, eagle_freeze_base_model=True,
        eagle_loss_decay_factor=0.9 if args.loss_decay is None else args.loss_decay,
        eagle_hidden_state_distillation=False, eagle_reuse_base_decoder=False, eagle_report_acc=True,
        eagle_enable_nvtx=False, eagle_architecture_config=arch,
    )
    if args.export_rope_scaling == "none":
        eagle["eagle_export_rope_scaling"] = {}
    eagle_cfg = mtsp.EagleConfig(**eagle).model_dump()
    mtsp.convert(model, [("eagle", eagle_cfg)])
    mtsp.plugins.HFEagleModel.load_draft_vocab_cache(model, str(d2t_path))

    files = sorted(str(p) for p in (work / "data").glob("conv-*.pt"))
    dataset = OfflineSupervisedDataset(files, answer_only_loss=True)
    collator = EagleOfflineDataCollator(train_len=args.train_len)
    targs = transformers.TrainingArguments(  # the recipe's `training:` section, CPU fp32, the bench's budget
        output_dir=str(work / "run"), max_steps=args.steps, per_device_train_batch_size=args.batch,
        learning_rate=args.lr, warmup_steps=args.warmup_steps, lr_scheduler_type=args.schedule,
        weight_decay=0.0, logging_steps=max(1, args.steps // 20), save_strategy="no", do_eval=False,
        dataloader_drop_last=True, bf16=False, tf32=False, remove_unused_columns=False, report_to=[],
        disable_tqdm=True, seed=args.seed, use_cpu=True,
    )
    stamps: list[float] = []
    accs: list = []

    class Timer(transformers.TrainerCallback):   # step-end to step-end: the step plus fetching the next batch
        def on_step_end(self, a, state, control, **kw):
            stamps.append(time.perf_counter())

    class AccTrainer(transformers.Trainer):  # EagleTrainerWithAccLog's bookkeeping, kept in memory
        def compute_loss(self, *a, **kw):
            kw.pop("num_items_in_batch", None)
            loss, outputs = super().compute_loss(*a, return_outputs=True, **kw)
            if getattr(outputs, "train_acc", None):
                accs.append(outputs.train_acc)
            return loss

    trainer = AccTrainer(model=model, args=targs, train_dataset=dataset, data_collator=collator,
                         callbacks=[Timer()])
    trainer.can_return_loss = True
    wall0 = time.perf_counter()
    result = trainer.train()
    wall = time.perf_counter() - wall0
    model.eval()
    export_dir = work / "export"
    with torch.inference_mode():
        export_speculative_decoding(model, export_dir=str(export_dir))
    tail = accs[-max(1, len(accs) // 10):]
    out = {
        "trainer": "modelopt", "version": __import__("modelopt").__version__, "export_dir": str(export_dir),
        "conversations": n_files, "steps": int(result.global_step), "wall_s": round(wall, 2),
        "median_step_s": median_gap(stamps),
        "train_loss": float(result.training_loss),
        "train_acc_last10pct": [round(sum(a[0][j] for a in tail) / len(tail), 4) for j in range(args.ttt_steps)],
        "settings": {"batch_conversations": args.batch, "train_len": args.train_len, "lr": args.lr,
                     "warmup_steps": args.warmup_steps, "schedule": args.schedule, "optimizer": targs.optim,
                     "adam_betas": [targs.adam_beta1, targs.adam_beta2], "max_grad_norm": targs.max_grad_norm,
                     "loss_decay": eagle["eagle_loss_decay_factor"], "compile": args.compile,
                     "export_rope_scaling": eagle_cfg.get("eagle_export_rope_scaling"),
                     "draft_arch": arch},
    }
    if args.json:
        real_stdout.write(json.dumps(out) + "\n")
    else:
        print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
