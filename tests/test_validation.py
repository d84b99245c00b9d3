"""--val-split N: N training images held out (seeded, class-balanced); the best epoch and best.pt are chosen on them,
the test set is reported for that epoch, and the best test accuracy stays available, named as such."""

import json

import numpy as np
import pytest
import torch

from support import tiny_config
from fastcifar import FastCifarError
from fastcifar.cli import main
from fastcifar.data.cifar import hold_out_validation, make_synthetic
from fastcifar.train import fit

FLAGS = ["--dataset", "synthetic", "--synthetic-size", "32", "--batch-size", "8", "--wandb", "off", "--progress",
         "off", "--no-report"]


def test_hold_out_is_seeded_class_balanced_and_disjoint():
    def split(seed):
        ds = make_synthetic(100, 20, seed=0)
        ds.train_images = np.arange(100)  # stand-ins that name each image, so the split can be traced
        hold_out_validation(ds, 20, seed)
        return ds

    a, b, other = split(0), split(0), split(1)
    assert len(a.val_labels) == 20 and len(a.train_labels) == 80
    assert np.bincount(a.val_labels, minlength=10).tolist() == [2] * 10
    assert sorted(a.val_images.tolist() + a.train_images.tolist()) == list(range(100))  # disjoint, nothing lost
    assert np.array_equal(a.val_images, b.val_images) and not np.array_equal(a.val_images, other.val_images)
    assert "20 training images held out for validation" in a.description
    with pytest.raises(FastCifarError, match="--val-split 100 leaves no training images"):
        hold_out_validation(make_synthetic(100, 20), 100, 0)


def test_the_best_epoch_is_chosen_on_validation_and_the_test_is_reported_for_it(tmp_path, monkeypatch, capsys):
    """Scripted accuracies where validation and test disagree: best.pt must hold validation's best epoch."""
    from fastcifar import train

    test_accs, val_accs = iter([0.5, 0.3, 0.2]), iter([0.1, 0.4, 0.2])
    real = train.evaluate_model

    def scripted(model, loader, *args, **kwargs):
        result = real(model, loader, *args, **kwargs)
        result["test_acc"] = next(val_accs if loader.num_images == 10 else test_accs)
        return result

    monkeypatch.setattr(train, "evaluate_model", scripted)
    run = tmp_path / "run"
    assert main(["train", *FLAGS, "--epochs", "3", "--val-split", "10", "--run-dir", str(run)]) == 0
    out = capsys.readouterr().out
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["val_acc"] for r in rows] == [0.1, 0.4, 0.2] and [r["test_acc"] for r in rows] == [0.5, 0.3, 0.2]
    config = json.loads((run / "config.json").read_text())
    assert config["config"]["val_split"] == 10 and config["resolved"]["train_images"] == 22
    summary = json.loads((run / "summary.json").read_text())
    assert summary["chosen_on"] == "validation" and summary["best_epoch"] == 1
    assert summary["best_val_acc"] == 0.4 and summary["test_acc_at_best"] == 0.3
    assert summary["best_test_acc"] == 0.5 and summary["best_test_epoch"] == 0
    best = torch.load(run / "best.pt", weights_only=False)
    assert best["epoch"] == 1 and best["chosen_on"] == "validation" and best["val_acc"] == 0.4
    assert best["test_acc"] == 0.3
    assert "acc" in out and "% val 40.0" in out
    table = {k.strip(): v.strip() for k, _, v in (line.partition(" | ") for line in out.splitlines() if " | " in line)}
    assert table["Chosen epoch (best validation accuracy, no TTA)"] == "epoch 1 (0-based): validation 40.00 %, test 30.00 %"
    assert table["Best test accuracy (for comparison; not used to choose)"] == "50.00 % (epoch 0)"


def test_without_a_validation_split_the_test_set_chooses_as_before(tmp_path):
    summary = fit(tiny_config(tmp_path / "run", epochs=1))
    assert summary["chosen_on"] == "test" and summary["best_val_acc"] is None
    assert summary["test_acc_at_best"] == summary["best_test_acc"]
    best = torch.load(tmp_path / "run" / "best.pt", weights_only=False)
    assert best["chosen_on"] == "test" and best["test_acc"] == summary["best_test_acc"]


def test_a_resumed_run_keeps_choosing_on_validation(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *FLAGS, "--epochs", "2", "--val-split", "10", "--run-dir", str(run),
                 "--stop-after-epoch", "1"]) == 0
    assert main(["train", "--resume", str(run), "--progress", "off", "--no-report"]) == 0
    out = capsys.readouterr().out
    assert "best validation acc so far" in out
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1] and all("val_acc" in r for r in rows)
    summary = json.loads((run / "summary.json").read_text())
    best = max(rows, key=lambda r: r["val_acc"])  # the first of equals, as the run keeps the earlier one
    assert summary["chosen_on"] == "validation" and summary["best_epoch"] == best["epoch"]
    assert torch.load(run / "best.pt", weights_only=False)["test_acc"] == best["test_acc"]
