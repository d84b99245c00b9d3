"""CIFAR files: the good path, the md5 warning, every corruption path, download, subsets, synthetic."""

import io
import pickle
import shutil
import tarfile
import warnings

import numpy as np
import pytest

from support import write_batch
from fastcifar import FastCifarError
from fastcifar.cli import main
from fastcifar.data import cifar
from fastcifar.data.cifar import balanced_subset, load_cifar10, make_synthetic


def test_valid_files_with_other_md5_load_with_one_warning(fake_cifar):
    with pytest.warns(UserWarning, match=r"is not the official CIFAR-10 \(md5 differs in 7 of 7 files\)"):
        ds = load_cifar10(fake_cifar, download=False)
    assert ds.train_images.shape == (50_000, 32, 32, 3) and ds.train_images.dtype == np.uint8
    assert ds.test_images.shape == (10_000, 32, 32, 3)
    assert ds.train_labels.dtype == np.int64 and set(np.unique(ds.train_labels)) == set(range(10))
    assert ds.classes[0] == "airplane" and ds.description.endswith("(unofficial copy)")


def test_pixel_layout_is_hwc_from_chw_rows(tmp_path, cifar_copy):
    folder = cifar_copy / "cifar-10-batches-py"
    images = np.zeros((10_000, 32, 32, 3), np.uint8)
    images[0, 1, 2] = (10, 20, 30)  # row 1, column 2: red, green, blue
    (folder / "test_batch").unlink()
    write_batch(folder / "test_batch", images, np.zeros(10_000, int))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = load_cifar10(cifar_copy, download=False)
    assert tuple(ds.test_images[0, 1, 2]) == (10, 20, 30)


def _replace(folder, name, payload: bytes):
    (folder / name).unlink()
    (folder / name).write_bytes(payload)


def _pickled(obj) -> bytes:
    return pickle.dumps(obj)


@pytest.mark.parametrize("case, expected", [
    ("truncated", r"corrupt CIFAR-10 file .*data_batch_3: cannot be read"),
    ("not_a_dict", r"corrupt CIFAR-10 file .*data_batch_3: expected a pickled dict"),
    ("wrong_shape", r"corrupt CIFAR-10 file .*data_batch_3: 'data' has shape \(10000, 1024\)"),
    ("bad_labels", r"corrupt CIFAR-10 file .*data_batch_3: labels outside 0..9 \(found 0..12\)"),
    ("missing_meta", r"incomplete: missing batches.meta"),
    ("missing_key", r"corrupt CIFAR-10 file .*data_batch_3: missing 'data' or 'labels'"),
])
def test_corrupt_data_is_one_clear_message_naming_the_file(cifar_copy, case, expected, capsys):
    folder = cifar_copy / "cifar-10-batches-py"
    good = (folder / "data_batch_3").read_bytes()
    if case == "truncated":
        _replace(folder, "data_batch_3", good[: len(good) // 3])
    elif case == "not_a_dict":
        _replace(folder, "data_batch_3", _pickled([1, 2, 3]))
    elif case == "wrong_shape":
        _replace(folder, "data_batch_3", _pickled({b"data": np.zeros((10_000, 1024), np.uint8), b"labels": [0] * 10_000}))
    elif case == "bad_labels":
        _replace(folder, "data_batch_3", _pickled({b"data": np.zeros((10_000, 3072), np.uint8),
                                                   b"labels": [12] + [0] * 9_999}))
    elif case == "missing_meta":
        (folder / "batches.meta").unlink()
    elif case == "missing_key":
        _replace(folder, "data_batch_3", _pickled({b"pixels": np.zeros((10_000, 3072), np.uint8)}))
    with pytest.raises(FastCifarError, match=expected):
        load_cifar10(cifar_copy, download=False)
    # Through the CLI: the same message, exit 1, no traceback.
    rc = main(["train", "--data-dir", str(cifar_copy), "--no-download", "--epochs", "1", "--wandb", "off",
               "--run-dir", str(cifar_copy.parent / "run")])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
    assert err.startswith("fastcifar train: error: ")
    assert not (cifar_copy.parent / "run").exists()  # no empty run directory left behind


def test_missing_data_without_download_says_where_and_what_to_do(tmp_path):
    with pytest.raises(FastCifarError) as info:
        load_cifar10(tmp_path / "nowhere", download=False)
    message = str(info.value)
    assert str(tmp_path / "nowhere") in message and "--data-dir" in message and "--dataset synthetic" in message


def test_failed_download_offline_is_a_clear_paragraph(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTCIFAR_CIFAR_URL", "http://127.0.0.1:9/cifar-10-python.tar.gz")  # refused at once
    with pytest.raises(FastCifarError, match=r"(?s)download from http://127.0.0.1:9/.* failed.*--dataset synthetic"):
        load_cifar10(tmp_path / "cache", download=True)
    assert not (tmp_path / "cache" / "cifar-10-batches-py").exists()


def _archive_of(folder) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    return buffer.getvalue()


@pytest.fixture
def http_server(tmp_path):
    """A loopback HTTP server over tmp_path/served: the download goes through torchvision's real downloader."""
    import functools
    import http.server
    import threading

    root = tmp_path / "served"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_download_checks_md5_then_unpacks(fake_cifar, tmp_path, monkeypatch, http_server):
    root, base = http_server
    archive = root / "cifar-10-python.tar.gz"
    archive.write_bytes(_archive_of(fake_cifar / "cifar-10-batches-py"))
    monkeypatch.setenv("FASTCIFAR_CIFAR_URL", f"{base}/cifar-10-python.tar.gz")
    with pytest.raises(FastCifarError, match="has md5 .* expected c58f30108f718f92721af3b95e74349a"):
        load_cifar10(tmp_path / "cache", download=True)
    assert not (tmp_path / "cache" / "cifar-10-batches-py").exists()
    monkeypatch.setattr(cifar, "CIFAR10_ARCHIVE_MD5", cifar._md5(archive))  # as if this were the official file
    with pytest.warns(UserWarning, match="md5"):
        ds = load_cifar10(tmp_path / "cache", download=True)
    assert len(ds.train_labels) == 50_000


def test_a_download_finished_first_by_another_process_is_kept(fake_cifar, tmp_path, monkeypatch, http_server):
    """Ranks on several nodes sharing one folder may download at once: the first unpacked folder stays, in use
    by its reader; the later one is dropped, not swapped in underneath it."""
    root, base = http_server
    archive = root / "cifar-10-python.tar.gz"
    archive.write_bytes(_archive_of(fake_cifar / "cifar-10-batches-py"))
    monkeypatch.setattr(cifar, "CIFAR10_ARCHIVE_MD5", cifar._md5(archive))
    first = tmp_path / "cache" / "cifar-10-batches-py"
    shutil.copytree(fake_cifar / "cifar-10-batches-py", first)
    (first / "opened-by-another-rank").write_text("")
    cifar.download_cifar10(tmp_path / "cache", f"{base}/cifar-10-python.tar.gz")
    assert (first / "opened-by-another-rank").exists() and (first / "test_batch").is_file()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["cifar-10-batches-py"]  # no temp folder left


def test_balanced_subset_is_seeded_and_balanced():
    labels = np.repeat(np.arange(10), 100)
    a, b = balanced_subset(labels, 250, seed=3), balanced_subset(labels, 250, seed=3)
    assert np.array_equal(a, b) and len(a) == 250 and len(set(a)) == 250
    counts = np.bincount(labels[a], minlength=10)
    assert counts.max() - counts.min() <= 1
    assert not np.array_equal(a, balanced_subset(labels, 250, seed=4))


def test_synthetic_set_is_labelled_and_cifar_shaped():
    ds = make_synthetic(100, 40, seed=0)
    assert ds.synthetic and "SYNTHETIC" in ds.description
    assert ds.train_images.shape == (100, 32, 32, 3) and ds.train_images.dtype == np.uint8
    assert np.bincount(ds.train_labels, minlength=10).tolist() == [10] * 10
    assert np.array_equal(make_synthetic(100, 40, seed=0).train_images, ds.train_images)
