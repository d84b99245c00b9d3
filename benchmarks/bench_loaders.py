"""Throughput of each data loader alone: one pass (an epoch) over a fixed set of random uint8 CIFAR-shaped images.

    pytest benchmarks/bench_loaders.py --benchmark-only          # timed: 1 warm-up + 3 rounds per loader
    pytest benchmarks/bench_loaders.py --benchmark-disable       # each function once, as a smoke test

On CUDA the full 50,000-image training set size is used (bfloat16, channels_last: the training configuration);
on the CPU a 2,048-image subset in float32 keeps a run to a few seconds. Loader construction (moving the set to
the device, building the DALI pipeline) is outside the timed function; the per-epoch work (permutation, crops,
flips, normalisation, the cast, and for torchvision the DataLoader workers) is inside. CUDA is synchronised
inside the timed function. images/s (best and median round), the device, the sizes, the dtype and the torch /
DALI versions go into benchmark.extra_info (see --benchmark-json).
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from _common import CUDA, DEVICE, base_info, env_int, publish

from fastcifar.data.augment import parse_augment
from fastcifar.data.loaders import make_eval_loader, make_train_loader

NUM_IMAGES = env_int("IMAGES", 50_000, 2_048)
BATCH_SIZE = env_int("BATCH", 128, 128)
DTYPE = torch.bfloat16 if CUDA else torch.float32
CHANNELS_LAST = CUDA
TORCHVISION_WORKERS = 2


def _require(kind: str) -> None:
    if kind == "dali":
        pytest.importorskip("nvidia.dali")


@pytest.fixture(scope="module")
def dataset():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(NUM_IMAGES, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, size=NUM_IMAGES, dtype=np.int64)
    return images, labels


def _run(benchmark, loader, kind: str, role: str, *, epochs_differ: bool, augment: str | None = None):
    """Time one full pass over `loader` per round; record images/s in extra_info."""
    durations, images_per_pass, rounds = [], [0], [0]

    def one_pass():
        if epochs_differ:
            loader.set_epoch(rounds[0])  # a fresh permutation/augmentation every round, as in training
        rounds[0] += 1
        start = time.perf_counter()
        count, last = 0, None
        for images, _ in loader:
            count += images.shape[0]
            last = images
        if CUDA:
            torch.cuda.synchronize(DEVICE)
        durations.append(time.perf_counter() - start)
        images_per_pass[0] = count
        return last

    benchmark.group = f"{role} loader alone"
    benchmark.pedantic(one_pass, rounds=3, warmup_rounds=1, iterations=1)
    timed = durations[1:] if len(durations) > 1 else durations  # drop the warm-up where there is one
    publish(benchmark, {
        "loader": kind, "role": role, "augment": augment, **base_info(), "num_images": NUM_IMAGES,
        "images_per_pass": images_per_pass[0], "batch_size": BATCH_SIZE, "dtype": str(DTYPE).replace("torch.", ""),
        "channels_last": CHANNELS_LAST,
        "torchvision_workers": TORCHVISION_WORKERS if kind == "torchvision" else None,
        "images_per_s_best": round(images_per_pass[0] / min(timed)),
        "images_per_s_median": round(images_per_pass[0] / float(np.median(timed))),
        "seconds_median": round(float(np.median(timed)), 4),
    })
    assert images_per_pass[0] == len(loader) * BATCH_SIZE


@pytest.mark.parametrize("augment", ["crop,flip", "crop,flip,cutout=8"])  # the worksheet's, the fast recipe's
@pytest.mark.parametrize("kind", ["torch", "torchvision", "dali"])
def test_train_loader_throughput(benchmark, dataset, kind, augment):
    _require(kind)
    if kind == "torchvision" and "cutout" in augment:
        pytest.skip("the torchvision baseline is timed with the report's augmentation only")
    images, labels = dataset
    loader = make_train_loader(kind, images, labels, BATCH_SIZE, DEVICE, DTYPE, CHANNELS_LAST, seed=0,
                               num_workers=TORCHVISION_WORKERS, augment=parse_augment(augment))
    _run(benchmark, loader, kind, "train", epochs_differ=True, augment=augment)


@pytest.mark.parametrize("kind", ["torch", "dali"])
def test_eval_loader_throughput(benchmark, dataset, kind):
    _require(kind)
    images, labels = dataset
    loader = make_eval_loader(kind, images, labels, BATCH_SIZE, DEVICE, DTYPE, CHANNELS_LAST)
    _run(benchmark, loader, kind, "eval", epochs_differ=False)
