"""Canonical CIFAR-10 python files -> validated uint8 arrays (N, 32, 32, 3) and int64 labels.

Checks structure, shapes and label range; a checksum that differs from the official archive's is a
warning, not an error (re-encoded copies exist and are legitimate). Also: download with md5, a seeded
class-balanced subset, and a small learnable synthetic set for CPU checks.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fastcifar import FastCifarError

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
BATCH_DIR = "cifar-10-batches-py"
# The official files' md5 sums (as published with the archive and used by torchvision).
TRAIN_FILES = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
}
TEST_FILES = {"test_batch": "40351d587109b95175f43aff81a1287e"}
META_FILE = ("batches.meta", "5ff9c542aee3614f3951f8cda6e48888")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# The normalisation the loaders apply (x/255 - mean) / std, per channel. CIFAR-10's are the values the report used
# (and most CIFAR-10 code copies: the means of the training set; 0.2023.. is the std as commonly circulated, a little
# below the per-pixel std 0.2470, 0.2435, 0.2616). The synthetic set uses CIFAR-10's; CIFAR-100's are in cifar100.py.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)


@dataclass
class Dataset:
    """uint8 images (N, 32, 32, 3) HWC as stored, int64 labels (N,), and what they are."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: tuple[str, ...]
    description: str  # printed and recorded, e.g. "CIFAR-10 (…)" or "SYNTHETIC …"
    synthetic: bool = False
    mean: tuple[float, ...] = CIFAR10_MEAN  # per-channel normalisation in [0, 1] units
    std: tuple[float, ...] = CIFAR10_STD
    val_images: np.ndarray | None = None  # --val-split: training images held out to choose the best epoch
    val_labels: np.ndarray | None = None


def default_data_dir() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "fastcifar"


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _unpickle(path: Path, what: str = "CIFAR-10") -> dict:
    try:
        with open(path, "rb") as f:
            obj = pickle.load(f, encoding="bytes")
    except FileNotFoundError:
        raise
    except PermissionError:
        raise FastCifarError(f"cannot read {what} file {path} (permission denied): fix its permissions, or "
                             f"point --data-dir at a copy you can read.") from None
    except Exception as exc:  # truncated or not a pickle at all
        raise FastCifarError(f"corrupt {what} file {path}: cannot be read ({type(exc).__name__}: {exc}). "
                             f"Delete it and download again, or point --data-dir at a good copy.") from None
    if not isinstance(obj, dict):
        raise FastCifarError(f"corrupt {what} file {path}: expected a pickled dict, found {type(obj).__name__}.")
    # The official files use bytes keys; re-pickled copies sometimes use str keys.
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _read_batch(path: Path, what: str = "CIFAR-10", label_key: str = "labels",
                num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    batch = _unpickle(path, what)
    if "data" not in batch or label_key not in batch:
        raise FastCifarError(f"corrupt {what} file {path}: missing 'data' or '{label_key}' (keys: {sorted(batch)}).")
    data = np.asarray(batch["data"])
    labels = np.asarray(batch[label_key])
    if data.ndim != 2 or data.shape[1] != 3072 or data.dtype != np.uint8:
        raise FastCifarError(f"corrupt {what} file {path}: 'data' has shape {data.shape} and dtype {data.dtype}, "
                             f"expected (N, 3072) uint8.")
    if labels.shape != (data.shape[0],):
        raise FastCifarError(f"corrupt {what} file {path}: {labels.shape} labels for {data.shape[0]} images.")
    if labels.size and (labels.min() < 0 or labels.max() > num_classes - 1):
        raise FastCifarError(f"corrupt {what} file {path}: labels outside 0..{num_classes - 1} "
                             f"(found {labels.min()}..{labels.max()}).")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # CHW rows -> HWC like the originals
    return np.ascontiguousarray(images), labels.astype(np.int64)


def _missing_paragraph(folder: Path, reason: str) -> str:
    return (f"CIFAR-10 is not available: {reason}\n"
            f"  looked in: {folder}\n"
            f"  expected:  {folder / BATCH_DIR}/data_batch_1..5, test_batch, batches.meta "
            f"(the python version of CIFAR-10)\n"
            f"  what to do: put cifar-10-python.tar.gz's contents there, or pass --data-dir DIR pointing at a "
            f"folder holding {BATCH_DIR}/, or run with --dataset synthetic to try fastcifar without the data.")


def download_cifar10(data_dir: Path, url: str | None = None) -> None:
    url = url or os.environ.get("FASTCIFAR_CIFAR_URL", CIFAR10_URL)
    download_archive(data_dir, url, "cifar-10-python.tar.gz", CIFAR10_ARCHIVE_MD5, BATCH_DIR, "CIFAR-10",
                     _missing_paragraph)


def download_archive(data_dir: Path, url: str, archive_name: str, md5: str, folder: str, what: str,
                     missing_paragraph) -> None:
    """Fetch the official archive into data_dir with torchvision's downloader (progress bar, redirects), check its
    md5, and unpack it atomically: into a temp folder first, then one rename of `folder`."""
    from torchvision.datasets.utils import calculate_md5, download_url, extract_archive

    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FastCifarError(f"cannot create the data folder {data_dir} ({exc.strerror or exc}): pass --data-dir "
                             f"with a folder you can write to.") from None
    with tempfile.TemporaryDirectory(dir=data_dir, prefix=".download-") as tmp:
        archive = Path(tmp) / archive_name
        try:
            download_url(url, tmp, filename=archive.name)
        except Exception as exc:
            raise FastCifarError(missing_paragraph(
                data_dir, f"it is not in the data folder and the download from {url} failed ({exc}).")) from None
        digest = calculate_md5(str(archive))
        if digest != md5:
            raise FastCifarError(f"downloaded archive from {url} has md5 {digest}, expected {md5}: "
                                 f"the download is corrupt or not {what}. Nothing was kept; try again.")
        extract_archive(str(archive), tmp)
        target = data_dir / folder
        try:
            os.replace(Path(tmp) / folder, target)
        except OSError:
            if not target.is_dir():  # else another process (a rank on another node) unpacked the same archive first
                raise


def load_cifar10(data_dir: str | Path | None = None, download: bool = True) -> Dataset:
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    folder = data_dir / BATCH_DIR
    try:
        blocker = next((p for p in (data_dir, *data_dir.parents) if p.exists() and not p.is_dir()), None)
    except OSError as exc:  # e.g. a name longer than the filesystem allows
        raise FastCifarError(f"--data-dir {data_dir}: {(exc.strerror or str(exc)).lower()}.") from None
    if blocker is not None:
        raise FastCifarError(f"--data-dir {data_dir}: {blocker} is a file, not a folder: pass the folder that holds "
                             f"(or is to hold) {BATCH_DIR}/.")
    if not folder.is_dir():
        if not download:
            raise FastCifarError(_missing_paragraph(data_dir, f"{folder} does not exist."))
        url = os.environ.get("FASTCIFAR_CIFAR_URL", CIFAR10_URL)
        print(f"CIFAR-10 not found in {data_dir}: downloading {url} (163 MB)…", flush=True)
        download_cifar10(data_dir, url)

    expected = {**TRAIN_FILES, **TEST_FILES, META_FILE[0]: META_FILE[1]}
    missing = [name for name in expected if not (folder / name).is_file()]
    if missing:
        raise FastCifarError(_missing_paragraph(data_dir, f"{folder} is incomplete: missing {', '.join(missing)}."))

    meta = _unpickle(folder / META_FILE[0])
    names = meta.get("label_names")
    if not isinstance(names, list) or len(names) != 10:
        raise FastCifarError(f"corrupt CIFAR-10 file {folder / META_FILE[0]}: expected 10 'label_names'.")
    classes = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)

    train = [_read_batch(folder / name) for name in TRAIN_FILES]
    test_images, test_labels = _read_batch(folder / "test_batch")
    train_images = np.concatenate([b[0] for b in train])
    train_labels = np.concatenate([b[1] for b in train])
    if len(train_images) != 50_000 or len(test_images) != 10_000:
        raise FastCifarError(f"corrupt CIFAR-10 in {folder}: {len(train_images)} training and {len(test_images)} "
                             f"test images, expected 50000 and 10000.")

    mismatched = [name for name, md5 in expected.items() if _md5(folder / name) != md5]
    description = f"CIFAR-10 from {folder}"
    if mismatched:
        # said once, here; the description keeps a two-word mark for the results and summary.json
        warnings.warn(f"{folder} is not the official CIFAR-10 (md5 differs in {len(mismatched)} of {len(expected)} "
                      f"files); its structure is valid, so it is used", stacklevel=2)
        description += " (unofficial copy)"
    return Dataset(train_images, train_labels, test_images, test_labels, classes, description)


def make_synthetic(train_size: int = 512, test_size: int = 256, seed: int = 0) -> Dataset:
    """A small learnable stand-in: each class a distinct saturated colour with its own stripe pattern, plus
    per-image brightness jitter and pixel noise. Clearly not CIFAR-10; every output that uses it says SYNTHETIC.

    Distinct colours matter: with only a few optimizer steps the batch-norm running statistics are still far
    from converged, and a task this separable stays well above chance in eval mode anyway.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:32, 0:32] / 31.0
    colours = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, 0, 1], [0, 1, 1], [1, .5, 0],
                        [.5, 0, 1], [0, .5, .5], [.5, .5, .5]])
    templates = []
    for c in range(10):
        fx, fy = 1 + c % 4, 1 + (c * 7) % 5
        stripes = 0.5 + 0.5 * np.sin(2 * np.pi * (fx * xx + fy * yy) + c)
        templates.append(0.15 + 0.7 * colours[c][None, None, :] * (0.7 + 0.3 * stripes[..., None]))
    templates = np.stack(templates)  # (10, 32, 32, 3) in [0, 1]

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = np.arange(n) % 10
        rng.shuffle(labels)
        images = templates[labels] + rng.normal(0.0, 0.12, size=(n, 32, 32, 3))
        images *= rng.uniform(0.8, 1.2, size=(n, 1, 1, 1))  # brightness jitter
        return np.clip(images * 255 + 0.5, 0, 255).astype(np.uint8), labels.astype(np.int64)

    train_images, train_labels = draw(train_size)
    test_images, test_labels = draw(test_size)
    classes = tuple(f"synthetic-{c}" for c in range(10))
    return Dataset(train_images, train_labels, test_images, test_labels, classes,
                   f"SYNTHETIC data ({train_size} train / {test_size} test, not CIFAR-10)", synthetic=True)


SYNTHETIC_DATA_SEED = 1234  # the synthetic set is the same whatever --seed, so runs compare


def load_dataset(dataset: str, data_dir=None, download: bool = True, train_subset: int | None = None,
                 test_subset: int | None = None, synthetic_size: int = 512, seed: int = 0) -> Dataset:
    """The dataset a run trains on: CIFAR-10, CIFAR-100 or the synthetic set, then its seeded class-balanced
    subsets."""
    if dataset == "synthetic":
        ds = make_synthetic(synthetic_size, max(synthetic_size // 2, 10), seed=SYNTHETIC_DATA_SEED)
    elif dataset == "cifar100":
        from fastcifar.data.cifar100 import load_cifar100

        ds = load_cifar100(data_dir, download=download)
    else:
        ds = load_cifar10(data_dir, download=download)
    return take_subsets(ds, train_subset, test_subset, seed)


def balanced_subset(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Indices of a seeded subset with (as nearly as possible) equal counts per class, in ascending order."""
    if size >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    base, extra = divmod(size, len(classes))
    chosen = [idx[: base + (1 if i < extra else 0)] for i, idx in enumerate(per_class)]
    return np.sort(np.concatenate(chosen))


def take_subsets(ds: Dataset, train_subset: int | None, test_subset: int | None, seed: int) -> Dataset:
    for flag, size, available in (("--train-subset", train_subset, len(ds.train_labels)),
                                  ("--test-subset", test_subset, len(ds.test_labels))):
        if size and size > available:
            raise FastCifarError(f"{flag} {size} is larger than the set it takes from ({available:,} images in "
                                 f"{ds.description}): pass at most {available}, or leave it out for all of them.")
    if train_subset:
        idx = balanced_subset(ds.train_labels, train_subset, seed)
        ds.train_images, ds.train_labels = ds.train_images[idx], ds.train_labels[idx]
    if test_subset:
        idx = balanced_subset(ds.test_labels, test_subset, seed + 1)
        ds.test_images, ds.test_labels = ds.test_images[idx], ds.test_labels[idx]
    if train_subset or test_subset:
        parts = [f"{len(ds.train_labels)} train"] * bool(train_subset)
        parts += [f"{len(ds.test_labels)} test"] * bool(test_subset)
        ds.description += f", subset {' / '.join(parts)}"
    return ds


def hold_out_validation(ds: Dataset, size: int, seed: int) -> Dataset:
    """--val-split: move a seeded, class-balanced `size` of the training images into a validation set (the
    training set keeps its order), so that choosing the best epoch never looks at the test set."""
    if not size:
        return ds
    if size >= len(ds.train_labels):
        raise FastCifarError(f"--val-split {size} leaves no training images: the training set has "
                             f"{len(ds.train_labels):,} ({ds.description}); pass fewer.")
    held = balanced_subset(ds.train_labels, size, seed + 2)  # seed + 2: apart from the subsets' draws
    keep = np.ones(len(ds.train_labels), dtype=bool)
    keep[held] = False
    ds.val_images, ds.val_labels = ds.train_images[held], ds.train_labels[held]
    ds.train_images, ds.train_labels = ds.train_images[keep], ds.train_labels[keep]
    ds.description += f", {size:,} training images held out for validation"
    return ds
