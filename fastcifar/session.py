"""The training session and its step: everything a run trains with (model, loaders, optimizer, schedule, EMA,
monitor, the device buffers the step writes), built once by build_session() and reset in place between the seeds
of a group (reset_session), and train_step, the one optimizer step a CUDA graph captures.

Below both run.py (a run's life) and train.py (the loops): each uses the session from here, and neither imports
the other's internals for it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from fastcifar import FastCifarError
from fastcifar import distributed as dist
from fastcifar.config import Resolved, TrainConfig
from fastcifar.cuda_graphs import EagerStep, GraphedStep
from fastcifar.data.augment import parse_augment
from fastcifar.data.cifar import Dataset
from fastcifar.data.loaders import make_eval_loader, make_train_loader
from fastcifar.data.plan import EvalLoader, LimitedEvalLoader, LimitedTrainLoader, TrainLoader
from fastcifar.model import resnet18_cifar
from fastcifar.monitor import LayerMonitor
from fastcifar.optim import LRSchedule, WeightEMA, build_optimizer
from fastcifar.profiling import StepProfiler
from fastcifar.sync_bn import convert_sync_batchnorm


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
        sync_device(self.res.device)


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
    """The train, test and (--val-split) validation loaders of `res.loader`; DALI that imports but cannot start
    falls back to torch."""
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


def autocast(res: Resolved):
    # The autocast weight cache must be off under graph capture (torch.cuda.graphs documentation).
    return torch.autocast(res.device.type, dtype=res.amp_dtype or torch.float32, enabled=res.amp_dtype is not None,
                          cache_enabled=not res.cuda_graphs)


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
