"""Helpers shared by the benchmark files: device, sizes from FASTCIFAR_BENCH_* overrides, versions, timing.

Every benchmark records what it ran on and at which size in `benchmark.extra_info`, so one entry of a
`--benchmark-json` file stands alone. With FASTCIFAR_BENCH_RESULTS=FILE each timed benchmark also appends that
record as one JSON line as soon as it finishes: pytest-benchmark writes its JSON only at the end of a session
that was not interrupted, and benchmarks/gpu_evidence.sh stops the run at a time limit.
"""

from __future__ import annotations

import json
import os
import platform
import time

import numpy as np
import torch

from fastcifar.flops import device_name as _device_name

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda") if CUDA else torch.device("cpu")


def env_int(name: str, cuda_default: int, cpu_default: int) -> int:
    """FASTCIFAR_BENCH_<name> if set, else the device's default size."""
    value = os.environ.get(f"FASTCIFAR_BENCH_{name}")
    return int(value) if value else (cuda_default if CUDA else cpu_default)


def versions() -> dict:
    info = {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "python": platform.python_version()}
    try:
        import nvidia.dali

        info["dali"] = nvidia.dali.__version__
    except Exception:  # DALI is optional
        info["dali"] = None
    return info


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize(DEVICE)


class Timed:
    """Wraps fn so each call is synchronised and its duration kept: pytest-benchmark's own timing covers the same
    region, and these durations give images/s even under --benchmark-disable (where stats are not kept)."""

    def __init__(self, fn):
        self.fn, self.durations, self.calls = fn, [], 0

    def __call__(self):
        sync()  # nothing queued before the call is charged to it
        start = time.perf_counter()
        result = self.fn(self.calls)
        sync()  # GPU work is asynchronous: wait for it inside the timed region
        self.durations.append(time.perf_counter() - start)
        self.calls += 1
        return result

    def timed(self, warmup_rounds: int) -> list[float]:
        """The durations of the measured rounds (warm-up rounds dropped where any were measured)."""
        return self.durations[warmup_rounds:] or self.durations


def rate_info(durations: list[float], items: int, unit: str = "images") -> dict:
    """Best and median rates for `items` processed per call, and the median call time."""
    median = float(np.median(durations))
    return {f"{unit}_per_s_best": round(items / min(durations), 1),
            f"{unit}_per_s_median": round(items / median, 1), "seconds_median": round(median, 4)}


def device_name() -> str:
    return _device_name(DEVICE)


def base_info() -> dict:
    return {"device": device_name(), **versions()}


def publish(benchmark, info: dict) -> None:
    """Put `info` into extra_info and, when timed and FASTCIFAR_BENCH_RESULTS is set, append it there at once."""
    benchmark.extra_info.update(info)
    path = os.environ.get("FASTCIFAR_BENCH_RESULTS")
    if path and not benchmark.disabled:
        with open(path, "a") as f:
            f.write(json.dumps({"name": benchmark.name, "group": benchmark.group, "extra_info": benchmark.extra_info})
                    + "\n")
