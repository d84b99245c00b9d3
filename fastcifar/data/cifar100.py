"""CIFAR-100 (`--dataset cifar100`): the canonical cifar-100-python/ files -> the same validated Dataset as CIFAR-10,
with its 100 fine labels and its own normalisation.

Layout (the python version of the official archive, as torchvision reads it): `train` (50,000 images) and `test`
(10,000), pickled dicts with 'data' (N, 3072) uint8 CHW rows and 'fine_labels' 0..99 (and 'coarse_labels', the
20 superclasses, not used), and `meta` with the 100 'fine_label_names'. The same checks and messages as CIFAR-10
(structure, shapes, label range; an md5 that differs from the official files' is a warning), download with the
archive's md5 checked.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

from fastcifar import FastCifarError
from fastcifar.data.cifar import Dataset, _md5, _read_batch, _unpickle, default_data_dir, download_archive

CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
CIFAR100_ARCHIVE = "cifar-100-python.tar.gz"
CIFAR100_DIR = "cifar-100-python"
# The official archive's and files' md5 sums (as published with the archive and used by torchvision).
CIFAR100_ARCHIVE_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
CIFAR100_FILES = {"train": "16019d7e3df5f24257cddd939b257f8d", "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
                  "meta": "7973b15100ade9c7d40fb424638fde48"}
CIFAR100_SIZES = {"train": 50_000, "test": 10_000}
CIFAR100_CLASSES = 100
# Per-channel mean and standard deviation of the 50,000 training images in [0, 1], over all their pixels: the
# values published by the widely used pytorch-cifar100 project (github.com/weiaicunzai/pytorch-cifar100,
# conf/global_settings.py, from its utils.compute_mean_std), rounded to 4 places. `channel_stats` computes them
# from the files: on the official CIFAR-100 it gives these.
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
WHAT = "CIFAR-100"


def channel_stats(images_nhwc_uint8: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) standard deviation over all pixels, in [0, 1] units."""
    pixels = images_nhwc_uint8.reshape(-1, images_nhwc_uint8.shape[-1]).astype(np.float64) / 255.0
    return tuple(pixels.mean(0).tolist()), tuple(pixels.std(0).tolist())


def _missing_paragraph(folder: Path, reason: str) -> str:
    return (f"CIFAR-100 is not available: {reason}\n"
            f"  looked in: {folder}\n"
            f"  expected:  {folder / CIFAR100_DIR}/train, test, meta (the python version of CIFAR-100)\n"
            f"  what to do: put {CIFAR100_ARCHIVE}'s contents there, or pass --data-dir DIR pointing at a folder "
            f"holding {CIFAR100_DIR}/, or run with --dataset synthetic to try fastcifar without the data.")


def download_cifar100(data_dir: Path, url: str | None = None) -> None:
    url = url or os.environ.get("FASTCIFAR_CIFAR100_URL", CIFAR100_URL)
    download_archive(data_dir, url, CIFAR100_ARCHIVE, CIFAR100_ARCHIVE_MD5, CIFAR100_DIR, WHAT, _missing_paragraph)


def load_cifar100(data_dir: str | Path | None = None, download: bool = True) -> Dataset:
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    folder = data_dir / CIFAR100_DIR
    if not folder.is_dir():
        if not download:
            raise FastCifarError(_missing_paragraph(data_dir, f"{folder} does not exist."))
        url = os.environ.get("FASTCIFAR_CIFAR100_URL", CIFAR100_URL)
        print(f"CIFAR-100 not found in {data_dir}: downloading {url} (161 MB)…", flush=True)
        download_cifar100(data_dir, url)

    missing = [name for name in CIFAR100_FILES if not (folder / name).is_file()]
    if missing:
        raise FastCifarError(_missing_paragraph(data_dir, f"{folder} is incomplete: missing {', '.join(missing)}."))
    meta = _unpickle(folder / "meta", WHAT)
    names = meta.get("fine_label_names")
    if not isinstance(names, list) or len(names) != CIFAR100_CLASSES:
        raise FastCifarError(f"corrupt CIFAR-100 file {folder / 'meta'}: expected {CIFAR100_CLASSES} "
                             f"'fine_label_names'.")
    classes = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)

    parts = {name: _read_batch(folder / name, WHAT, "fine_labels", CIFAR100_CLASSES) for name in CIFAR100_SIZES}
    counts = {name: len(parts[name][1]) for name in parts}
    if counts != CIFAR100_SIZES:
        raise FastCifarError(f"corrupt CIFAR-100 in {folder}: {counts['train']} training and {counts['test']} test "
                             f"images, expected {CIFAR100_SIZES['train']} and {CIFAR100_SIZES['test']}.")

    mismatched = [name for name, md5 in CIFAR100_FILES.items() if _md5(folder / name) != md5]
    description = f"CIFAR-100 from {folder}"
    if mismatched:
        warnings.warn(f"{folder}: md5 of {', '.join(mismatched)} differs from the official archive; the structure "
                      f"is valid, so loading it (a re-encoded copy gives accuracy close to, not equal to, the "
                      f"original's).", stacklevel=2)
        description += " (not the official files: md5 differs)"
    (train_images, train_labels), (test_images, test_labels) = parts["train"], parts["test"]
    return Dataset(train_images, train_labels, test_images, test_labels, classes, description,
                   mean=CIFAR100_MEAN, std=CIFAR100_STD)
