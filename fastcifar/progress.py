"""Progress inside an epoch, without a host sync of its own in the hot path.

On a terminal: the tqdm bar (images/s) with the epoch's running loss. Off a terminal (nohup, Slurm, CI, a pipe),
where a bar is unreadable: a line every --log-interval seconds (timm's --log-interval) with step, running loss, LR,
images/s and the time left of the epoch and of the run. The running loss is the mean of the epoch's step losses
so far, a device tensor: on CUDA it is copied to the host without blocking and shown once the copy has landed
(a later step), so the step loop never waits for the GPU. The LR is host arithmetic (LRSchedule.lr_at).

The first epoch of a process also times a few steps after warm-up (two syncs in the whole run) and prints the
run's estimated time: training from those steps, evaluation from its FLOPs at the same measured FLOP/s.
"""

from __future__ import annotations

import time

import torch

ESTIMATE_STEPS = 5  # timed steps behind the run's estimate
BAR_REFRESH_S = 1.0  # the bar's loss is refreshed at most this often


def duration(seconds: float) -> str:
    """12 s, 4.5 min, 3.2 h: a time a person reads at a glance."""
    if seconds < 90:
        return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


class EpochProgress:
    """Called once per training step (`update`) and once when the epoch's steps are done (`close`)."""

    def __init__(self, s, *, epoch: int, end_epoch: int, bar=None, interval: float = 30.0,
                 eval_per_step: float = 0.0, last_eval_s: float | None = None, estimate: bool = False,
                 write=print):
        self.s, self.epoch, self.end_epoch, self.bar = s, epoch, end_epoch, bar
        self.interval, self.eval_per_step, self.last_eval_s = interval, eval_per_step, last_eval_s
        self.write = bar.write if bar is not None else (lambda text: write(text, flush=True))
        self.steps, self.batch = len(s.train_loader), s.train_loader.batch_size
        self.step = 0  # steps done this epoch
        self.cuda = s.res.device.type == "cuda"
        self.loss: float | None = None
        self._pending = None  # (host tensor, event) of a loss copy in flight on CUDA
        self._line_due = False
        self._rate_from: tuple[int, float] | None = None  # (step, time) after the first step: compile excluded
        self._estimate_from: tuple[int, float] | None = None
        self.estimate = estimate and self.steps > 1
        self.step_s: float | None = None
        self._last = -float("inf") if bar is not None else time.perf_counter()  # the bar shows the loss at once

    # --- per step: a clock read and a comparison, unless something is due ---------------------------------------
    def update(self, images: int) -> None:
        self.step += 1
        now = time.perf_counter()
        if self._rate_from is None:
            self._rate_from = (self.step, now)
        if self.estimate:
            self._time_steps()
        if self.bar is not None:
            self.bar.update(images)
            if now - self._last >= BAR_REFRESH_S:
                self._last = now
                if self._read_loss() and self.loss is not None:
                    self.bar.set_postfix_str(f"loss {self.loss:.4f}")
            return
        if not self._line_due and now - self._last >= self.interval:
            self._line_due = True
        if self._line_due and self._read_loss():
            self._line_due, self._last = False, time.perf_counter()
            self.write(self._line(self._last))

    def _read_loss(self) -> bool:
        """True once the running loss on the host is current as of a step at or after the request."""
        if not self.cuda:
            self.loss = float(self.s.step_losses[:self.step].mean())  # the CPU has computed it: nothing to wait for
            return True
        if self._pending is not None:
            host, event = self._pending
            if not event.query():
                return False
            self.loss, self._pending = float(host), None
            return True
        host = torch.empty((), pin_memory=True)
        host.copy_(self.s.step_losses[:self.step].mean(), non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._pending = (host, event)
        return False

    def _time_steps(self) -> None:
        """Steps [k, k + n) of the first epoch after warm-up, timed between two syncs: the run's estimate."""
        if self._estimate_from is None:
            if self.s.stepper.ready and self.step < self.steps:
                self.s.sync()
                self._estimate_from = (self.step, time.perf_counter())
            return
        first, start = self._estimate_from
        if self.step - first < min(ESTIMATE_STEPS, self.steps - first):
            return
        self.s.sync()
        self.estimate = False
        self.step_s = (time.perf_counter() - start) / (self.step - first)
        epoch_train = self.step_s * self.steps
        epoch_eval = self.eval_per_step * self.step_s
        left = (self.steps - self.step) * self.step_s + epoch_eval + \
            (self.end_epoch - self.epoch - 1) * (epoch_train + epoch_eval)
        epochs = self.end_epoch - self.epoch
        timed = self.step - first
        self.write(f"estimate from {timed} step{'s' if timed > 1 else ''}: {self.step_s:.3g} s/step; epoch "
                   f"~{duration(epoch_train)} + ~{duration(epoch_eval)} eval (by FLOPs); run ~{duration(left)} "
                   f"({epochs} epoch{'s' if epochs > 1 else ''} left)")

    def _line(self, now: float) -> str:
        first, since = self._rate_from
        rate = (self.step - first) * self.batch / (now - since) if now > since and self.step > first else None
        step_s = self.batch / rate if rate else self.step_s
        global_step = self.epoch * self.steps + self.step - 1
        lr = self.s.schedule.lr_at([global_step])[0]
        text = (f"  epoch {self.epoch} step {self.step}/{self.steps} loss "
                f"{'-' if self.loss is None else f'{self.loss:.4f}'} lr {lr:.3g}")
        if rate:
            text += f" | {rate:,.0f} img/s"
        if step_s:
            eval_s = self.last_eval_s if self.last_eval_s is not None else self.eval_per_step * step_s
            epoch_left = (self.steps - self.step) * step_s + eval_s
            run_left = epoch_left + (self.end_epoch - self.epoch - 1) * (self.steps * step_s + eval_s)
            text += f" | epoch ends in ~{duration(epoch_left)}, run in ~{duration(run_left)}"
        return text

    def close(self) -> None:
        """The epoch's steps are done; off a terminal, say that evaluation follows when it is long."""
        if self.bar is not None:
            self.bar.close()
            return
        eval_s = self.last_eval_s if self.last_eval_s is not None else \
            (self.eval_per_step * self.step_s if self.step_s else None)
        if eval_s is not None and eval_s >= self.interval:
            self.write(f"  epoch {self.epoch}: training done, evaluating (~{duration(eval_s)})")
