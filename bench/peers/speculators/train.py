"""Train a vLLM speculators 0.9 EAGLE-3 draft from bench/peers/quality_data.py's files, with its own trainer.

Run with the interpreter of the venv made by ``bench/peers/speculators/venv.sh`` (bench/peers/quality.py does)::

    .venv-speculators/bin/python -m bench.peers.speculators.train --peer-data DIR --target TARGET --work WORK \\
        --steps N --total-seq-len L --ttt-steps K --lr LR --warmup-steps W --json

What it runs is ``speculators.train.cli.main(TrainConfig.resolve(argv))``, the code behind ``python -m
speculators.train`` (file:line below are speculators 0.9.0 as installed), on the data layout it reads:

1. Data (``--data-path WORK/data``, read by ``train/data.py ArrowDataset``): a ``datasets`` dataset saved with
   ``save_to_disk`` (torch format), columns ``input_ids`` int64, ``loss_mask`` int64 (per token; the one-token
   shift that makes it supervise what eagle-pipe supervises is in bench/peers/quality_data.py) and ``seq_len``; and
   ``WORK/data/hidden_states/hs_{i}.safetensors`` (``hs_connectors`` ``FileTransfer``, the ``file`` backend)
   holding ``token_ids`` int64 [n] and ``hidden_states`` [n, 4, H]: the three aux streams (the residual entering
   each aux layer, vLLM's convention, the same ids ``--target-layer-ids`` takes) then the last decoder layer's
   output *before* the final norm (the trainer applies the verifier's norm and draft-vocab lm_head to it for the
   teacher, models/eagle3/core.py). Vocabulary: ``d2t-{Vd}.npy`` / ``t2d-{Vd}.npy`` in the data directory, which
   ``train/cli.py parse_vocab_mappings`` loads: eagle-pipe's own map.
   speculators always holds out a validation split (``train_data_ratio`` must be < 1, train/dataloader.py): the
   dataset gets one extra row, a copy of conversation 0, and the ratio puts exactly that row in the split, so
   training sees the same conversations as the other two trainers.
2. Settings: ``--speculator-type eagle3``, its draft built from the verifier's config (1 llama layer, the
   target's shapes), lm_head = the verifier's lm_head rows of the draft vocab (kept frozen by speculators),
   ``--ttt-steps K``, its KL loss with ``ttt_step_loss_decay`` 1.0 (default), ``--total-seq-len`` tokens packed
   into one row per step (its multipack sampler), ``--scheduler-type cosine`` with ``--scheduler-warmup-steps``
   and ``--max-steps`` (the schedule decays over max_steps), its default optimizer (``muon``: Muon on the 2-D
   matrices + AdamW, weight decay 0.01 / 0.1) unless ``--optimizer``. Norm flags: ``--arch plain`` trains plain
   EAGLE-3 (``--no-norm-before-residual --no-norm-before-fc --no-norm-output``: the form every engine and
   ``eagle-pipe eval`` run); ``--arch default`` keeps speculators' EAGLE-3.1 defaults (all three on; vLLM-only).
   ``--full-attention-indices 0``: its one layer is otherwise a 2048-token sliding-window layer, which never binds
   on these conversations (so training is unchanged) but which eval refuses to run as full attention.
   CPU: ``--draft-attn-impl sdpa`` (its default flex attention needs a compile, which it does only on CUDA) and
   ``--loss-implementation eager`` (the fused loss is Triton); fp32 hidden states (``--hidden-states-dtype``).
3. Two patches, for CPU only: the trainer moves the model and every batch to ``get_local_rank()`` (the integer 0,
   i.e. ``cuda:0``; train/trainer.py setup_model / train_epoch), which the driver makes ``cpu``; and its step
   timer calls ``torch.accelerator.synchronize()`` at every mark (train/trainer.py ``_StepTimer``), which raises
   without an accelerator and becomes a no-op. Nothing else is changed.
4. Export: speculators' checkpoint directory ``WORK/run/<last epoch>/`` is its export (``save_pretrained``:
   ``config.json`` with ``speculators_model_type``, ``transformer_layer_config``, ``speculators_config``, and
   ``model.safetensors``), the directory vLLM loads.

stdout (with ``--json``): one JSON object: export dir, steps, wall seconds, seconds per step, settings.
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
    p.add_argument("--peer-data", required=True)
    p.add_argument("--target", required=True)
    p.add_argument("--work", required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--total-seq-len", type=int, required=True, help="tokens packed into the one row of a step")
    p.add_argument("--ttt-steps", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--schedule", default="cosine", choices=["cosine", "linear", "none"])
    p.add_argument("--optimizer", default="muon", choices=["muon", "adamw"], help="speculators' default: muon")
    p.add_argument("--arch", default="plain", choices=["plain", "default"])
    p.add_argument("--loss-decay", type=float, default=None, help="ttt_step_loss_decay (default 1.0)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    return p.parse_args(argv)


def write_data(peer_data: Path, data_dir: Path, draft_vocab_size: int) -> tuple[int, int]:
    """The dataset + hidden_states/hs_{i}.safetensors + d2t/t2d .npy; returns (conversations, tokens)."""
    import numpy as np
    import torch
    from datasets import Dataset
    from safetensors.torch import load_file, save_file

    files = sorted((peer_data / "conversations").glob("conv-*.safetensors"))
    hs_dir = data_dir / "hidden_states"
    hs_dir.mkdir(parents=True, exist_ok=True)
    rows = {"input_ids": [], "loss_mask": [], "seq_len": []}
    tokens = 0
    for i, src in enumerate(files + files[:1]):   # the extra last row is the validation split's copy
        t = load_file(str(src))
        ids = t["input_ids"].to(torch.int64)
        rows["input_ids"].append(ids.tolist())
        rows["loss_mask"].append(t["loss_mask"].to(torch.int64).tolist())
        rows["seq_len"].append(int(ids.numel()))
        tokens += int(ids.numel()) if i < len(files) else 0
        dst = hs_dir / f"hs_{i}.safetensors"
        if not dst.is_file():
            hs = torch.cat([t["aux_hidden_states"].unflatten(-1, (3, -1)), t["last_hidden_prenorm"][:, None]], dim=1)
            save_file({"token_ids": ids.contiguous(), "hidden_states": hs.contiguous()}, str(dst))
    ds = Dataset.from_dict(rows)
    ds.set_format("torch")
    ds.save_to_disk(str(data_dir / "_dataset_tmp"))
    for f in (data_dir / "_dataset_tmp").iterdir():   # load_from_disk(data_path): the dataset files at its root
        f.replace(data_dir / f.name)
    (data_dir / "_dataset_tmp").rmdir()
    vocab = load_file(str(peer_data / "vocab.safetensors"))
    np.save(data_dir / f"d2t-{draft_vocab_size}.npy", vocab["d2t"].numpy())
    np.save(data_dir / f"t2d-{draft_vocab_size}.npy", vocab["t2d"].numpy())
    return len(files), tokens


def epochs_for_steps(data_dir: Path, n_conv: int, total_seq_len: int, steps: int, seed: int) -> int:
    """The fewest epochs whose batches reach `steps`, counted with speculators' own multipack sampler.

    Its trainer stops an epoch at max_steps, but every later epoch still runs one step before it checks
    (train/trainer.py train_epoch), so --epochs must not exceed what the steps need.
    """
    from datasets import load_from_disk
    from speculators.train.distributed_batch_sampler import MultipackDistributedBatchSamplerV2

    lengths = list(load_from_disk(str(data_dir)).with_format(None)["seq_len"])[:n_conv]
    sampler = MultipackDistributedBatchSamplerV2(batch_max_length=total_seq_len, lengths=lengths,
                                                 num_replicas=1, rank=0, seed=seed)
    done, epoch = 0, 0
    while done < steps:
        sampler.set_epoch(epoch)
        n = len(list(iter(sampler)))
        if n == 0:
            raise SystemExit(f"speculators' sampler makes no batch of {total_seq_len} tokens from this data")
        done, epoch = done + n, epoch + 1
    return epoch


def main(argv=None) -> dict:
    args = parse_args(argv)
    real_stdout = sys.stdout
    if args.json:
        sys.stdout = sys.stderr
    import torch
    from safetensors.torch import load_file

    if args.threads:
        torch.set_num_threads(args.threads)
    peer_data, work = Path(args.peer_data), Path(args.work)
    meta = json.loads((peer_data / "quality_data.json").read_text())
    vd = int(load_file(str(peer_data / "vocab.safetensors"))["d2t"].numel())
    n_conv, n_tokens = write_data(peer_data, work / "data", vd)

    import speculators.train.trainer as trainer_mod
    from speculators.train.cli import main as speculators_main
    from speculators.train.config import TrainConfig

    if not torch.cuda.is_available():   # the trainer's .to(get_local_rank()) means cuda:0; here, the CPU
        trainer_mod.get_local_rank = lambda: torch.device("cpu")
        torch.accelerator.synchronize = lambda *a, **k: None   # its step timer syncs an accelerator at every mark

    stamps: list[float] = []   # step-end to step-end, through the trainer's own per-step callback hook
    train_epoch = trainer_mod.Trainer.train_epoch
    trainer_mod.Trainer.train_epoch = lambda self, epoch, **kw: train_epoch(
        self, epoch, step_callback=lambda: stamps.append(time.perf_counter()))

    ratio = (n_conv + 0.5) / (n_conv + 1)   # int((n+1) * ratio) == n: only the copied last row is validation
    epochs = epochs_for_steps(work / "data", n_conv, args.total_seq_len, args.steps, args.seed)
    argv_s = [
        "--speculator-type", "eagle3", "--verifier-name-or-path", str(args.target),
        "--data-path", str(work / "data"), "--draft-vocab-size", str(vd),
        "--target-layer-ids", *[str(k) for k in meta["aux_layer_ids"]],
        "--total-seq-len", str(args.total_seq_len), "--train-data-ratio", repr(ratio),
        "--hidden-states-dtype", "float32", "--num-workers", "0", "--on-missing", "raise",
        "--loss-implementation", "eager", "--draft-attn-impl", "sdpa",
        "--ttt-steps", str(args.ttt_steps), "--optimizer", args.optimizer, "--lr", repr(args.lr),
        "--scheduler-type", args.schedule, "--scheduler-warmup-steps", str(args.warmup_steps),
        "--epochs", str(epochs), "--max-steps", str(args.steps), "--save-path", str(work / "run"),
        "--log-dir", str(work / "logs"), "--log-freq", str(max(1, args.steps // 20)), "--seed", str(args.seed),
        "--no-resume-from-checkpoint",
    ]
    if args.loss_decay is not None:
        argv_s += ["--ttt-step-loss-decay", repr(args.loss_decay)]
    if args.arch == "plain":
        argv_s += ["--no-norm-before-residual", "--no-norm-before-fc", "--no-norm-output"]
    # full attention for the one layer: its default sliding window (2048) never binds on these conversations, so
    # training is the same, and the export then says what eval (and every engine) runs
    argv_s += ["--full-attention-indices", "0"]
    if (work / "run").is_dir():   # an interrupted earlier run: start clean (its epoch dirs would be reused)
        import shutil
        shutil.rmtree(work / "run")
    wall0 = time.perf_counter()
    speculators_main(TrainConfig.resolve(argv_s))
    wall = time.perf_counter() - wall0
    epochs_done = sorted(int(p.name) for p in (work / "run").iterdir() if p.is_dir() and p.name.isdigit())
    export_dir = work / "run" / str(epochs_done[-1])
    state_file = export_dir / "training_state.json"
    steps_done = json.loads(state_file.read_text()).get("global_step") if state_file.is_file() else None
    out = {
        "trainer": "speculators", "version": __import__("speculators.version", fromlist=["version"]).version,
        "export_dir": str(export_dir), "conversations": n_conv, "steps": steps_done, "epochs": epochs,
        "wall_s": round(wall, 2),
        "median_step_s": median_gap(stamps),
        "settings": {"total_seq_len": args.total_seq_len, "lr": args.lr, "warmup_steps": args.warmup_steps,
                     "schedule": args.schedule, "optimizer": args.optimizer, "arch": args.arch,
                     "loss_decay": 1.0 if args.loss_decay is None else args.loss_decay,
                     "train_data_ratio": ratio, "argv": argv_s},
    }
    if args.json:
        real_stdout.write(json.dumps(out) + "\n")
    else:
        print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
