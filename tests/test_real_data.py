"""Real CIFAR-10 when an offline copy is at hand (../shared/data/cifar10 beside the repo, or FASTCIFAR_CIFAR_DIR
pointing at a folder holding cifar-10-batches-py/). Users without it skip these tests."""

import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from support import REPO, run_cli
from fastcifar.data.cifar import load_cifar10

SHARED = REPO.parent / "shared" / "data" / "cifar10"


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory) -> Path:
    if os.environ.get("FASTCIFAR_CIFAR_DIR"):
        return Path(os.environ["FASTCIFAR_CIFAR_DIR"])
    if not (SHARED / "build.py").exists() or not (SHARED / "cifar10_jpeg.npz").exists():
        pytest.skip("no offline CIFAR-10 copy here (../shared/data/cifar10 or FASTCIFAR_CIFAR_DIR)")
    out = tmp_path_factory.mktemp("real")
    subprocess.run([sys.executable, str(SHARED / "build.py"), str(out)], check=True, capture_output=True, timeout=300)
    return out


def test_real_cifar10_loads_in_canonical_order(cifar_dir):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = load_cifar10(cifar_dir, download=False)
    official = "FASTCIFAR_CIFAR_DIR" in os.environ
    assert official or any("md5" in str(w.message) for w in caught)  # the re-encoded copy: warned, still loaded
    assert ds.train_labels[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]
    assert ds.test_labels[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]
    assert np.bincount(ds.train_labels).tolist() == [5000] * 10
    mean = ds.train_images.reshape(-1, 3).mean(0) / 255
    assert np.allclose(mean, (0.4914, 0.4822, 0.4465), atol=2e-3)
    assert ds.classes == ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def test_real_data_subset_trains_through_the_cli(cifar_dir, tmp_path):
    result = run_cli("train", "--data-dir", str(cifar_dir), "--no-download", "--train-subset", "128",
                     "--test-subset", "100", "--batch-size", "64", "--epochs", "1", "--wandb", "off", "--no-report",
                     "--run-dir", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    assert "subset 128 train / 100 test" in " ".join(result.stdout.split())  # the header wraps at 120 columns
    assert "warning:" in result.stderr or "FASTCIFAR_CIFAR_DIR" in os.environ
    assert (tmp_path / "run" / "last.pt").exists()
