"""fastcifar.report: the report's figures drawn from a fabricated run directory (no training needed)."""

import json
import math
import random

import numpy as np
import pytest
from matplotlib.image import imread

from fastcifar import FastCifarError
from fastcifar.model import resnet18_cifar
from fastcifar.monitor import parameterised_layers
from fastcifar.report import make_report

LAYERS = [name for name, _ in parameterised_layers(resnet18_cifar())]
PNGS = ["training_curves.png", "gradient_flow.png", "weight_updates.png"]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def fabricate_run(run_dir, *, epochs=6, steps_per_epoch=40, samples=4, monitor=True, grad_epochs=None,
                  flagged="layer1.0.bn1", flagged_epoch=1, synthetic=True, seed=0):
    """A run directory shaped like train.py's: config.json, metrics.jsonl and (monitor) the per-layer rows,
    with plausible magnitudes: |grad| falling with depth and over training, one layer flagged vanishing."""
    rng = random.Random(seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    dataset = "SYNTHETIC data (2048 train / 1024 test, not CIFAR-10)" if synthetic else "CIFAR-10 from ./data"
    (run_dir / "config.json").write_text(json.dumps({
        "config": {"epochs": epochs, "recipe": "worksheet", "batch_size": 128, "lr": 1e-3,
                   "grad_epochs": grad_epochs, "grad_low": 1e-7, "grad_high": 1e3},
        "resolved": {"device_name": "cpu", "dataset": dataset, "steps_per_epoch": steps_per_epoch}}))
    metrics, grads, updates = [], [], []
    n = len(LAYERS)
    for epoch in range(epochs):
        lr = 1e-3 * 0.5 * (1 + math.cos(math.pi * epoch / epochs))
        acc = 0.35 + 0.55 * (1 - math.exp(-epoch / 2))
        metrics.append({"epoch": epoch, "train_loss": 1.8 * math.exp(-epoch / 3) + 0.1, "train_acc": acc + 0.03,
                        "test_loss": 1.7 * math.exp(-epoch / 3) + 0.3, "test_acc": acc, "lr": lr,
                        "train_time_s": 10.0, "eval_time_s": 1.0, "epoch_time_s": 11.0,
                        "train_images_per_s": 512.0,
                        "flags": {"vanishing": [flagged] if epoch == flagged_epoch else [], "exploding": []}})
        for k in range(samples):
            step = epoch * steps_per_epoch + k * (steps_per_epoch // samples)
            for i, layer in enumerate(LAYERS):
                scale = 10 ** (-2.5 - 1.5 * i / n) * (0.85 ** epoch) * rng.uniform(0.7, 1.4)
                if layer == flagged and epoch == flagged_epoch:
                    scale = 1e-10
                grads.append({"epoch": epoch, "step": step, "layer": layer, "index": i, "mean_abs": scale,
                              "max_abs": 30 * scale, "norm": 40 * scale * math.sqrt(1 + i)})
                updates.append({"scope": "step", "epoch": epoch, "step": step, "layer": layer, "index": i,
                                "ratio": 1e-3 * (lr / 1e-3 + 0.05) * rng.uniform(0.4, 2.5) * (3 if "bn" in layer
                                                                                             else 1)})
        for i, layer in enumerate(LAYERS):
            updates.append({"scope": "epoch", "epoch": epoch, "step": (epoch + 1) * steps_per_epoch, "layer": layer,
                            "index": i, "ratio": 0.02 * (lr / 1e-3 + 0.05) * rng.uniform(0.5, 2) * (1 + i / n)})
    updates[5]["ratio"] = None  # NaN/Inf are stored as null: must be skipped, not crash
    _write_jsonl(run_dir / "metrics.jsonl", metrics)
    if monitor:
        _write_jsonl(run_dir / "grad_flow.jsonl", grads)
        _write_jsonl(run_dir / "updates.jsonl", updates)
    return run_dir


def _check_png(path, min_w=600, min_h=300):
    assert path.exists() and path.stat().st_size > 10_000, path
    image = imread(path)
    h, w = image.shape[:2]
    assert w >= min_w and h >= min_h, (path, w, h)
    assert np.ptp(image[..., :3]) > 0.5, f"{path} is (nearly) a single colour"


def test_report_writes_the_three_figures(tmp_path):
    run = fabricate_run(tmp_path / "run")
    paths = make_report(run)
    assert [p.name for p in paths] == PNGS
    assert all(p.parent == run / "plots" for p in paths)
    for p in paths:
        _check_png(p)
    # 41 rotated layer names need a wide figure.
    assert imread(paths[1]).shape[1] >= 1400


def test_report_out_dir_and_configured_epochs(tmp_path):
    run = fabricate_run(tmp_path / "run", epochs=3, grad_epochs=[0, 2], synthetic=False)
    paths = make_report(str(run), out_dir=tmp_path / "out" / "nested")
    assert [p.name for p in paths] == PNGS
    assert all(p.parent == tmp_path / "out" / "nested" for p in paths)
    assert not (run / "plots").exists()


def test_report_without_monitor_files_draws_curves_only(tmp_path):
    run = fabricate_run(tmp_path / "run", monitor=False)
    paths = make_report(run)
    assert [p.name for p in paths] == ["training_curves.png"]
    _check_png(paths[0])


def test_report_tolerates_torn_lines_nulls_and_a_single_epoch(tmp_path):
    run = fabricate_run(tmp_path / "run", epochs=1, flagged_epoch=0)
    (run / "config.json").unlink()  # optional: only the title loses detail
    with open(run / "grad_flow.jsonl", "a") as f:
        f.write('{"epoch": 0, "step": 3, "lay')  # a crash mid-write
    # A diverged run: every ratio non-finite (null). Log axes must not fail on having nothing to draw.
    rows = [json.loads(line) for line in (run / "updates.jsonl").read_text().splitlines()]
    _write_jsonl(run / "updates.jsonl", [{**r, "ratio": None} for r in rows])
    assert [p.name for p in make_report(run)] == PNGS


def test_report_rejects_a_non_run_directory(tmp_path):
    with pytest.raises(FastCifarError, match="not a fastcifar run directory"):
        make_report(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text("")
    with pytest.raises(FastCifarError, match=r"no metrics\.jsonl"):
        make_report(tmp_path / "empty")
