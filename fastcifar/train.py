"""Training in three layers: train_step (one optimizer step, the unit a CUDA graph captures) -> train_one_epoch ->
fit (open the run, loop epochs, close the run); plus evaluate and build_session.

The hot path (one step, ~20,000 per worksheet run) does no host sync: the per-step loss and correct count go into
device buffers, the LR comes from a device-side schedule, and the host reads the buffers once per epoch and at
the monitor's sample steps. Everything that is written, logged or printed happens between epochs (run.py).
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from fastcifar import FastCifarError, TrainingDiverged
from fastcifar import distributed as dist
from fastcifar.config import Resolved, TrainConfig
from fastcifar.cuda_graphs import EagerStep, GraphedStep
from fastcifar.data.augment import parse_augment
from fastcifar.data.cifar import Dataset
from fastcifar.data.loaders import make_eval_loader, make_train_loader
from fastcifar.data.plan import IGNORE_LABEL, EvalLoader, LimitedEvalLoader, LimitedTrainLoader, TrainLoader
from fastcifar.model import resnet18_cifar
from fastcifar.monitor import LayerMonitor
from fastcifar.optim import LRSchedule, WeightEMA, build_optimizer
from fastcifar.profiling import StepProfiler
from fastcifar.run import TrainingRun
from fastcifar.sync_bn import convert_sync_batchnorm


__all__ = ["Session", "TrainingDiverged", "build_session", "evaluate", "fit", "reset_session", "run_epochs",
           "train_one_epoch", "train_step"]


@dataclass
class Session:
    """Everything a run trains with; built once by build_session()."""

    cfg: TrainConfig
    res: Resolved
    info: dist.DistInfo
    model: torch.nn.Module  # the eager module: state_dicts, monitoring, FLOPs
    step_model: torch.nn.Module  # what the step calls: DDP and/or torch.compile around `model`
    eval_model: torch.nn.Module  # what evaluation calls: compiled `model`, or the EMA copy
    optimizer: torch.optim.Optimizer
    schedule: LRSchedule
    scaler: torch.amp.GradScaler
    ema: WeightEMA | None
    train_loader: TrainLoader
    eval_loader: EvalLoader
    monitor: LayerMonitor | None
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    step_losses: torch.Tensor  # (steps,) this epoch's training losses, written on the device by each step
    step_correct: torch.Tensor  # (steps,) correct predictions per step
    step_index: torch.Tensor  # () the step of the epoch, on the device: where the step writes
    stepper: EagerStep | GraphedStep | None = None
    stop_requested: Callable[[], bool] = lambda: False  # set by the run: a signal asked to stop at a step boundary
    profiler: StepProfiler | None = None  # --profile: called after every step until it has written its files
    eval_warmed: bool = field(default=False)  # evaluated once: a compiled eval model has compiled
    dataset: Dataset | None = None  # what the loaders hold
    val_loader: EvalLoader | None = None  # --val-split: the held-out training images, evaluated like the test set

    def autocast(self):
        return autocast(self.res)

    def sync(self):
        _sync(self.res.device)


def build_session(cfg: TrainConfig, info: dist.DistInfo, ds: Dataset, res: Resolved, *,
                  loss_fn: Callable | None = None, notice: Callable[[str], None] = print) -> Session:
    """The model, loaders, optimizer, schedule and step for `cfg` on `res.device`. `loss_fn(logits, labels)`
    replaces the cross-entropy (tests and experiments)."""
    torch.manual_seed(cfg.seed)
    if res.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: autotune each conv once
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    memory_format = torch.channels_last if res.channels_last else torch.contiguous_format
    model = resnet18_cifar(num_classes=len(ds.classes), zero_init_residual=cfg.zero_init_residual)
    if cfg.sync_bn and info.enabled:
        model = convert_sync_batchnorm(model, res.device)
    model = model.to(res.device, memory_format=memory_format)
    step_model = model
    if info.enabled:
        step_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[res.device.index] if res.device.type == "cuda" else None)
    train_loader, eval_loader, val_loader = _make_loaders(cfg, ds, res, info, notice)
    steps = len(train_loader)
    optimizer = build_optimizer(cfg, model, res.device, capturable=res.cuda_graphs)
    schedule = LRSchedule(optimizer, cfg.scheduler, cfg.epochs * steps, round(cfg.warmup_epochs * steps))
    ema = WeightEMA(model, cfg.ema) if cfg.ema else None
    eval_model = ema.model if ema else model
    if res.compile:  # dynamic=False: train and eval batch sizes differ; each gets one static graph
        step_model = torch.compile(step_model, dynamic=False)
        eval_model = torch.compile(eval_model, dynamic=False)
    monitor = None
    if cfg.monitor:
        monitor = LayerMonitor(model, steps_per_epoch=steps, epochs=cfg.epochs, grad_every=cfg.grad_every,
                               grad_epochs=cfg.grad_epochs, grad_low=cfg.grad_low, grad_high=cfg.grad_high)
    s = Session(cfg, res, info, model, step_model, eval_model, optimizer, schedule,
                torch.amp.GradScaler(res.device.type, enabled=res.grad_scaler), ema, train_loader, eval_loader,
                monitor, loss_fn or functools.partial(F.cross_entropy, label_smoothing=cfg.label_smoothing),
                step_losses=torch.zeros(steps, device=res.device),
                step_correct=torch.zeros(steps, device=res.device, dtype=torch.int64),
                step_index=torch.zeros((), device=res.device, dtype=torch.int64), dataset=ds,
                val_loader=val_loader)
    step, zero_grad = functools.partial(train_step, s), functools.partial(optimizer.zero_grad, set_to_none=True)
    if res.cuda_graphs:
        s.stepper = GraphedStep(step, zero_grad, (False, True) if monitor else (False,), notice)
    else:
        s.stepper = EagerStep(step, compiled=res.compile)
    return s


def reset_session(s: Session, cfg: TrainConfig, ds: Dataset, notice: Callable[[str], None] = print) -> None:
    """Turn a used session into what build_session(cfg, ds) would give for another --seed, in place: that seed's
    initial weights, empty optimizer state, the schedule at step 0, a fresh EMA and loss scaler, the loaders on
    that seed's data order. Every tensor keeps its identity, so the compiled model and a captured CUDA graph stay
    valid: `--seeds` compiles (and captures) once. A dataset other than the session's (a --train-subset drawn with
    another seed) gets new loaders; their batches are copied into the graph's static inputs, so that is safe too."""
    torch.manual_seed(cfg.seed)  # then the same draws as build_session's: the initial weights of this seed
    fresh = resnet18_cifar(num_classes=len(ds.classes), zero_init_residual=cfg.zero_init_residual)
    s.model.load_state_dict(fresh.state_dict())  # copy_ into the live parameters and buffers
    if s.stepper.captured:  # the graph reads these very tensors: zeros are what a first step starts from
        for state in s.optimizer.state.values():
            for value in state.values():
                if torch.is_tensor(value):
                    value.zero_()
    else:
        s.optimizer.state.clear()  # exactly a new optimizer's (lazily created) state
    s.schedule.load_state_dict({"step": 0})
    if s.ema is not None:
        s.ema.load_state_dict({"model": s.model.state_dict(), "count": 0})
    s.scaler = torch.amp.GradScaler(s.res.device.type, enabled=s.res.grad_scaler)  # fp16 only: never captured
    if ds is not s.dataset:
        s.train_loader, s.eval_loader, s.val_loader = _make_loaders(cfg, ds, s.res, s.info, notice)
        s.dataset = ds
    s.train_loader.seed = cfg.seed
    s.cfg = cfg


def _make_loaders(cfg: TrainConfig, ds: Dataset, res: Resolved, info: dist.DistInfo,
                  notice: Callable[[str], None]) -> tuple[TrainLoader, EvalLoader, EvalLoader | None]:
    """The train, test and (--val-split) validation loaders of `res.loader`; DALI that imports but cannot start falls back to torch."""
    data_dtype = res.amp_dtype or torch.float32  # the loader casts once; autocast then keeps it
    common = dict(device=res.device, dtype=data_dtype, channels_last=res.channels_last, rank=info.rank,
                  world_size=info.world_size, mean=ds.mean, std=ds.std)

    def loaders(kind):
        return (make_train_loader(kind, ds.train_images, ds.train_labels, cfg.batch_size, seed=cfg.seed,
                                  num_workers=cfg.num_workers, augment=parse_augment(cfg.augment), **common),
                make_eval_loader(kind, ds.test_images, ds.test_labels, res.eval_batch_size, **common))

    try:
        train_loader, eval_loader = loaders(res.loader)
    except Exception as exc:  # DALI imports but cannot start here (e.g. a wheel for a newer CUDA than the driver)
        if res.loader != "dali":
            raise
        why = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:200]
        if cfg.loader == "dali":
            raise FastCifarError(f"--loader dali: DALI failed to start on {res.device} ({why}); use --loader torch, "
                                 f"or a DALI wheel for this machine's CUDA driver.") from None
        notice(f"loader: torch (GPU-resident torch ops), not DALI: DALI failed to start ({why})")
        res.loader = "torch"
        train_loader, eval_loader = loaders(res.loader)
    val_loader = None  # --val-split: the held-out training images; the test set's batch shape, so no second graph
    if ds.val_labels is not None:
        val_loader = make_eval_loader(res.loader, ds.val_images, ds.val_labels, res.eval_batch_size, **common)
    if cfg.limit_steps:  # before anything sized by the epoch's steps: schedule, buffers, monitor
        train_loader, eval_loader = LimitedTrainLoader(train_loader, cfg.limit_steps), \
            LimitedEvalLoader(eval_loader, cfg.limit_steps)
        val_loader = val_loader and LimitedEvalLoader(val_loader, cfg.limit_steps)
    return train_loader, eval_loader, val_loader


def train_step(s: Session, images: torch.Tensor, labels: torch.Tensor, monitored: bool = False) -> None:
    """One optimizer step, device work only: forward, loss, backward, [per-layer statistics], update, next LR,
    EMA, and this step's loss and correct count into the session's buffers.

    The gradients are set to None between forward and backward, so backward writes them instead of accumulating
    (which is also what lets a CUDA graph replay the step: under capture they are None already, cuda_graphs.py).
    After the forward, not before: the new gradients then take the old ones' memory, not the activations', which
    measured 10 % faster per step on the CPU.
    """
    with s.autocast():
        logits = s.step_model(images)
        loss = s.loss_fn(logits, labels)
    s.optimizer.zero_grad(set_to_none=True)
    s.scaler.scale(loss).backward()
    if monitored:
        if s.res.grad_scaler:
            s.scaler.unscale_(s.optimizer)  # statistics of the true gradients, not the scaled ones
        s.monitor.record_grads()
        s.monitor.snapshot_weights()
    s.scaler.step(s.optimizer)
    s.scaler.update()
    if monitored:
        s.monitor.record_update()
    s.schedule.advance()
    if s.ema is not None:
        s.ema.update()
    s.step_losses.index_copy_(0, s.step_index.view(1), loss.detach().float().view(1))
    s.step_correct.index_copy_(0, s.step_index.view(1), (logits.detach().argmax(1) == labels).sum().view(1))
    s.step_index.add_(1)


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


def autocast(res: Resolved):
    # The autocast weight cache must be off under graph capture (torch.cuda.graphs documentation).
    return torch.autocast(res.device.type, dtype=res.amp_dtype or torch.float32, enabled=res.amp_dtype is not None,
                          cache_enabled=not res.cuda_graphs)


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
        _sync(device)
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
            _sync(device)
            compile_s, time_first_batch = time.perf_counter() - start, False
    loss, correct, loss_tta, correct_tta, count = dist.all_reduce_sum(sums, info).tolist()
    result = {"test_loss": loss / count, "test_acc": correct / count, "compile_s": compile_s}
    if flip:
        result.update(test_loss_tta=loss_tta / count, test_acc_tta=correct_tta / count)
    return result


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
