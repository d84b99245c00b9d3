"""Training in three layers: train_step (one optimizer step, the unit a CUDA graph captures; session.py, with the
session it steps) -> train_one_epoch -> fit (open the run, loop epochs, close the run); plus evaluate.

The hot path (one step, ~20,000 per worksheet run) does no host sync: the per-step loss and correct count go into
device buffers, the LR comes from a device-side schedule, and the host reads the buffers once per epoch and at
the monitor's sample steps. Everything that is written, logged or printed happens between epochs (run.py).
"""

from __future__ import annotations

import time
from typing import Callable

import torch
import torch.nn.functional as F

from fastcifar import TrainingDiverged
from fastcifar import distributed as dist
from fastcifar.config import Resolved, TrainConfig
from fastcifar.data.plan import IGNORE_LABEL, EvalLoader
from fastcifar.profiling import StepProfiler
from fastcifar.run import TrainingRun
from fastcifar.session import Session, autocast, build_session, reset_session, sync_device, train_step

__all__ = ["Session", "TrainingDiverged", "build_session", "evaluate", "fit", "reset_session", "run_epochs",
           "train_one_epoch", "train_step"]


def _check_finite(s: Session, upto: int, epoch: int) -> None:
    """One sync: raise if any of the first `upto` step losses of this epoch is NaN/Inf, naming the step. Under DDP
    every rank raises when any one does (each sees only its own losses; the others would wait forever)."""
    bad = (~torch.isfinite(s.step_losses[:upto])).nonzero()
    if dist.any_rank(len(bad) > 0, s.info, s.res.device):
        where = (f"epoch {epoch} step {int(bad[0])} (global step {epoch * len(s.train_loader) + int(bad[0])})"
                 if len(bad) else f"epoch {epoch} on another process")
        raise TrainingDiverged(f"non-finite training loss at {where}: training stopped.")


def _take_sample(s: Session, epoch: int, step: int, global_step: int, flags: dict) -> dict:
    sample = s.monitor.read_sample()  # the sample's one sync
    _check_finite(s, step + 1, epoch)
    found = s.monitor.flag_layers(sample["norm"], zero_by_design=global_step == 0 and s.cfg.zero_init_residual)
    # under fp16 the scaler skips inf steps by design; the gradients are all-reduced, so every rank agrees
    if found["nonfinite"] and not s.res.grad_scaler:
        raise TrainingDiverged(f"non-finite gradient at epoch {epoch} step {step} (global step {global_step}) in "
                               f"{', '.join(found['nonfinite'][:5])}: training stopped.")
    for kind in flags:
        flags[kind].update(found[kind])
    return {"step": global_step, "lr": s.schedule.lr_at([global_step])[0], **sample}


def train_one_epoch(s: Session, epoch: int, progress=None) -> dict | None:
    """One epoch of steps. Returns the epoch's training numbers, its monitor samples and per-step losses; None
    when a stop was requested and the unfinished epoch was abandoned."""
    loader = s.train_loader
    s.model.train()
    loader.set_epoch(epoch)
    steps = len(loader)
    s.step_index.zero_()
    flags = {"vanishing": set(), "exploding": set()}
    samples = []
    if s.monitor:
        s.monitor.start_epoch()
    warming, compile_s = not s.stepper.ready, 0.0
    if warming:  # the first steps of a process compile (and capture): timed apart as compile_s
        s.sync()
        warm_start = time.perf_counter()
    for step, (images, labels) in enumerate(loader):
        monitored = s.monitor is not None and s.monitor.should_sample(epoch, step)
        s.stepper(images, labels, monitored)
        if s.profiler is not None:
            s.profiler.after_step(s.stepper.ready)
        if warming and s.stepper.ready:
            s.sync()
            compile_s, warming = time.perf_counter() - warm_start, False
        if monitored:
            samples.append(_take_sample(s, epoch, step, epoch * steps + step, flags))
        if progress is not None:
            progress.update(len(labels))
        if s.stop_requested():
            return None
    if progress is not None:
        progress.close()

    if s.profiler is not None:
        s.profiler.end_epoch()
    if warming:  # an epoch shorter than the warm-up: all of it was warm-up
        s.sync()
        compile_s = time.perf_counter() - warm_start
    _check_finite(s, steps, epoch)
    totals = torch.stack([s.step_losses.sum() * loader.batch_size, s.step_correct.sum().to(s.step_losses.dtype)])
    totals = dist.all_reduce_sum(totals, s.info).tolist()
    seen = steps * loader.batch_size * s.info.world_size
    step_losses = s.step_losses  # this rank's; under DDP the mean over ranks is the global batch's loss
    if s.info.enabled:
        step_losses = dist.all_reduce_sum(step_losses.clone(), s.info) / s.info.world_size
    order = {name: i for i, name in enumerate(s.monitor.layer_names)} if s.monitor else {}
    return {"train_loss": totals[0] / seen, "train_acc": totals[1] / seen, "train_images": seen,
            "flags": {k: sorted(v, key=order.get) for k, v in flags.items()}, "compile_s": compile_s,
            "samples": samples, "step_losses": step_losses.tolist(),
            "update_ratio_epoch": s.monitor.end_epoch() if s.monitor else None}


def evaluate(s: Session) -> dict:
    """Loss and accuracy over the test set (the EMA weights with --ema), with flip TTA too when --tta flip, and
    over the validation set as val_* under --val-split. The first call of a compiled model is timed apart as
    compile_s."""
    result = evaluate_model(s.eval_model, s.eval_loader, s.res, s.cfg.tta, s.info,
                            time_first_batch=s.res.compile and not s.eval_warmed)
    s.eval_warmed = True
    if s.val_loader is not None:
        val = evaluate_model(s.eval_model, s.val_loader, s.res, s.cfg.tta, s.info)
        result.update({k.replace("test_", "val_"): v for k, v in val.items() if k != "compile_s"})
    return result


@torch.no_grad()
def evaluate_model(model, loader: EvalLoader, res: Resolved, tta: str, info: dist.DistInfo,
                   time_first_batch: bool = False) -> dict:
    """With tta="flip" also the loss and accuracy of the average of the logits of each image and its mirror."""
    model.eval()
    device, flip = res.device, tta == "flip"
    memory_format = torch.channels_last if res.channels_last else torch.contiguous_format
    sums = torch.zeros(5, device=device, dtype=torch.float64)  # loss, correct, loss tta, correct tta, count
    sums[4] = loader.num_images
    compile_s = 0.0
    if time_first_batch:
        sync_device(device)
        start = time.perf_counter()
    for images, labels in loader:
        with autocast(res):
            logits = model(images).float()
            if flip:
                mirrored = model(images.flip(3).contiguous(memory_format=memory_format)).float()
        for k, out in enumerate([logits, (logits + mirrored) / 2] if flip else [logits]):
            sums[2 * k] += F.cross_entropy(out, labels, ignore_index=IGNORE_LABEL, reduction="sum")
            sums[2 * k + 1] += (out.argmax(1) == labels).sum()  # padded rows have label -100: never correct
        if time_first_batch:
            sync_device(device)
            compile_s, time_first_batch = time.perf_counter() - start, False
    loss, correct, loss_tta, correct_tta, count = dist.all_reduce_sum(sums, info).tolist()
    result = {"test_loss": loss / count, "test_acc": correct / count, "compile_s": compile_s}
    if flip:
        result.update(test_loss_tta=loss_tta / count, test_acc_tta=correct_tta / count)
    return result


def fit(cfg: TrainConfig, *, resume_dir=None, init_from=None, stop_after_epoch: int | None = None,
        loss_fn: Callable | None = None, profile: int | None = None, resume_if_exists: bool = False) -> dict:
    """Train per `cfg`, continue the run in `resume_dir`, or start from the weights of `init_from`; returns the
    summary (rank 0; {} on the others). Nothing is written until every check has passed. `profile`: profile that
    many steps after the warm-up into RUN_DIR/profile/ (profiling.py; rank 0). `resume_if_exists`: continue from
    cfg.run_dir's last.pt when it has one (the same command, restarted), else start there."""
    info = dist.setup(cfg.device, cfg.dist_timeout)
    try:
        with TrainingRun.open(cfg, info, resume_dir=resume_dir, init_from=init_from,
                              stop_after_epoch=stop_after_epoch, resume_if_exists=resume_if_exists) as run:
            info.doing = "building the model (DDP copies rank 0's weights to every process)"
            s = build_session(run.cfg, info, run.dataset, run.res, loss_fn=loss_fn, notice=run.notice)
            run.start(s)  # run directory and lock, restored state, header, W&B
            if profile and info.is_main:
                s.profiler = StepProfiler(run.dir.path / "profile", profile, run.res.device, notice=run.notice,
                                          describe=f"batch {cfg.batch_size}, {run.active}")
            run_epochs(run, s)
            info.doing = "finishing the run"
            return run.close(s)
    except (RuntimeError, dist.dist.DistError) as exc:
        failure = dist.collective_failure(exc, info)
        if failure is None:
            raise
        raise failure from None
    finally:
        dist.cleanup(info)


def run_epochs(run: TrainingRun, s: Session) -> None:
    """The epoch loop of a started run, until its last epoch, a signal, --target-acc or --stop-after-epoch."""
    for epoch in run.epochs():
        clock = run.clock()
        s.info.doing = f"training epoch {epoch}"  # what a --dist-timeout message says this rank was doing
        train = train_one_epoch(s, epoch, run.progress(epoch))
        if train is None:
            break  # stopped by a signal: the unfinished epoch is abandoned
        clock.lap("train")
        s.info.doing = f"evaluating epoch {epoch}"
        test = evaluate(s)
        clock.lap("eval")
        if run.end_epoch(s, epoch, train, test, clock):
            break  # a signal, --target-acc or --stop-after-epoch: this epoch is saved
