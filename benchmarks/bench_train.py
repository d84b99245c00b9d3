"""Training speed: a whole epoch through the real trainer, monitoring on vs off, the evaluation pass, and the
training step alone across eager/compile x channels_last/contiguous x bf16/fp32.

    pytest benchmarks/bench_train.py --benchmark-only     # timed (warm-up rounds first, then ROUNDS rounds)
    pytest benchmarks/bench_train.py                      # each once, untimed: a smoke test (benchmarks/conftest.py)

The epoch, monitoring and evaluation benchmarks build a `Session` exactly as `fit()` does (`_setup` with the
recipe's config and what `resolve()` picks on this machine) over random uint8 CIFAR-shaped images, and time
`train_one_epoch` / `evaluate` themselves: data loading and augmentation, forward, backward, optimizer and
scheduler, the monitor's samples when on; no evaluation in the epoch, no checkpoint, no logging (run=None).
One session per recipe is built once and shared, so torch.compile and cudnn autotuning happen in the first
warm-up round that uses it. Every timed call synchronises CUDA before it returns.

Sizes (FASTCIFAR_BENCH_* environment variables override them; see benchmarks/README.md):
  CUDA: a 50,000-image training epoch (390 steps at batch 128, 97 at 512), evaluation over 10,000 images,
        3 timed rounds; the step benchmark times 50 steps per round, 5 rounds.
  CPU:  an "epoch" of 256 images at batch 128 (2 steps) and 512 at batch 512 (1 step), evaluation over 256
        images, 2 timed rounds; 1 step per round. ResNet-18 trains at ~30 img/s on 2 cores, so that is what fits
        in a few minutes. torch.compile and bf16 are skipped on the CPU (see the skip reasons).
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _common import CUDA, DEVICE, Timed, base_info, device_name, dtype_name, env_int, publish, rate_info, sync

from fastcifar import flops
from fastcifar.config import build_config, resolve
from fastcifar.data.cifar import Dataset
from fastcifar.distributed import DistInfo
from fastcifar.model import resnet18_cifar
from fastcifar.train import _setup, build_optimizer, evaluate, train_one_epoch

RECIPE_OF_BATCH = {128: "worksheet", 512: "fast"}  # the report's batch, and the throughput recipe's
EVAL_IMAGES = env_int("EVAL_IMAGES", 10_000, 256)
ROUNDS = env_int("ROUNDS", 3, 2)
WARMUP = 1  # compile + cudnn autotune on CUDA, first-touch allocations on the CPU: never timed
STEP_BATCH = env_int("STEP_BATCH", 128, 128)
STEPS_PER_CALL = env_int("STEPS", 50, 1)  # one CUDA step is a few ms: time many between two syncs
STEP_ROUNDS = env_int("STEP_ROUNDS", 5, 2)

CPU_SKIPS = {
    "compile": "torch.compile on the CPU costs ~60 s to compile for no speed-up (README); measured on CUDA only",
    "bf16": "bf16 autocast on the CPU is ~20x slower than fp32 here (README); AMP is measured on CUDA only",
}


def train_images(batch_size: int) -> int:
    # CPU: 2 steps at batch 128, 1 step at batch 512 (ResNet-18 does ~30 img/s on 2 cores)
    return env_int("TRAIN_IMAGES", 50_000, max(256, batch_size))


def _allow_recompiles() -> None:
    """Each compiled model here (2 sessions x train/eval, 4 step variants) adds a Dynamo cache entry on the
    same ResNet code; past the default limit of 8 Dynamo would silently fall back to eager."""
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


_SESSIONS: dict = {}


def session(recipe: str):
    """The recipe's Session as fit() builds it (run=None: nothing written), built once and shared."""
    if recipe not in _SESSIONS:
        cfg = build_config(recipe, dataset="synthetic", wandb="off", progress="off", report=False)
        res = resolve(cfg)
        if res.compile:
            _allow_recompiles()
        s = _setup(cfg, DistInfo(), None, random_dataset(train_images(cfg.batch_size), EVAL_IMAGES), res)
        _SESSIONS[recipe] = (s, itertools.count())  # epoch numbers keep rising across benchmarks
    return _SESSIONS[recipe]


def session_info(s) -> dict:
    return {"recipe": s.cfg.recipe, "batch_size": s.cfg.batch_size, "optimizer": s.cfg.optimizer,
            "loader": s.res.loader, "compile": s.res.compile, "channels_last": s.res.channels_last,
            "dtype": dtype_name(s.res.amp_dtype), "monitor": s.monitor is not None, **base_info()}


def flops_info(images_per_s: float, amp_dtype) -> dict:
    """Achieved training FLOP/s (FlopCounterMode forward+backward per image) and, on CUDA, MFU."""
    achieved = images_per_s * flops.training_flops_per_image(num_classes=10)
    if not CUDA:
        return {"achieved_gflops": round(achieved / 1e9, 2)}
    peak = flops.peak_tflops(device_name(), "bf16" if amp_dtype == torch.bfloat16 else
                             "fp16" if amp_dtype == torch.float16 else "tf32")
    return {"achieved_tflops": round(achieved / 1e12, 2), "peak_tflops": peak,
            "mfu": round(achieved / (peak * 1e12), 4) if peak else None}


def _epoch_run(benchmark, s, counter, rounds: int) -> tuple[Timed, list[int]]:
    epochs = []

    def one_epoch(_):
        epochs.append(next(counter))
        return train_one_epoch(s, epochs[-1], None)

    run = Timed(one_epoch)
    benchmark.pedantic(run, rounds=rounds, warmup_rounds=WARMUP, iterations=1)
    return run, epochs


@pytest.mark.parametrize("batch_size", sorted(RECIPE_OF_BATCH), ids=lambda b: f"batch{b}")
def test_epoch(benchmark, batch_size):
    """One training epoch end to end: loader + forward + loss + backward + optimizer + scheduler + monitor
    samples (on, at the default 4 per epoch, as `fastcifar train` runs). No evaluation."""
    benchmark.group = "epoch (train_one_epoch)"
    s, counter = session(RECIPE_OF_BATCH[batch_size])
    run, _ = _epoch_run(benchmark, s, counter, ROUNDS)
    images = len(s.train_loader) * batch_size
    rates = rate_info(run.timed(WARMUP), images)
    publish(benchmark, {
        **session_info(s), "train_images": train_images(batch_size),
        "images_per_epoch": images, "steps_per_epoch": len(s.train_loader), "includes": "data+fwd+bwd+optimizer",
        **rates, **flops_info(rates["images_per_s_median"], s.res.amp_dtype)})
    assert images == (train_images(batch_size) // batch_size) * batch_size


_MONITOR_SECONDS: dict[str, tuple[float, float]] = {}  # "off"/"on" -> (median, best) epoch seconds


@pytest.mark.parametrize("monitor", ["off", "on"])  # off first: "on" reports its overhead against it
def test_monitoring(benchmark, monitor):
    """The worksheet epoch with cfg.monitor False vs True (default sampling: grad_every=None, ~4 per epoch)."""
    benchmark.group = "monitoring overhead (worksheet epoch)"
    base, counter = session("worksheet")
    # The session fit() builds with cfg.monitor=False differs from the monitored one only in having no monitor;
    # sharing the model keeps one compiled graph for both.
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
    """The evaluation pass alone: eval loader (normalise, pad the last batch) + forward + loss/accuracy sums."""
    if not CUDA and recipe == "fast":
        pytest.skip("the fast recipe's eval batch (1000) exceeds the CPU's 256-image eval subset: "
                    "it would time padding; measured on CUDA only")
    benchmark.group = "evaluation (evaluate)"
    s, _ = session(recipe)
    run = Timed(lambda _: evaluate(s))
    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
    images = s.eval_loader.num_images
    publish(benchmark, {**session_info(s), "eval_images": images, "eval_batch_size": s.eval_loader.batch_size,
                        "includes": "eval loader+fwd+loss", **rate_info(run.timed(WARMUP), images)})
    assert images == EVAL_IMAGES


STEP_CONFIGS = [(mode, layout, precision) for layout in ("channels_last", "contiguous")
                for precision in ("bf16", "fp32") for mode in ("eager", "compile")]  # the trainer's choice first


@pytest.mark.parametrize("mode,layout,precision", STEP_CONFIGS, ids=["-".join(c) for c in STEP_CONFIGS])
def test_step(benchmark, mode, layout, precision):
    """One training step alone on a fixed batch already on the device, as train_one_epoch does it:
    autocast forward + cross-entropy, zero_grad, backward, optimizer.step (the worksheet's Adam; fused on CUDA)."""
    for what in (mode, precision):
        if not CUDA and what in CPU_SKIPS:
            pytest.skip(CPU_SKIPS[what])
    benchmark.group = f"step alone (batch {STEP_BATCH})"
    torch.manual_seed(0)
    if CUDA:  # what _setup sets for training
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    amp_dtype = torch.bfloat16 if precision == "bf16" else None
    model = resnet18_cifar(num_classes=10).to(DEVICE, memory_format=memory_format)
    step_model = model
    if mode == "compile":
        _allow_recompiles()
        step_model = torch.compile(model)
    optimizer = build_optimizer(build_config("worksheet"), model, DEVICE)
    # The loaders hand over images already in the training dtype and layout.
    images = torch.randn(STEP_BATCH, 3, 32, 32, device=DEVICE, dtype=amp_dtype or torch.float32)
    images = images.contiguous(memory_format=memory_format)
    labels = torch.randint(0, 10, (STEP_BATCH,), device=DEVICE)
    model.train()

    def steps(_):
        for _ in range(STEPS_PER_CALL):
            with torch.autocast(DEVICE.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                loss = F.cross_entropy(step_model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return loss

    run = Timed(steps)
    warmup = 2 if CUDA else WARMUP  # CUDA: compile + autotune in the first, a settled second
    loss = benchmark.pedantic(run, rounds=STEP_ROUNDS, warmup_rounds=warmup, iterations=1)
    sync()
    timed = run.timed(warmup)
    rates = rate_info(timed, STEPS_PER_CALL * STEP_BATCH)
    publish(benchmark, {
        **base_info(), "mode": mode, "channels_last": layout == "channels_last", "dtype": dtype_name(amp_dtype),
        "batch_size": STEP_BATCH, "steps_per_round": STEPS_PER_CALL, "includes": "fwd+loss+bwd+optimizer (no data)",
        "ms_per_step_median": round(1000 * rates["seconds_median"] / STEPS_PER_CALL, 3),
        **rates, **flops_info(rates["images_per_s_median"], amp_dtype)})
    assert torch.isfinite(loss).item()
