"""The whole training step as one CUDA graph: forward, loss, backward, optimizer update, LR schedule, EMA and the
per-step loss/accuracy bookkeeping, replayed with one launch per step.

Why an explicit torch.cuda.CUDAGraph around the step rather than torch.compile(mode="reduce-overhead"): the
latter graphs the model's forward and backward only; the optimizer, the LR schedule, the EMA and the bookkeeping
would still be launched from Python every step. By estimate, not yet by measurement: at batch 128 a ResNet-18
step is 0.43 TFLOP, ~1-1.5 ms of H100 work, about what the host needs to launch the eager step's ~250 kernels.
Capturing the whole step makes the host's cost one copy of the batch into the static input buffers and one
graph launch. The compiled model (torch.compile default mode: Triton kernels, no graphs of its own) is captured
like any other CUDA work. Measured comparison on a GPU: benchmarks/bench_train.py::test_step (modes
"compile+graph" vs "reduce-overhead"); see benchmarks/README.md.

What capture needs, and how it is met:
- static inputs: the loader's batch is copied into buffers allocated once (0.8 MB at batch 128 in bf16);
- gradients written, not accumulated: capture starts with grads None (zero_grad(set_to_none=True); train_step's
  own zero_grad is then a no-op), so backward allocates them from the graph's private pool and every replay
  overwrites them;
- no host sync and no Python state in the step: the LR is a device tensor rewritten by a device-side schedule
  (optim.LRSchedule), the optimizer is fused and capturable, the step counter and per-step loss slots are
  device tensors (train.train_step);
- warm-up on a side stream before capture (torch.compile's first compilation, cuDNN autotuning, lazy CUDA
  handles): the first WARMUP_STEPS steps are real training steps run eagerly there, so nothing is wasted and
  the result is the same as an uncaptured run's. Every variant runs at least once before any capture (a
  monitored step may run where an unmonitored one was asked: it computes the same update), so no kernel is
  launched for the first time under capture, whatever order the caller asks for the variants in;
- two graphs, one without and one with the monitor's per-layer statistics (see monitor.py): sampled steps
  replay the second one, so gradient flow is recorded on the captured path too. Each graph has its own memory
  pool, since they are replayed in any order.
- GradScaler (fp16) needs host decisions and DDP needs its own capture protocol: the trainer turns graphs off
  for both (config.resolve), with a notice.

If capture raises, one notice naming the root cause is printed and the step runs uncaptured from then on. The
capture is done by hand rather than with torch.cuda.graph(): when capture_end() raises (it does after any error
inside the capture), graph.__exit__ never leaves its stream context, so the capture stream would stay current
for the rest of the run, and its error ("operation failed due to a previous error during capture") would hide
the one that caused it.
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch

WARMUP_STEPS = 3


class EagerStep:
    """The uncaptured step. `ready` once torch.compile has compiled (the first call): what the trainer times as
    compilation."""

    def __init__(self, step: Callable, compiled: bool):
        self.step = step
        self.ready = not compiled
        self.captured = False

    def __call__(self, images, labels, monitored: bool) -> None:
        self.step(images, labels, monitored)
        self.ready = True


class GraphedStep:
    """Runs `step(images, labels, monitored)` eagerly for the first WARMUP_STEPS calls (on a side stream), then
    captures one graph per `monitored` value and replays those. `ready` once captured."""

    def __init__(self, step: Callable, zero_grad: Callable, variants: tuple[bool, ...], notice: Callable[[str], None],
                 warmup_steps: int = WARMUP_STEPS):
        self.step, self.zero_grad, self.variants, self.notice = step, zero_grad, variants, notice
        self.warmup_steps, self.calls = warmup_steps, 0
        self.graphs: dict[bool, torch.cuda.CUDAGraph] = {}
        self.static_images = self.static_labels = None
        self.failed: str | None = None
        self.warmed: set[bool] = set()  # the variants that have run eagerly
        self.side_stream = None  # one stream for the warm-up steps: memory freed on it stays usable

    @property
    def ready(self) -> bool:
        return bool(self.graphs) or self.failed is not None

    @property
    def captured(self) -> bool:
        return bool(self.graphs)

    def __call__(self, images, labels, monitored: bool) -> None:
        if self.graphs:
            self.static_images.copy_(images)
            self.static_labels.copy_(labels)
            self.graphs[monitored].replay()
            return
        if self.failed is not None:
            self.step(images, labels, monitored)
            return
        # The monitored step launches every kernel of the plain one and more: once it ran, both are warm (a run
        # whose every step is monitored, e.g. --grad-every 1 or a few steps an epoch, still gets captured).
        missing = [v for v in self.variants if v not in self.warmed and not (v is False and True in self.warmed)]
        if self.calls < self.warmup_steps or missing:
            self.calls += 1
            if not monitored and True in missing and self.calls >= self.warmup_steps:
                monitored = True  # the monitored variant has not run yet: its last chance before capture
            self._warmup(images, labels, monitored)
            self.warmed.add(monitored)
            return
        if self._capture(images, labels):
            self(images, labels, monitored)
        else:
            self.step(images, labels, monitored)

    def _warmup(self, images, labels, monitored: bool) -> None:
        if self.side_stream is None:
            self.side_stream = torch.cuda.Stream()
        side = self.side_stream
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), warnings.catch_warnings():
            # a capturable optimizer warns once when it steps uncaptured: here that is the point of the warm-up
            warnings.filterwarnings("ignore", message=".*capturable=True.*", category=UserWarning)
            self.step(images, labels, monitored)
        # Everything later on the current stream (including reuse of memory freed by the step) waits for it.
        torch.cuda.current_stream().wait_stream(side)

    def _capture(self, images, labels) -> bool:
        try:
            self.static_images = images.clone()  # clone keeps the memory format (channels_last)
            self.static_labels = labels.clone()
            torch.cuda.synchronize()
            torch.cuda.empty_cache()  # what torch.cuda.graph() does first: freed blocks go back before the pools
            for monitored in self.variants:
                self.zero_grad()  # grads None: backward allocates them from the graph's pool
                graph = torch.cuda.CUDAGraph()
                self._capture_one(graph, monitored)
                self.graphs[monitored] = graph
            torch.cuda.synchronize()
        except Exception as exc:  # any failure: the uncaptured step, and say why once
            self.graphs.clear()
            self.static_images = self.static_labels = None
            self.failed = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            self.notice(f"note: CUDA graph capture failed ({self.failed[:200]}); the training step runs "
                        f"uncaptured (correct, slower at small batches). --cuda-graphs off silences this.")
            return False
        return True

    def _capture_one(self, graph, monitored: bool) -> None:
        """Capture one variant on the side stream; whatever happens, the caller's stream is current again after,
        and what raises is the first error (the step's), not capture_end's consequence of it."""
        previous = torch.cuda.current_stream()
        self.side_stream.wait_stream(previous)
        with torch.cuda.stream(self.side_stream):  # a context manager: left on any exit
            # thread_local: only this thread is held to capture's rules; the DataLoader's pin-memory thread
            # and DALI's workers go on pinning and querying events meanwhile (in the default "global" mode
            # their calls would invalidate the capture and fail in their own thread)
            graph.capture_begin(capture_error_mode="thread_local")
            try:
                self.step(self.static_images, self.static_labels, monitored)
            except BaseException:
                try:
                    graph.capture_end()  # ends the (invalidated) capture; its own error is only a consequence
                except Exception:
                    pass
                raise
            graph.capture_end()
        previous.wait_stream(self.side_stream)
