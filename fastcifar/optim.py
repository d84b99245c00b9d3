"""Optimizers with parameter groups, the LR schedule as device arithmetic, and an EMA of the weights.

Everything a training step does here is tensor work on the device with no host sync, so a CUDA graph can
capture and replay it: the LR lives in a 1-element tensor per parameter group that the optimizer reads, and
`LRSchedule.advance()` rewrites it after every optimizer step from a device-side step counter (what
LambdaLR.step() does on the host). torch's own schedulers (CosineAnnealingLR & co.) compute on the host and
`fill_` the tensor with a Python number, which a graph would freeze at its captured value.

torch is imported inside the functions: `fastcifar --help` lists OPTIMIZERS and SCHEDULES without loading it.
"""

from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# name -> torch.optim class; the options each takes beyond lr and weight decay are in _extra_options.
OPTIMIZERS = {"adam": "Adam", "adamw": "AdamW", "sgd": "SGD"}
SCHEDULES = ("cosine", "linear", "constant")


def _extra_options(cfg) -> dict:
    if cfg.optimizer == "sgd":
        return {"momentum": cfg.momentum, "nesterov": cfg.nesterov and cfg.momentum > 0}
    return {}


def param_groups(model, weight_decay: float, decay_norm_and_bias: bool) -> list[dict]:
    """Weight decay on conv and linear weights only: BatchNorm weights and all biases set a scale and a shift,
    not capacity, and decaying them only fights the normalisation ("Bag of Tricks", He et al. 2019, §3.1;
    Goyal et al. 2017). With no decay at all, or when asked to decay everything, one group."""
    params = [p for p in model.parameters() if p.requires_grad]
    if weight_decay == 0 or decay_norm_and_bias:
        return [{"params": params, "weight_decay": weight_decay}]
    return [{"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]


def build_optimizer(cfg, model, device, capturable: bool = False) -> torch.optim.Optimizer:
    """On CUDA: fused kernels, the LR a float32 tensor on the device, and capturable when the step is captured in
    a CUDA graph (Adam's capturable update costs a little more when it is not).
    On the CPU: the plain single-tensor update, the LR a float64 tensor that it reads as a Python number, so the
    arithmetic is the same as with a float LR."""
    import torch

    cuda = device.type == "cuda"
    groups = param_groups(model, cfg.weight_decay, cfg.decay_norm_and_bias)
    for group in groups:
        group["lr"] = torch.tensor(cfg.lr, dtype=torch.float32 if cuda else torch.float64, device=device)
    options = {"fused": True, **({"capturable": True} if capturable and cfg.optimizer != "sgd" else {})} if cuda else {}
    return getattr(torch.optim, OPTIMIZERS[cfg.optimizer])(groups, lr=cfg.lr, **_extra_options(cfg), **options)


def load_optimizer_state(optimizer, state: dict) -> None:
    """Optimizer.load_state_dict replaces each group dict with the saved one, LR tensor included (on the CPU,
    where checkpoints are loaded): put back the live LR tensors that the schedule and a captured graph use."""
    lrs = [group["lr"] for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr


class LRSchedule:
    """lr = peak * factor(step) for every group, stepped after every optimizer step, computed on the device.

    factor: a linear warm-up from peak/W to peak over the first W steps, then over the remaining steps cosine
    (0.5 (1 + cos(pi p))), linear (1 - p) or constant (1), with p going from 0 to 1: the LR reaches 0 after the
    last step. A step advances a device counter and computes the factor from it with float64 tensor ops, in the
    order of the host formula `factor()` (with W = 0 the cosine equals LambdaLR(0.5 * (1 + cos(pi * step /
    total))) to the last bit on the CPU): a handful of scalar kernels, captured with the step. Nothing here grows
    with the run's length (a per-step table would: --epochs 10^9 was a MemoryError).
    """

    def __init__(self, optimizer, kind: str, total_steps: int, warmup_steps: int = 0):
        import torch

        if kind not in SCHEDULES:
            raise ValueError(f"unknown schedule {kind!r}")
        self.kind, self.total, self.warmup = kind, max(int(total_steps), 1), max(int(warmup_steps), 0)
        self.lrs = [group["lr"] for group in optimizer.param_groups]
        self.peak = float(optimizer.defaults["lr"])  # --lr, as a Python float (the LR tensors may be float32)
        self.step = torch.zeros((), dtype=torch.int64, device=self.lrs[0].device)
        self._torch = torch
        self._write()

    def factor(self, step: int) -> float:
        decay_steps = max(self.total - self.warmup, 1)
        if step < self.warmup:
            return (step + 1) / self.warmup
        since = min(step - self.warmup, decay_steps) if self.warmup else min(step, decay_steps)
        if self.kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * since / decay_steps))
        return 1.0 - since / decay_steps if self.kind == "linear" else 1.0

    def _write(self) -> None:
        # Device ops only, no host read (a sync would make CUDA-graph capture fail); each op is the host formula's
        # float64 operation in its order, so both give the same bits where the device's cos is the C library's.
        torch = self._torch
        step = self.step.clamp(max=self.total).to(torch.float64)
        decay_steps = max(self.total - self.warmup, 1)
        since = (step - self.warmup).clamp(min=0, max=decay_steps) if self.warmup else step.clamp(max=decay_steps)
        if self.kind == "cosine":
            factor = 0.5 * (1.0 + torch.cos(math.pi * since / decay_steps))
        elif self.kind == "linear":
            factor = 1.0 - since / decay_steps
        else:
            factor = torch.ones_like(since)
        if self.warmup:
            factor = torch.where(step < self.warmup, (step + 1) / self.warmup, factor)
        lr = self.peak * factor
        for group_lr in self.lrs:
            group_lr.copy_(lr)

    def advance(self) -> None:
        """After an optimizer step: the next step's LR. Device ops only."""
        self.step.add_(1)
        self._write()

    def lr_at(self, steps) -> list[float]:
        """The LR at the given global steps, from the same host arithmetic (for the console and files)."""
        return [self.peak * self.factor(int(step)) for step in steps]

    def state_dict(self) -> dict:
        return {"step": int(self.step.item()), "kind": self.kind, "total_steps": self.total,
                "warmup_steps": self.warmup}

    def load_state_dict(self, state: dict) -> None:
        """Only the position is restored: a run extended to more epochs keeps its step count and follows the
        schedule planned for its new length."""
        self.step.fill_(state["step"])
        self._write()


class WeightEMA:
    """An exponential moving average of the model's parameters and buffers (`--ema DECAY`), updated after every
    optimizer step on the device; evaluation then uses the averaged weights.

    The decay ramps up as min(DECAY, (1 + t) / (10 + t)) over the steps t (timm's ModelEmaV3 warm-up, Tensorflow's
    ExponentialMovingAverage num_updates): with a fixed 0.999 the average would still hold 0.999^1455 = 23 % of the
    random initial weights after the fast recipe's 1,455 steps. The step count is a device tensor, so the update
    stays capturable.
    """

    def __init__(self, model, decay: float):
        import torch

        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        pairs = list(zip(self.model.state_dict().values(), model.state_dict().values()))
        self._ema = [a for a, b in pairs if a.is_floating_point()]
        self._live = [b for a, b in pairs if a.is_floating_point()]
        self._ema_other = [a for a, b in pairs if not a.is_floating_point()]  # BN's num_batches_tracked
        self._live_other = [b for a, b in pairs if not a.is_floating_point()]
        self.count = torch.zeros((), dtype=torch.float32, device=self._ema[0].device)
        self.fused = self._ema[0].device.type == "cuda"
        self._torch = torch

    def update(self) -> None:
        torch = self._torch
        with torch.no_grad():
            decay = torch.clamp((1.0 + self.count) / (10.0 + self.count), max=self.decay)
            if self.fused:
                # ema = live + decay * (ema - live): three fused kernels on CUDA, in place, the decay a 0-dim device
                # tensor (capturable). A list of 0-dim tensors as the scalars would not match the parameters'
                # shapes, and CUDA would fall back to one kernel per tensor.
                torch._foreach_sub_(self._ema, self._live)
                torch._foreach_mul_(self._ema, decay)
                torch._foreach_add_(self._ema, self._live)
            else:
                # ema = decay * ema + (1 - decay) * live. On the CPU every foreach op is a loop over the tensors
                # anyway, and this form makes the fewest passes over memory (measured fastest there).
                torch._foreach_mul_(self._ema, decay)
                torch._foreach_addcmul_(self._ema, self._live, [1.0 - decay] * len(self._ema))
            torch._foreach_copy_(self._ema_other, self._live_other)
            self.count.add_(1)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "count": int(self.count.item())}

    def load_state_dict(self, state: dict) -> None:
        if "model" not in state:  # a plain state dict: weights only
            state = {"model": state, "count": 0}
        self.model.load_state_dict(state["model"])
        self.count.fill_(state["count"])
