"""Stage `train`: train an EAGLE-3 (or DFlash: --draft-arch dflash) draft from teacher shards, never loading the
target.

    eagle-pipe train --teacher-dir DUMP --out RUN [--max-steps N] ...
    torchrun --nproc_per_node G -m stages.cli train ...     (one process per GPU; see stages/train/setup.py)

Per optimizer step: `grad_accum` packed micro-batches per rank (stages/train/loader.py) -> the compiled step
(TTT forward + loss + metrics, `torch.compile(fullgraph=True)`, bf16 autocast, fp32 master weights) ->
backward -> one gradient all-reduce -> clip -> fused AdamW. A DFlash draft runs the same loop with its own step
(eagle/dflash.py: anchor blocks sampled by the loader, per-slot metrics in place of per-TTT-step ones), through
the drafter interface (stages/train/drafters.py). The loss is normalised by the number of supervised
positions of the whole global batch (counted on the host, summed over ranks and micro-batches), so any split
over ranks and accumulation computes the same update as one big batch. A non-finite loss or gradient skips the
update on the device (AdamW's `found_inf`, no host sync); metrics stay on the device and reach the host once per
`--log-every` steps, when too many skipped steps in a row stop the run.

`train(settings)` reads as its phases: check_inputs -> build_model -> build_data -> build_optimization ->
resume -> run_loop -> finish, each a function of the typed `TrainSettings` (stages/train/settings.py); what
differs between drafters (model, loss, loader anchors, resume keys, export) is behind the drafter interface of
stages/train/drafters.py, so the phases have no per-architecture branch.

Writes RUN/checkpoints/ (stages/train/checkpoint.py), RUN/metrics.jsonl, RUN/tensorboard/ (when installed),
RUN/export/ (the serving layout) and, last, RUN/train_summary.json: `eagle-pipe run`'s completion marker.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np
import nvtx
import torch

from stages.train import checkpoint as ckpt
from stages.errors import StageError
from stages.options import click_options
from stages.shards import atomic_write_json, read_json
from stages.train.loader import DumpIndex, PackedLoader
from stages.train.drafters import Eagle3Drafter, drafter_for
from stages.train.settings import TrainSettings
from stages.train.setup import (DistInfo, GradSync, WarmupCosine, all_reduce_sum, barrier, broadcast_ok,
                                check_dumps, init_distributed, make_optimizer, resolve_precision, run_length_warning,
                                token_counts)

# settings a resumed run must share with the checkpoint (they change the data order or the model); each drafter
# adds its own (drafter.fixed_settings), and the draft config is compared whole before loading
RESUME_FIXED = ("seq_len", "batch_size", "grad_accum", "seed", "ttt_steps", "long_sequences", "eval_fraction",
                "world_size", "draft_arch")


def compile_step(loss, teacher_kind: str, device: torch.device, compile_: bool, precision: str = "auto"):
    """A drafter's forward + loss + metrics (`loss(model, batch, normalizer, teacher_kind)`, drafters.py) as one
    function of (model, batch, normalizer). FP8 aux states are dequantized first, inside the same graph: the host
    only ever moves the stored bytes. Matmuls run in bf16 autocast when `precision` resolves to bf16
    (stages/train/setup.py: resolve_precision), weights stay fp32."""
    from stages.shards.aux import dequantize_batch

    autocast = resolve_precision(precision, device)[0] == "bf16"

    def step_fn(model, batch, normalizer):
        batch = dequantize_batch(batch)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            return loss(model, batch, normalizer, teacher_kind)

    return torch.compile(step_fn, fullgraph=True) if compile_ else step_fn


def make_step_fn(steps: int, teacher_kind: str, decay: float, attention: str, device: torch.device, compile_: bool,
                 precision: str = "auto"):
    """The EAGLE-3 step (TTT forward + loss + metrics over `steps` steps) as `compile_step` makes it (the
    benchmarks' and tests' entry point)."""
    drafter = Eagle3Drafter(draft_arch="eagle3", draft_vocab_size=0, ttt_steps=steps, decay=decay, attention=attention,
                            init_lm_head=False, draft_rope="auto", seed=0)  # only its loss is used
    return compile_step(drafter.loss, teacher_kind, device, compile_, precision)


def to_device(batch: dict, device: torch.device, float_dtype: torch.dtype | None) -> dict:
    """The host batch on the device; floats cast to `float_dtype` (CPU: float32). FP8 aux states go as their
    stored bytes (viewed as uint8: stages/shards/aux.py) and only the step dequantizes them, with their scales."""
    from stages.shards.aux import device_view

    out = {}
    for k, v in batch.items():
        v = device_view(v).to(device, non_blocking=True)
        out[k] = v.to(float_dtype) if float_dtype is not None and v.is_floating_point() else v
    return out


class Metrics:
    """Device-side sums between log intervals; `flush()` is the one host sync."""

    def __init__(self, steps: int, device: torch.device):
        self.steps, self.device = steps, device
        z = lambda *s: torch.zeros(*s, device=device)  # noqa: E731
        self.sums, self.loss, self.good = z(3, steps), z(()), z(())
        self.bad_total, self.bad_run, self.bad_run_max = z(()), z(()), z(())
        self.interval_steps, self.positions, self.t0 = 0, 0, time.perf_counter()

    def add_micro(self, m: dict) -> None:
        self.sums += torch.stack([m["ce_sum"].detach(), m["correct"].detach(), m["valid"].detach()]).float()

    def add_step(self, loss: torch.Tensor, bad: torch.Tensor, positions: int) -> None:
        self.loss += torch.where(bad, torch.zeros_like(loss), loss.detach().float())
        self.good += (~bad).float()
        self.bad_total += bad.float()
        self.bad_run = (self.bad_run + 1) * bad.float()
        self.bad_run_max = torch.maximum(self.bad_run_max, self.bad_run)
        self.interval_steps += 1
        self.positions += positions

    def flush(self, info) -> dict:
        from eagle.loss import simulated_acceptance_length

        sums = all_reduce_sum(self.sums, info)  # ranks' ce/correct/valid (the loss is already global)
        acc = sums[1] / sums[2].clamp_min(1)
        packed = torch.cat([sums.flatten(), acc, simulated_acceptance_length(acc).reshape(1),
                            torch.stack([self.loss, self.good, self.bad_total, self.bad_run_max])]).tolist()
        k = self.steps
        ce_sum, _, valid = packed[:k], packed[k:2 * k], packed[2 * k:3 * k]
        acc_l, al, (loss, good, bad_total, bad_run_max) = packed[3 * k:4 * k], packed[4 * k], packed[4 * k + 1:]
        elapsed = time.perf_counter() - self.t0
        out = {"loss": loss / good if good else float("nan"), "ce": [c / max(v, 1) for c, v in zip(ce_sum, valid)],
               "acc": acc_l, "acceptance_length": al, "skipped_steps": int(bad_total),
               "max_skipped_in_a_row": int(bad_run_max),
               "tokens_per_s": self.positions / elapsed if elapsed > 0 else 0.0}
        self.sums.zero_(), self.loss.zero_(), self.good.zero_(), self.bad_run_max.copy_(self.bad_run)
        self.interval_steps, self.positions, self.t0 = 0, 0, time.perf_counter()
        return out


def optimizer_step(model, opt, params, step_fn, batches, normalizer, sync, grad_clip: float, lr: float,
                   on_micro=None) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step over this rank's micro-batches: forward+loss (compiled), backward, gradient
    all-reduce, clip, fused AdamW. Returns device tensors (global loss, bad) without a host sync; when `bad`
    (non-finite loss or gradient) the update is skipped on the device."""
    opt.zero_grad(set_to_none=False)
    loss = torch.zeros((), device=params[0].device)
    for batch in batches:
        with nvtx.annotate("forward"):
            micro_loss, m = step_fn(model, batch, normalizer)
        with nvtx.annotate("backward"):
            micro_loss.backward()
        loss += micro_loss.detach()
        if on_micro is not None:
            on_micro(m)
    with nvtx.annotate("optimizer"):
        loss = sync(loss)
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip, foreach=True)
        bad = ~(torch.isfinite(norm) & torch.isfinite(loss))
        opt.found_inf = bad.float()  # fused AdamW skips the whole update (and its step count) on the device
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
    return loss, bad


def evaluate(model, loader: PackedLoader, step_fn, info, float_dtype) -> dict:
    """Held-out per-step accuracy and simulated acceptance length (all ranks; sums all-reduced).

    It runs the training step's own compiled graph, grad mode on and no backward: under `torch.no_grad()` the
    compiled step would be traced and compiled a second time (an inference graph), which costs a compilation
    per run and, on an H200 with torch 2.11, crashed in that graph's autotuning (illegal memory access)."""
    from eagle.loss import simulated_acceptance_length

    sums = torch.zeros(3, loader.steps, device=info.device)
    ones = torch.ones(loader.steps, device=info.device)
    loader.load_state_dict({"epoch": 0, "step": 0})
    for micro in loader:
        for batch, _ in micro:
            m = step_fn(model, to_device(batch, info.device, float_dtype), ones)[1]
            sums += torch.stack([m["ce_sum"], m["correct"], m["valid"]]).detach().float()
            del m  # frees this batch's autograd graph before the next forward
    sums = all_reduce_sum(sums, info)
    acc = sums[1] / sums[2].clamp_min(1)
    al = simulated_acceptance_length(acc)
    return {"eval_ce": (sums[0] / sums[2].clamp_min(1)).tolist(), "eval_acc": acc.tolist(),
            "eval_acceptance_length": float(al), "eval_positions": int(sums[2, 0])}


class RunLog:
    """metrics.jsonl (+ TensorBoard when importable), written by rank 0."""

    def __init__(self, run: Path, resume_step: int, enabled: bool):
        self.enabled, self.path, self.tb = enabled, run / "metrics.jsonl", None
        if not enabled:
            return
        if self.path.exists():  # drop records past the checkpoint we resume from (they will be redone)
            keep = [ln for ln in self.path.read_text().splitlines() if ln.strip() and
                    json.loads(ln).get("step", 0) <= resume_step]
            self.path.write_text("".join(ln + "\n" for ln in keep))
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(run / "tensorboard"))
        except Exception:  # noqa: BLE001 - tensorboard is optional
            self.tb = None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.tb.add_scalar(key, value, record["step"])
                elif isinstance(value, list):
                    for j, v in enumerate(value):
                        self.tb.add_scalar(f"{key}/step{j}", v, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


@dataclass
class TrainData:
    """The dump, its held-out split, the packed loaders (no eval loader when nothing is held out), the length."""

    index: DumpIndex
    train_ids: np.ndarray
    eval_ids: np.ndarray
    loader: PackedLoader
    eval_loader: PackedLoader | None
    steps_per_epoch: int
    total_steps: int


@dataclass
class Optimization:
    """Fused AdamW over the trainable parameters, the lr schedule and the cross-rank gradient sum."""

    opt: torch.optim.Optimizer
    params: list[torch.Tensor]
    names: dict[int, str]
    schedule: WarmupCosine
    sync: GradSync


@dataclass
class TrainState:
    """What the loop advances and checkpoints besides weights, optimizer and data position."""

    step: int = 0
    best: float | None = None
    """Best held-out simulated acceptance length so far (RUN/checkpoints/best/)."""
    last_log: dict = field(default_factory=dict)
    final_eval: dict = field(default_factory=dict)


def train(s: TrainSettings) -> dict:
    """The `train` command's work, phase by phase; returns the summary dict (also RUN/train_summary.json)."""
    wall0 = time.time()
    info = init_distributed(s.device)
    latest = check_inputs(s, info)
    index = DumpIndex(Path(s.teacher_dir))
    drafter = drafter_for(s)
    model = build_model(s, drafter, index, info)
    data = build_data(s, drafter, index, model, info)
    optim = build_optimization(s, model, data, info)
    warn_if_too_short(s, data, optim, info)
    state = resume(s, drafter, info, latest, model, optim, data)
    run_loop(s, drafter, info, model, optim, data, state)
    return finish(s, drafter, info, model, state, wall0)


def check_inputs(s: TrainSettings, info: DistInfo) -> Path | None:
    """Refuse a used run dir or a bad dump before anything else (rank 0 checksums; the others wait).
    Returns the newest complete checkpoint in RUN (None when there is none)."""
    run = Path(s.out)
    latest = ckpt.latest_checkpoint(run / "checkpoints")
    ok, error = True, None
    if info.is_main:
        try:
            if not s.resume and (latest is not None or (run / "train_summary.json").exists()):
                raise StageError(f"{run}: holds a training run already; pass --resume to continue it or choose "
                                 "a new --out")
            check_dumps(Path(s.teacher_dir), _eval_dir(s))
        except StageError as e:
            ok, error = False, e
    if not broadcast_ok(info, ok):
        raise error or StageError(f"rank {info.rank}: rank 0 refused the teacher dump (see its message)")
    return latest


def build_model(s: TrainSettings, drafter, index: DumpIndex, info: DistInfo):
    """The draft from the dump alone, on the device; rank 0 says which RoPE it took and why."""
    from eagle.config import choose_draft_rope

    teacher_dir = Path(s.teacher_dir)
    model = drafter.build(teacher_dir, index.manifest, token_counts(index)).to(info.device)
    if info.is_main:
        rope = choose_draft_rope(read_json(teacher_dir / "target" / "config.json"), s.draft_rope)
        click.echo(f"train: draft RoPE: {rope.reason}", err=True)
        click.echo(f"train: draft architecture: {drafter.note(model.cfg)}", err=True)
        precision, why = resolve_precision(s.precision, info.device)
        click.echo(f"train: precision {precision}{' autocast, fp32 weights' if precision == 'bf16' else ''} ({why})",
                   err=True)
    return model


def build_data(s: TrainSettings, drafter, index: DumpIndex, model, info: DistInfo) -> TrainData:
    """Held-out split (whole documents, or the separate eval dump), packed loaders, and the number of steps."""
    eval_dir = _eval_dir(s)
    if eval_dir is not None:
        train_ids, eval_index = np.arange(index.num_documents), DumpIndex(eval_dir)
        eval_ids = np.arange(eval_index.num_documents)
    else:
        train_ids, eval_ids = index.split(s.eval_fraction, s.seed)
        eval_index = index
    common = dict(seq_len=s.seq_len, batch_size=s.batch_size, steps=drafter.metric_steps, t2d=model.t2d.cpu(),
                  rank=info.rank, world_size=info.world_size, seed=s.seed, long_sequences=s.long_sequences,
                  pin=info.device.type == "cuda", num_workers=s.num_workers, anchors=drafter.anchors())
    loader = PackedLoader(index, train_ids, grad_accum=s.grad_accum, reuse_buffers=True, **common)
    eval_loader = PackedLoader(eval_index, eval_ids, shuffle=False, drop_last=False, **common) \
        if len(eval_ids) else None
    steps_per_epoch = loader.steps_per_epoch()
    if steps_per_epoch == 0:
        raise StageError(f"{s.teacher_dir}: packs into {len(loader.rows(0))} rows of {s.seq_len} positions; one "
                         f"optimizer step needs {loader.rows_per_step} (batch x ranks x grad-accum); lower them")
    total = s.max_steps if s.max_steps and not s.epochs else steps_per_epoch * (s.epochs or 1)
    if s.max_steps and s.epochs:
        total = min(total, s.max_steps)
    return TrainData(index, train_ids, eval_ids, loader, eval_loader, steps_per_epoch, total)


def build_optimization(s: TrainSettings, model, data: TrainData, info: DistInfo) -> Optimization:
    opt, params, names = make_optimizer(model, s.lr, s.weight_decay, info.device)
    schedule = WarmupCosine(s.lr, s.warmup_steps, data.total_steps, s.min_lr_ratio)
    return Optimization(opt, params, names, schedule, GradSync(params, info))


def warn_if_too_short(s: TrainSettings, data: TrainData, optim: Optimization, info: DistInfo) -> None:
    """Rank 0 says in one line when the run cannot give a useful draft (stages/train/setup.py says when)."""
    positions = data.loader.chunks.report()["positions"] * data.total_steps / data.steps_per_epoch
    warning = run_length_warning(data.total_steps, s.warmup_steps, int(positions),
                                 sum(p.numel() for p in optim.params))
    if warning and info.is_main:
        click.echo(f"train: {warning}", err=True)


def resume(s: TrainSettings, drafter, info: DistInfo, latest: Path | None, model, optim: Optimization,
           data: TrainData) -> TrainState:
    """With --resume and a checkpoint: restore weights, optimizer, RNG and data position, refusing settings
    that would change the data order or the draft. Otherwise every rank starts from rank 0's weights."""
    state = TrainState()
    if not (s.resume and latest is not None):
        optim.sync.broadcast_params()
        return state
    settings = s.record(info.world_size)
    recorded = ckpt.read_meta(latest)["settings"]
    if "draft_arch" not in recorded:
        raise StageError(f"{latest}: written by an older eagle-pipe (no draft_arch in its settings); retrain with "
                         "this version, or export it with the eagle-pipe that trained it")
    # checked before loading: another draft_arch or draft config has other parameters
    recorded = {k: recorded.get(k) for k in RESUME_FIXED} | drafter.fixed_settings(recorded)
    settings = {k: settings.get(k) for k in RESUME_FIXED} | drafter.fixed_settings(settings)
    for key in recorded:
        if recorded[key] != settings[key]:
            raise StageError(f"{latest}: was trained with {key}={recorded[key]!r}, now "
                             f"{settings[key]!r}; resume with the same value or start a new --out")
    trained, now = drafter.trained_config(ckpt.read_meta(latest).get("draft_config") or {}), model.cfg.to_dict()
    changed = sorted(k for k in now.keys() | trained.keys() if trained.get(k) != now.get(k))
    if changed:  # e.g. another --draft-rope: the same weights would be rotated differently
        was, is_ = (", ".join(f"{k}={d.get(k)!r}" for k in changed) for d in (trained, now))
        raise StageError(f"{latest}: was trained as a different draft ({was}), now {is_}; resume with the same "
                         "settings or start a new --out")
    meta = ckpt.load_checkpoint(latest, model=model, optimizer=optim.opt, param_names=optim.names)
    state.step, state.best = meta["step"], meta.get("best_eval_acceptance_length")
    data.loader.load_state_dict(meta["loader"])
    return state


def run_loop(s: TrainSettings, drafter, info: DistInfo, model, optim: Optimization, data: TrainData,
             state: TrainState) -> None:
    """Optimizer steps up to the total; logs, evaluates and checkpoints on schedule, and stops (with a checkpoint
    of the last finite weights) after --max-bad-steps skipped steps in a row."""
    run, ckpt_root, total = Path(s.out), Path(s.out) / "checkpoints", data.total_steps
    if info.is_main:
        run.mkdir(parents=True, exist_ok=True)
    barrier(info)
    log = RunLog(run, state.step, info.is_main)
    float_dtype = None if info.device.type == "cuda" else torch.float32
    step_fn = compile_step(drafter.loss, data.index.teacher_kind, info.device, s.compile, s.precision)
    metrics = Metrics(drafter.metric_steps, info.device)
    positions_per_step = data.loader.rows_per_step * s.seq_len
    save = _checkpoint_writer(s, info, model, optim, data, state)
    if info.is_main:
        click.echo(f"train: {data.index.num_documents} documents ({len(data.train_ids)} train, "
                   f"{len(data.eval_ids)} held out), {data.loader.chunks.report()}, {data.steps_per_epoch} "
                   f"steps/epoch, {total} steps, {info.world_size} rank(s) on {info.device}", err=True)
    bar = _progress(total, state.step, info.is_main)
    model.train()
    while state.step < total:
        for micro in data.loader:
            with nvtx.annotate("data"):
                normalizer = all_reduce_sum(sum(c for _, c in micro).to(info.device), info)
                batches = [to_device(b, info.device, float_dtype) for b, _ in micro]
            loss, bad = optimizer_step(model, optim.opt, optim.params, step_fn, batches, normalizer, optim.sync,
                                       s.grad_clip, optim.schedule(state.step), on_micro=metrics.add_micro)
            metrics.add_step(loss, bad, positions_per_step)
            state.step += 1
            step = state.step
            bar.update(1)
            if _due(step, s.log_every, total):
                state.last_log = {"step": step, "epoch": data.loader.epoch, "lr": optim.schedule(step - 1)} \
                    | metrics.flush(info)
                last_log = state.last_log
                log.write(last_log)
                bar.set_postfix(loss=f"{last_log['loss']:.3f}", acc=",".join(f"{a:.2f}" for a in last_log["acc"]),
                                al=f"{last_log['acceptance_length']:.2f}", tok_s=f"{last_log['tokens_per_s']:.0f}")
                if last_log["max_skipped_in_a_row"] >= s.max_bad_steps:
                    save(ckpt.step_name(step))
                    raise StageError(f"{run}: {last_log['max_skipped_in_a_row']} steps in a row had a non-finite "
                                     f"loss or gradient (updates skipped); stopped. The weights in "
                                     f"{ckpt_root / ckpt.step_name(step)} are the last finite ones; lower --lr "
                                     "or check the dump")
            if data.eval_loader is not None and _due(step, s.eval_every, total):
                last_eval = evaluate(model, data.eval_loader, step_fn, info, float_dtype) | {"step": step}
                log.write(last_eval)
                if state.best is None or last_eval["eval_acceptance_length"] > state.best:
                    state.best = last_eval["eval_acceptance_length"]
                    save("best", {"eval": last_eval})
                state.final_eval = last_eval
            if _due(step, s.save_every, total):
                save(ckpt.step_name(step))
            if step >= total:
                break
    bar.close()
    log.close()


def finish(s: TrainSettings, drafter, info: DistInfo, model, state: TrainState, wall0: float) -> dict:
    """Export the final draft, then write RUN/train_summary.json last (`eagle-pipe run`'s completion marker)."""
    run = Path(s.out)
    summary = {"settings": s.record(info.world_size), "steps": state.step, "final_metrics": state.last_log,
               "final_eval": state.final_eval, "best_eval_acceptance_length": state.best,
               "checkpoint": str(run / "checkpoints" / ckpt.step_name(state.step)),
               "export_dir": str(run / "export"), "wall_time_s": time.time() - wall0}
    if info.is_main:
        drafter.export(model, run / "export")
        atomic_write_json(run / "train_summary.json", summary)
        click.echo(f"train: {state.step} steps; loss {state.last_log.get('loss', float('nan')):.4f}; held-out "
                   f"acceptance length {state.final_eval.get('eval_acceptance_length', float('nan')):.3f}; "
                   f"exported to {run / 'export'}", err=True)
    barrier(info)
    return summary


def _checkpoint_writer(s: TrainSettings, info: DistInfo, model, optim: Optimization, data: TrainData,
                       state: TrainState):
    """save(name, extra=None): rank 0 writes RUN/checkpoints/NAME (pruning old step checkpoints); all wait."""
    root = Path(s.out) / "checkpoints"
    settings = s.record(info.world_size)

    def save(name: str, extra: dict | None = None) -> None:
        if info.is_main:
            meta = {"step": state.step, "settings": settings, "draft_config": model.cfg.to_dict(),
                    "loader": data.loader.state_dict(),
                    "scheduler": optim.schedule.state_dict() | {"step": state.step},
                    "best_eval_acceptance_length": state.best, "teacher_dir": str(Path(s.teacher_dir)),
                    **(extra or {})}
            ckpt.save_checkpoint(root, name, model=model, optimizer=optim.opt, param_names=optim.names, meta=meta)
            if name.startswith("step-"):
                ckpt.prune_checkpoints(root, s.keep_checkpoints)
        barrier(info)

    return save


def _eval_dir(s: TrainSettings) -> Path | None:
    return Path(s.eval_teacher_dir) if s.eval_teacher_dir else None


def _due(step: int, every: int, total: int) -> bool:
    """Every `every` steps (0: never) and at the last step."""
    return step == total or (every > 0 and step % every == 0)


def _progress(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="train", unit="step", dynamic_ncols=True)


@click.command("train")
@click_options(TrainSettings)
def command(**settings) -> dict:
    """Train an EAGLE-3 (or, --draft-arch dflash, DFlash) draft from a teacher dump, without loading the target."""
    return train(TrainSettings(**settings))
