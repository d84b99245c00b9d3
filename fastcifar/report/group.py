"""group_curves.png of a `fastcifar train --seeds` group: every seed's test accuracy and training loss per epoch
(thin lines), their mean (thick) and a band of ± one standard deviation across the seeds, from the seeds' run
directories alone."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from fastcifar import FastCifarError
from fastcifar.report.common import DPI, _log_y, _num, _readable_log, _rows


def _seed_runs(group_dir: Path) -> list[tuple[int, Path]]:
    """(seed, run directory) of every seed with rows: finished ones and the one that was running."""
    config = json.loads((group_dir / "group.json").read_text())
    runs = [(seed, group_dir / f"seed-{seed}") for seed in config["seeds"]]
    return [(seed, path) for seed, path in runs if (path / "metrics.jsonl").is_file()]


def group_curves(group_dir: Path) -> Figure:
    runs = _seed_runs(group_dir)
    if not runs:
        raise FastCifarError(f"{group_dir} is a group of seeds with no finished epoch yet: nothing to draw.")
    tta = json.loads((group_dir / "group.json").read_text())["config"].get("tta") == "flip"
    acc_key = "test_acc_tta" if tta else "test_acc"
    fig = Figure(figsize=(13, 5.2), dpi=DPI, layout="constrained")
    ax_acc, ax_loss = fig.subplots(1, 2)
    for ax, key, scale in ((ax_acc, acc_key, 100), (ax_loss, "train_loss", 1)):
        curves = []
        for seed, path in runs:
            rows = _rows(path / "metrics.jsonl", "epoch", key)
            x = np.array([r["epoch"] for r in rows]) + (1.0 if key == acc_key else 0.5)
            y = np.array([scale * _num(r[key]) for r in rows])
            ax.plot(x, y, lw=1, alpha=0.45, marker="o", ms=3, gid=f"seed-{seed}-{key}", label=f"seed {seed}")
            curves.append(y)
        common = min(len(c) for c in curves)  # the epochs every seed has (a stopped seed has fewer)
        stack = np.array([c[:common] for c in curves])
        mean, std = stack.mean(0), stack.std(0, ddof=1) if len(curves) > 1 else np.zeros(common)
        xs = np.arange(common) + (1.0 if key == acc_key else 0.5)  # epochs are 0, 1, ... in every run
        ax.plot(xs, mean, color="k", lw=2.2, gid=f"mean-{key}", label=f"mean of {len(curves)} seeds")
        ax.fill_between(xs, mean - std, mean + std, color="k", alpha=0.15, lw=0, gid=f"band-{key}",
                        label="± 1 std across seeds")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, ncol=2)
    ax_acc.set(title="Test accuracy" + (" (flip TTA)" if tta else "") + ", measured at each epoch's end",
               xlabel="epoch (epoch e spans e → e+1)", ylabel="accuracy (%)")
    _log_y(ax_loss, *[line.get_ydata() for line in ax_loss.lines])
    _readable_log(ax_loss)
    ax_loss.set(title="Training loss, mean over each epoch (log scale)", xlabel="epoch", ylabel="loss")
    fig.suptitle(f"{group_dir} — {len(runs)} seeds ({', '.join(str(s) for s, _ in runs)})")
    return fig
