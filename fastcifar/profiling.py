"""`fastcifar train --profile [STEPS]`: torch.profiler over STEPS training steps after the warm-up, written into
RUN_DIR/profile/:

  trace.pt.trace.json[.gz]  the timeline (Perfetto, chrome://tracing, TensorBoard's profiler plugin open it);
                            gzipped when over GZIP_ABOVE bytes
  profile.txt               what to read first: host time per step, device time and busy share per step,
                            launches per step, and the top kernels by device time
  profile.json              the same numbers, for scripts (benchmarks/gpu_evidence.sh)

When: the profiler starts once the step is ready (compiled, and captured with CUDA graphs), skips WAIT steps,
warms up for WARMUP steps (the profiler's own start-up cost), then records STEPS steps. An epoch that ends
before that is finished writes what it recorded (at least one step), or starts again in the next epoch.
Shapes, memory and stacks are not recorded: they multiply the trace's size and the profiler's overhead.

"Device" is the GPU on CUDA; on the CPU the ops run on the host, so device time is the time spent inside aten ops
and "launches" are the ops run. Device busy share = device time / wall time of the profiled steps (measured with
one synchronisation before and one after them), from the union of the kernel intervals, so kernels running
side by side on two streams (DALI's and the step's) are not counted twice.
"""

from __future__ import annotations

import gzip
import json
import shutil
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable

import torch
from torch.autograd import DeviceType

WAIT, WARMUP = 1, 2
DEFAULT_STEPS = 10
GZIP_ABOVE = 2 * 1024 * 1024
TOP_KERNELS = 25
LAUNCH_CALLS = ("LaunchKernel", "GraphLaunch", "cuLaunch")  # CUDA runtime/driver calls that launch device work


class StepProfiler:
    """Called after every training step with whether the step is ready; profiles once, then does nothing."""

    def __init__(self, out_dir: Path, steps: int, device: torch.device, notice: Callable[[str], None] = print,
                 describe: str = ""):
        if steps < 1:
            raise ValueError("--profile needs at least 1 step")
        self.out_dir, self.steps, self.device = Path(out_dir), steps, device
        self.notice, self.describe = notice, describe
        self.cuda = device.type == "cuda"
        self.seen = 0  # ready steps since the (re)start
        self.prof = None
        self.start_s = None
        self.files: dict | None = None  # once written: where, and the headline numbers

    @property
    def done(self) -> bool:
        return self.files is not None

    def after_step(self, ready: bool) -> None:
        if self.done or not ready:
            return
        self.seen += 1
        if self.seen == WAIT:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.cuda:
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.prof = torch.profiler.profile(
                activities=activities,
                schedule=torch.profiler.schedule(wait=0, warmup=WARMUP, active=self.steps, repeat=1),
                record_shapes=False, profile_memory=False, with_stack=False)
            self.prof.start()
            return
        if self.prof is None:
            return
        recorded = self.seen - WAIT - WARMUP  # steps finished inside the active window
        if recorded == self.steps:
            self._finish(recorded)  # its prof.step() ends the schedule: the trace is processed then
            return
        if recorded == 0:
            self._sync()
            self.start_s = time.perf_counter()  # the active window starts with the next step
        self.prof.step()

    def end_epoch(self) -> None:
        """The epoch's steps are over: finish with what was recorded, or start again next epoch."""
        if self.done or self.prof is None:
            return
        recorded = self.seen - WAIT - WARMUP
        if recorded >= 1:
            self._finish(recorded)
        else:
            self.prof.stop()
            self.prof, self.seen = None, 0

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def _finish(self, recorded: int) -> None:
        host_s = time.perf_counter() - self.start_s
        self._sync()
        wall_s = time.perf_counter() - self.start_s
        if recorded == self.steps:
            self.prof.step()  # the schedule's last step: recording stops here
        self.prof.stop()
        events = self.prof.events()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        trace = self.out_dir / "trace.pt.trace.json"
        self.prof.export_chrome_trace(str(trace))
        if trace.stat().st_size > GZIP_ABOVE:
            with open(trace, "rb") as src, gzip.open(trace.with_name(trace.name + ".gz"), "wb", compresslevel=6) as dst:
                shutil.copyfileobj(src, dst)
            trace.unlink()
            trace = trace.with_name(trace.name + ".gz")
        stats = step_statistics(events, recorded, host_s, wall_s, self.cuda)
        stats.update(device=str(self.device), describe=self.describe, trace=trace.name,
                     trace_bytes=trace.stat().st_size)
        (self.out_dir / "profile.json").write_text(json.dumps(stats, indent=1))
        (self.out_dir / "profile.txt").write_text(format_table(stats))
        self.files = {"dir": str(self.out_dir), "table": str(self.out_dir / "profile.txt"), "trace": str(trace),
                      "steps": recorded, "device_busy_share": stats["device_busy_share"],
                      "wall_ms_per_step": stats["wall_ms_per_step"]}
        self.prof = None
        self.notice(f"profile: {recorded} steps -> {self.out_dir / 'profile.txt'} (table), {trace} (trace: "
                    f"Perfetto, chrome://tracing, TensorBoard); device busy {100 * stats['device_busy_share']:.0f} %, "
                    f"{stats['wall_ms_per_step']:.2f} ms per step")


def _union_us(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for lo, hi in sorted(intervals):
        if hi > end:
            total += hi - max(lo, end)
            end = hi
    return total


def step_statistics(events, steps: int, host_s: float, wall_s: float, cuda: bool) -> dict:
    """The numbers of profile.txt from the profiler's events of `steps` steps."""
    per_kernel: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    intervals = []
    launches = 0
    for evt in events:
        if cuda:
            if evt.device_type == DeviceType.CUDA:
                per_kernel[evt.name][0] += evt.time_range.elapsed_us()
                per_kernel[evt.name][1] += 1
                intervals.append((evt.time_range.start, evt.time_range.end))
            elif any(call in evt.name for call in LAUNCH_CALLS):
                launches += 1
        elif evt.device_type == DeviceType.CPU and evt.name.startswith("aten::"):
            per_kernel[evt.name][0] += evt.self_cpu_time_total
            per_kernel[evt.name][1] += 1
            launches += 1
    device_us = _union_us(intervals) if cuda else sum(us for us, _ in per_kernel.values())
    total_us = sum(us for us, _ in per_kernel.values()) or 1.0
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:TOP_KERNELS]
    return {
        "steps": steps, "host_ms_per_step": 1e3 * host_s / steps, "wall_ms_per_step": 1e3 * wall_s / steps,
        "device_ms_per_step": device_us / 1e3 / steps, "device_busy_share": min(device_us / 1e6 / wall_s, 1.0),
        "launches_per_step": launches / steps, "kernels_per_step": sum(n for _, n in per_kernel.values()) / steps,
        "device_kind": "cuda kernels" if cuda else "cpu aten ops (self time)",
        "top_kernels": [{"name": name, "ms_per_step": us / 1e3 / steps, "share": us / total_us,
                         "calls_per_step": n / steps} for name, (us, n) in top]}


def format_table(stats: dict) -> str:
    unit = "kernel" if stats["device_kind"].startswith("cuda") else "op"
    lines = [f"fastcifar profile: {stats['steps']} training steps on {stats['device']}"
             + (f" ({stats['describe']})" if stats.get("describe") else ""),
             f"  wall time per step        {stats['wall_ms_per_step']:9.3f} ms   (synchronised before and after)",
             f"  host time per step        {stats['host_ms_per_step']:9.3f} ms   (Python + launches, before the final "
             f"sync)",
             f"  device time per step      {stats['device_ms_per_step']:9.3f} ms   ({stats['device_kind']})",
             f"  device busy share         {100 * stats['device_busy_share']:9.1f} %    (device time / wall time)",
             f"  launches per step         {stats['launches_per_step']:9.1f}      "
             + ("(kernel and graph launches)" if unit == "kernel" else "(aten ops run)"),
             f"  {unit + 's per step':<25} {stats['kernels_per_step']:9.1f}",
             f"  trace                     {stats['trace']} ({stats['trace_bytes'] / 1e6:.1f} MB)",
             "",
             f"top {unit}s by device time:",
             f"  {'ms/step':>9} {'share':>6} {'calls/step':>10}  name"]
    for k in stats["top_kernels"]:
        lines.append(f"  {k['ms_per_step']:9.3f} {100 * k['share']:5.1f}% {k['calls_per_step']:10.1f}  "
                     f"{k['name'][:110]}")
    return "\n".join(lines) + "\n"
