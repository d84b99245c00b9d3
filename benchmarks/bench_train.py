"""Training speed: a whole epoch through the real trainer (per loader), monitoring on vs off, the evaluation pass,
and the training step alone across step mechanisms x channels_last/contiguous x bf16/fp32.

    pytest benchmarks/bench_train.py --benchmark-only     # timed (warm-up rounds first, then ROUNDS rounds)
    pytest benchmarks/bench_train.py                      # each once, untimed: a smoke test (benchmarks/conftest.py)

Every benchmark builds a `Session` with the trainer's own `build_session` (the recipe's config and what
`resolve()` picks on this machine) over random uint8 CIFAR-shaped images, and times the trainer's own
`train_one_epoch` / `evaluate` / step (`session.stepper`, which runs `train.train_step`, captured in a CUDA graph
when the session has graphs on): data loading and augmentation, forward, backward, optimizer, LR schedule, the
monitor's samples when on; no evaluation in the epoch, no checkpoint, no logging. One session per configuration
is built once and shared, so torch.compile, cuDNN autotuning and graph capture happen in the first warm-up round
that uses it. Every timed call synchronises CUDA before it returns.

Sizes (FASTCIFAR_BENCH_* environment variables override them; see benchmarks/README.md):
  CUDA: a 50,000-image training epoch (390 steps at batch 128, 97 at 512), evaluation over 10,000 images,
        3 timed rounds; the step benchmark times 50 steps per round, 5 rounds.
  CPU:  an "epoch" of 256 images at batch 128 (2 steps) and 512 at batch 512 (1 step), evaluation over 256
        images, 2 timed rounds; 1 step per round. ResNet-18 trains at ~30 img/s on 2 cores, so that is what fits
        in a few minutes. torch.compile, CUDA graphs, bf16 and the DALI epoch are skipped on the CPU (see the
        skip reasons).
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
import torch
from _common import CUDA, DEVICE, Timed, base_info, device_name, env_int, publish, rate_info

from fastcifar import flops
from fastcifar.config import build_config, precision_name, resolve
from fastcifar.data.cifar import Dataset
from fastcifar.distributed import DistInfo
from fastcifar.train import build_session, evaluate, train_one_epoch

RECIPE_OF_BATCH = {128: "worksheet", 512: "fast"}  # the report's batch, and the fast recipe's
EVAL_IMAGES = env_int("EVAL_IMAGES", 10_000, 256)
ROUNDS = env_int("ROUNDS", 3, 2)
WARMUP = 1  # compile + cudnn autotune + graph capture on CUDA, first-touch allocations on the CPU: never timed
STEP_BATCH = env_int("STEP_BATCH", 128, 128)
STEPS_PER_CALL = env_int("STEPS", 50, 1)  # one CUDA step is a few ms: time many between two syncs
STEP_ROUNDS = env_int("STEP_ROUNDS", 5, 2)

CPU_SKIPS = {
    "compile": "torch.compile on the CPU costs ~60 s to compile for no speed-up (README); measured on CUDA only",
    "graph": "CUDA graphs need CUDA",
    "reduce-overhead": "torch.compile's CUDA-graph mode needs CUDA",
    "bf16": "bf16 autocast on the CPU is ~20x slower than fp32 here (README); AMP is measured on CUDA only",
    "dali": "the trainer uses DALI on CUDA only (its CPU-only mode is benchmarked alone in bench_loaders.py)",
}


def train_images(batch_size: int) -> int:
    # CPU: 2 steps at batch 128, 1 step at batch 512 (ResNet-18 does ~30 img/s on 2 cores)
    return env_int("TRAIN_IMAGES", 50_000, max(256, batch_size))


def _allow_recompiles() -> None:
    """Each compiled configuration here adds a Dynamo cache entry on the same ResNet code; past the default
    limit of 8 Dynamo would silently fall back to eager."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), 64))


def random_dataset(n_train: int, n_test: int) -> Dataset:
    rng = np.random.default_rng(0)

    def images(n):
        return rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)

    def labels(n):
        return rng.integers(0, 10, size=n, dtype=np.int64)

    return Dataset(images(n_train), labels(n_train), images(n_test), labels(n_test),
                   tuple(f"class-{c}" for c in range(10)), f"random uint8 ({n_train} train / {n_test} test)",
                   synthetic=True)


def _skip_on_cpu(*what: str) -> None:
    for item in what:
        if not CUDA and item in CPU_SKIPS:
            pytest.skip(CPU_SKIPS[item])


def _skip_untimed_on_cpu(benchmark, why: str) -> None:
    """Plain `pytest` runs each benchmark once as a smoke test; on the CPU the costliest are timed runs only."""
    if not CUDA and benchmark.disabled:
        pytest.skip(f"{why}: on the CPU only with --benchmark-only (a plain test run keeps the cheaper ones)")


_SESSIONS: dict = {}


def session(recipe: str, n_train: int | None = None, **overrides):
    """The Session fit() builds for `recipe` on this machine (nothing written), built once per configuration."""
    key = (recipe, n_train, tuple(sorted(overrides.items())))
    if key not in _SESSIONS:
        cfg = build_config(recipe, dataset="synthetic", wandb="off", progress="off", report=False, **overrides)
        if cfg.loader == "dali":
            pytest.importorskip("nvidia.dali")
        res = resolve(cfg)
        if res.compile:
            _allow_recompiles()
        res.eval_batch_size = min(res.eval_batch_size, EVAL_IMAGES)
        ds = random_dataset(n_train or train_images(cfg.batch_size), EVAL_IMAGES)
        _SESSIONS[key] = (build_session(cfg, DistInfo(), ds, res), itertools.count())  # epochs keep rising
    return _SESSIONS[key]


def session_info(s) -> dict:
    return {"recipe": s.cfg.recipe, "batch_size": s.cfg.batch_size, "optimizer": s.cfg.optimizer,
            "loader": s.res.loader, "compile": s.res.compile, "cuda_graphs": s.res.cuda_graphs,
            "graph_captured": s.stepper.captured, "channels_last": s.res.channels_last,
            "dtype": precision_name(s.res.amp_dtype, DEVICE.type), "monitor": s.monitor is not None, **base_info()}


def flops_info(images_per_s: float, amp_dtype) -> dict:
    """Achieved training FLOP/s (FlopCounterMode forward+backward per image) and, on CUDA, MFU."""
    peak = flops.peak_tflops(device_name(), precision_name(amp_dtype, DEVICE.type)) if CUDA else None
    info = flops.throughput(images_per_s, flops.training_flops_per_image(num_classes=10), DEVICE.type, peak)
    return {**{k: round(v, 4) for k, v in info.items() if v is not None}, "peak_tflops": peak}


def _epoch_run(benchmark, s, counter, rounds: int) -> tuple[Timed, list[int]]:
    epochs = []

    def one_epoch(_):
        epochs.append(next(counter))
        return train_one_epoch(s, epochs[-1], None)

    run = Timed(one_epoch)
    benchmark.pedantic(run, rounds=rounds, warmup_rounds=WARMUP, iterations=1)
    return run, epochs


@pytest.mark.parametrize("loader", ["torch", "dali"])
@pytest.mark.parametrize("batch_size", sorted(RECIPE_OF_BATCH), ids=lambda b: f"batch{b}")
def test_epoch(benchmark, batch_size, loader):
    """One training epoch end to end: loader + forward + loss + backward + optimizer + schedule + monitor
    samples (on, at the default 4 per epoch, as `fastcifar train` runs). No evaluation."""
    _skip_on_cpu(loader)
    if batch_size == 512:
        _skip_untimed_on_cpu(benchmark, "one 512-image step takes ~10 s here")
    benchmark.group = "epoch (train_one_epoch)"
    s, counter = session(RECIPE_OF_BATCH[batch_size], loader=loader)
    run, _ = _epoch_run(benchmark, s, counter, ROUNDS)
    images = len(s.train_loader) * batch_size
    rates = rate_info(run.timed(WARMUP), images)
    publish(benchmark, {
        **session_info(s), "train_images": train_images(batch_size), "augment": s.cfg.augment,
        "images_per_epoch": images, "steps_per_epoch": len(s.train_loader), "includes": "data+fwd+bwd+optimizer",
        **rates, **flops_info(rates["images_per_s_median"], s.res.amp_dtype)})
    assert images == (train_images(batch_size) // batch_size) * batch_size


_MONITOR_SECONDS: dict[str, tuple[float, float]] = {}  # "off"/"on" -> (median, best) epoch seconds


@pytest.mark.parametrize("monitor", ["off", "on"])  # off first: "on" reports its overhead against it
def test_monitoring(benchmark, monitor):
    """The worksheet epoch with cfg.monitor False vs True (default sampling: grad_every=None, ~4 per epoch)."""
    _skip_untimed_on_cpu(benchmark, "two epochs of the worksheet session; the monitor is tested in tests/")
    benchmark.group = "monitoring overhead (worksheet epoch)"
    base, counter = session("worksheet", loader="torch")
    # What build_session makes with cfg.monitor=False differs only in having no monitor and (with CUDA graphs)
    # no monitored graph; sharing the model keeps one compiled model and one set of captured graphs.
    s = base if monitor == "on" else dataclasses.replace(
        base, cfg=dataclasses.replace(base.cfg, monitor=False), monitor=None)
    run, epochs = _epoch_run(benchmark, s, counter, ROUNDS)
    steps = len(s.train_loader)
    images = steps * s.cfg.batch_size
    timed = run.timed(WARMUP)
    _MONITOR_SECONDS[monitor] = (float(np.median(timed)), min(timed))
    info = {**session_info(s), "images_per_epoch": images, "steps_per_epoch": steps, **rate_info(timed, images)}
    if s.monitor is not None:
        samples = [sum(s.monitor.should_sample(e, k) for k in range(steps)) for e in epochs[WARMUP:] or epochs]
        info["grad_samples_per_epoch"] = float(np.mean(samples))
        if "off" in _MONITOR_SECONDS:  # target: < 2 % of the epoch; recorded, never asserted (wall clock)
            (on, on_best), (off, off_best) = _MONITOR_SECONDS["on"], _MONITOR_SECONDS["off"]
            info["overhead_pct_vs_off"] = round(100 * (on - off) / off, 2)  # medians
            info["overhead_pct_vs_off_best"] = round(100 * (on_best - off_best) / off_best, 2)  # less noise-prone
            info["overhead_s_per_sample"] = round((on - off) / max(info["grad_samples_per_epoch"], 1), 4)
        if steps < 8:
            info["note"] = "fewer than 8 steps per epoch: every step or every other is sampled (CPU subset)"
    publish(benchmark, info)


@pytest.mark.parametrize("recipe", ["worksheet", "fast"])
def test_eval(benchmark, recipe):
    """The evaluation pass alone: eval loader (normalise, pad the last batch) + forward (+ the flip TTA forward
    for the fast recipe) + loss/accuracy sums."""
    benchmark.group = "evaluation (evaluate)"
    s, _ = session(recipe, loader="torch")
    run = Timed(lambda _: evaluate(s))
    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
    images = s.eval_loader.num_images
    publish(benchmark, {**session_info(s), "eval_images": images, "eval_batch_size": s.eval_loader.batch_size,
                        "tta": s.cfg.tta, "includes": "eval loader+fwd+loss", **rate_info(run.timed(WARMUP), images)})
    assert images == EVAL_IMAGES


# eager: no compile; compile: torch.compile, step launched from Python; compile+graph: the trainer's default on
# CUDA, the whole step in one CUDA graph; reduce-overhead: torch.compile's own CUDA graphs of forward and backward,
# the optimizer and the rest launched from Python (the alternative the trainer's choice is measured against).
STEP_MODES = {"eager": dict(compile="off", cuda_graphs="off"), "compile": dict(compile="on", cuda_graphs="off"),
              "compile+graph": dict(compile="on", cuda_graphs="on"),
              "reduce-overhead": dict(compile="off", cuda_graphs="off")}  # compiled below, in its own mode
STEP_CONFIGS = [(mode, layout, precision) for layout in ("channels_last", "contiguous")
                for precision in ("bf16", "fp32") for mode in STEP_MODES]  # the trainer's choice first


@pytest.mark.parametrize("mode,layout,precision", STEP_CONFIGS, ids=["-".join(c) for c in STEP_CONFIGS])
def test_step(benchmark, mode, layout, precision):
    """The trainer's step alone (session.stepper -> train.train_step) on one fixed batch already on the device:
    autocast forward + cross-entropy, backward, fused Adam, the device-side LR schedule, the step bookkeeping."""
    _skip_on_cpu(precision, *mode.split("+"))
    benchmark.group = f"step alone (batch {STEP_BATCH})"
    s, _ = session("worksheet", n_train=STEP_BATCH * STEPS_PER_CALL, batch_size=STEP_BATCH, loader="torch",
                   monitor=False, channels_last="on" if layout == "channels_last" else "off",
                   amp="bf16" if precision == "bf16" else "off", **STEP_MODES[mode])
    if mode == "reduce-overhead" and not hasattr(s, "_reduce_overhead"):
        s.step_model = s._reduce_overhead = torch.compile(s.model, mode="reduce-overhead", dynamic=False)
    images, labels = next(iter(s.train_loader))  # in the training dtype and layout, as the loader hands them over
    s.model.train()

    def steps(_):
        s.step_index.zero_()
        for _ in range(STEPS_PER_CALL):
            s.stepper(images, labels, False)
        return s.step_losses[:STEPS_PER_CALL]

    run = Timed(steps)
    warmup = 2 if CUDA else WARMUP  # CUDA: compile + autotune + capture in the first, a settled second
    losses = benchmark.pedantic(run, rounds=STEP_ROUNDS, warmup_rounds=warmup, iterations=1)
    timed = run.timed(warmup)
    rates = rate_info(timed, STEPS_PER_CALL * STEP_BATCH)
    publish(benchmark, {
        **session_info(s), "mode": mode, "batch_size": STEP_BATCH, "steps_per_round": STEPS_PER_CALL,
        "includes": "fwd+loss+bwd+optimizer+schedule (no data)",
        "ms_per_step_median": round(1000 * rates["seconds_median"] / STEPS_PER_CALL, 3),
        **rates, **flops_info(rates["images_per_s_median"], s.res.amp_dtype)})
    assert torch.isfinite(losses).all().item()
