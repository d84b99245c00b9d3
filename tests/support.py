"""Test helpers: fake CIFAR-10 files made here (never ../shared), a tiny config, and a CLI runner."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def write_batch(path: Path, images_nhwc: np.ndarray, labels, key_type=bytes) -> None:
    k = (lambda s: s.encode()) if key_type is bytes else (lambda s: s)
    data = images_nhwc.transpose(0, 3, 1, 2).reshape(len(images_nhwc), -1)
    with open(path, "wb") as f:
        pickle.dump({k("batch_label"): k("fake"), k("labels"): list(map(int, labels)), k("data"): data,
                     k("filenames"): []}, f)


def make_fake_cifar(root: Path, seed: int = 0) -> Path:
    """The canonical python layout with random pixels (structure right, md5 not the official one)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for name in ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]:
        images = rng.integers(0, 256, size=(10_000, 32, 32, 3), dtype=np.uint8)
        write_batch(folder / name, images, np.arange(10_000) % 10)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [c.encode() for c in ("airplane", "automobile", "bird", "cat", "deer", "dog",
                                                            "frog", "horse", "ship", "truck")]}, f)
    return root


def run_cli(*args: str, env: dict | None = None, cwd: Path | None = None, timeout: int = 300):
    """The real command line, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "fastcifar", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd or REPO, env={**os.environ, "WANDB_MODE": "disabled", **(env or {})})


TINY = dict(dataset="synthetic", synthetic_size=32, batch_size=8, epochs=2, wandb="off", report=False,
            progress="off")


def tiny_config(run_dir, **overrides):
    """The TINY synthetic configuration writing to run_dir, with overrides (fastcifar imported here: the CLI tests
    that only need run_cli stay torch-free at import)."""
    from fastcifar.config import build_config

    return build_config(**{**TINY, **overrides}, run_dir=str(run_dir))


TIMING_WORDS = ("time", "per_s", "flops", "elapsed", "compile")


def without_timings(rows: list[dict]) -> list[dict]:
    """Metrics rows without their wall-clock fields: what two runs of the same seed must agree on exactly."""
    return [{k: v for k, v in r.items() if not any(word in k for word in TIMING_WORDS)} for r in rows]


def make_fake_cifar100(root: Path, train: int = 200, test: int = 100, seed: int = 0) -> Path:
    """The canonical cifar-100-python/ layout (train, test, meta; fine and coarse labels), small: tests
    monkeypatch cifar100.CIFAR100_SIZES to these counts."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for name, n in (("train", train), ("test", test)):
        images = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
        fine = np.arange(n) % 100
        with open(folder / name, "wb") as f:
            pickle.dump({b"filenames": [], b"batch_label": b"fake", b"fine_labels": fine.tolist(),
                         b"coarse_labels": (fine // 5).tolist(),
                         b"data": images.transpose(0, 3, 1, 2).reshape(n, -1)}, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [f"class{c}".encode() for c in range(100)],
                     b"coarse_label_names": [f"super{c}".encode() for c in range(20)]}, f)
    return root
