"""--dataset cifar100 with small fake files in the canonical cifar-100-python/ layout: loading, its normalisation,
every corruption path, download with md5, and training, eval and FLOPs through the command line."""

import io
import json
import pickle
import tarfile

import numpy as np
import pytest
import torch

from support import make_fake_cifar100
from fastcifar import FastCifarError
from fastcifar.cli import main
from fastcifar.data import cifar100
from fastcifar.data.cifar100 import CIFAR100_MEAN, CIFAR100_STD, channel_stats, load_cifar100

SIZES = {"train": 200, "test": 100}


@pytest.fixture(autouse=True)
def small_files(monkeypatch):
    monkeypatch.setattr(cifar100, "CIFAR100_SIZES", SIZES)  # the real set's counts are 50,000 and 10,000


@pytest.fixture
def fake100(tmp_path):
    return make_fake_cifar100(tmp_path / "data", **SIZES)


def test_loads_fine_labels_100_classes_and_its_own_normalisation(fake100):
    with pytest.warns(UserWarning, match="md5 of train, test, meta differs"):
        ds = load_cifar100(fake100, download=False)
    assert ds.train_images.shape == (200, 32, 32, 3) and ds.test_images.shape == (100, 32, 32, 3)
    assert len(ds.classes) == 100 and ds.classes[7] == "class7"
    assert ds.train_labels.max() == 99 and ds.train_labels[57] == 57  # fine labels, not the 20 coarse ones
    assert (ds.mean, ds.std) == (CIFAR100_MEAN, CIFAR100_STD)
    with open(fake100 / "cifar-100-python" / "train", "rb") as f:
        rows = pickle.load(f)[b"data"]
    assert np.array_equal(ds.train_images[3], rows[3].reshape(3, 32, 32).transpose(1, 2, 0))  # CHW rows -> HWC


def test_channel_stats_are_per_channel_mean_and_std_in_unit_range():
    images = np.zeros((2, 32, 32, 3), dtype=np.uint8)
    images[0, ..., 0], images[1, ..., 0] = 255, 0  # red: half 1, half 0
    images[..., 1] = 51  # green: 0.2 everywhere
    mean, std = channel_stats(images)
    assert np.allclose(mean, (0.5, 0.2, 0.0)) and np.allclose(std, (0.5, 0.0, 0.0))


def test_the_loaders_normalise_with_cifar100s_mean_and_std(fake100):
    from fastcifar.config import build_config, resolve
    from fastcifar.data.cifar import load_dataset
    from fastcifar.distributed import DistInfo
    from fastcifar.train import build_session

    with pytest.warns(UserWarning):
        ds = load_dataset("cifar100", fake100, download=False)
    cfg = build_config(dataset="cifar100", data_dir=str(fake100), batch_size=50, wandb="off", monitor=False)
    s = build_session(cfg, DistInfo(), ds, resolve(cfg))
    images, _ = next(iter(s.eval_loader))
    mean, std = torch.tensor(CIFAR100_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR100_STD).view(1, 3, 1, 1)
    expected = (torch.from_numpy(ds.test_images[:50]).permute(0, 3, 1, 2).float() / 255 - mean) / std
    assert torch.allclose(images.float(), expected, atol=1e-5)
    assert s.model.fc.out_features == 100  # the head follows the class count


def _rewrite(path, **changes):
    with open(path, "rb") as f:
        d = pickle.load(f)
    d.update({k.encode(): v for k, v in changes.items()})
    with open(path, "wb") as f:
        pickle.dump(d, f)


@pytest.mark.parametrize("corrupt, expected", [
    (lambda f: _rewrite(f / "test", fine_labels=[120] * 100), r"corrupt CIFAR-100 file .*test: labels outside 0..99"),
    (lambda f: (f / "train").write_bytes(b"\x80\x04 not a pickle"), r"corrupt CIFAR-100 file .*train: cannot be read"),
    (lambda f: (f / "test").unlink(), r"cifar-100-python is incomplete: missing test"),
    (lambda f: _rewrite(f / "meta", fine_label_names=["a"] * 10), r"expected 100 'fine_label_names'"),
    (lambda f: _rewrite(f / "train", data=np.zeros((200, 1024), np.uint8)), r"'data' has shape \(200, 1024\)"),
])
def test_corrupt_files_are_one_clear_message_through_the_cli(fake100, corrupt, expected, tmp_path, capsys):
    corrupt(fake100 / "cifar-100-python")
    with pytest.raises(FastCifarError, match=expected):
        load_cifar100(fake100, download=False)
    assert main(["train", "--dataset", "cifar100", "--data-dir", str(fake100), "--no-download", "--epochs", "1",
                 "--wandb", "off", "--run-dir", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fastcifar train: error: ") and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_wrong_counts_are_refused(fake100, monkeypatch):
    monkeypatch.setattr(cifar100, "CIFAR100_SIZES", {"train": 50_000, "test": 10_000})
    with pytest.raises(FastCifarError, match="200 training and 100 test images, expected 50000 and 10000"):
        load_cifar100(fake100, download=False)


def test_missing_without_download_says_where_and_what_to_do(tmp_path):
    with pytest.raises(FastCifarError, match=r"(?s)CIFAR-100 is not available.*cifar-100-python/train, test, meta"):
        load_cifar100(tmp_path / "nowhere", download=False)


def test_download_checks_the_archive_md5_then_unpacks(fake100, tmp_path, monkeypatch):
    import functools
    import http.server
    import threading

    served = tmp_path / "served"
    served.mkdir()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(fake100 / "cifar-100-python", arcname="cifar-100-python")
    (served / "cifar-100-python.tar.gz").write_bytes(buffer.getvalue())
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("FASTCIFAR_CIFAR100_URL",
                           f"http://127.0.0.1:{server.server_address[1]}/cifar-100-python.tar.gz")
        with pytest.raises(FastCifarError, match="md5 .* expected eb9058c3a382ffc7106e4002c42a8d85"):
            load_cifar100(tmp_path / "cache", download=True)
        assert not (tmp_path / "cache" / "cifar-100-python").exists()  # nothing kept
        from fastcifar.data.cifar import _md5

        monkeypatch.setattr(cifar100, "CIFAR100_ARCHIVE_MD5", _md5(served / "cifar-100-python.tar.gz"))
        with pytest.warns(UserWarning, match="md5"):
            ds = load_cifar100(tmp_path / "cache", download=True)
        assert len(ds.classes) == 100
    finally:
        server.shutdown()
        server.server_close()


def test_train_eval_and_flops_on_cifar100_through_the_cli(fake100, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--recipe", "fast", "--dataset", "cifar100", "--data-dir", str(fake100), "--no-download",
                 "--epochs", "1", "--warmup-epochs", "0", "--batch-size", "10", "--train-subset", "20",
                 "--test-subset", "10", "--wandb", "off", "--progress", "off", "--no-report",
                 "--run-dir", str(run)]) == 0
    out = capsys.readouterr().out
    assert "note: CIFAR-100 (100 classes): normalised with its own mean 0.5071, 0.4865, 0.4409 and std 0.2673" in out
    assert "the fast recipe's settings are CIFAR-10's" in out
    assert "data: CIFAR-100 from" in out
    best = torch.load(run / "best.pt", weights_only=False)
    assert tuple(best["model"]["fc.weight"].shape) == (100, 512) and len(best["classes"]) == 100
    for name in ("best.pt", "last.pt"):  # what `fastcifar predict` normalises with: CIFAR-100's own statistics
        spec = torch.load(run / name, weights_only=False)["input"]
        assert (spec["mean"], spec["std"]) == (list(CIFAR100_MEAN), list(CIFAR100_STD)), name
    resolved = json.loads((run / "config.json").read_text())["resolved"]
    assert resolved["classes"] == 100 and resolved["normalize_mean"] == list(CIFAR100_MEAN)
    from fastcifar.flops import training_flops_per_image

    assert resolved["train_flops_per_image"] == training_flops_per_image(num_classes=100)
    assert main(["eval", str(run / "best.pt"), "--json", "--no-download", "--test-subset", "10"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    summary = json.loads((run / "summary.json").read_text())
    assert result["test_images"] == 10 and result["dataset"].startswith("CIFAR-100")
    assert result["test_acc"] == summary["best_test_acc_no_tta"]  # the same weights, the same evaluation
    assert main(["eval", str(run / "best.pt"), "--no-download", "--test-subset", "10"]) == 0
    out = capsys.readouterr().out  # a long path and the dataset's description: wrapped to a terminal's width
    assert f"{100 * result['test_acc']:.2f} %" in out and max(map(len, out.splitlines())) <= 120, out
    assert out.startswith(f"{run / 'best.pt'} (weights, epoch 0)")  # the path whole, pasteable
