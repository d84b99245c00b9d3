"""Figure 1, training_curves.png: per-step training loss on a log scale, test loss and accuracy, and the LR
schedule on an axis that includes 0."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

from fastcifar.report.common import DPI, REF_COLOR, _log_y, _num, _num_classes, _readable_log, _schedule, _sci, _title


# --- Figure 1 ------------------------------------------------------------------------------------------
def _moving_mean(y: np.ndarray, window: int) -> np.ndarray:
    ok = np.isfinite(y)
    total = np.convolve(np.where(ok, y, 0.0), np.ones(window), "same")
    count = np.convolve(ok.astype(float), np.ones(window), "same")
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def training_curves(run_dir: Path, d: dict) -> Figure:
    m, spe = d["metrics"], d["spe"]
    epochs = np.array([r["epoch"] for r in m])
    col = {k: np.array([_num(r.get(k)) for r in m]) for k in
           ("train_loss", "test_loss", "train_acc", "test_acc", "test_loss_tta", "test_acc_tta", "val_acc",
            "val_acc_tta")}
    fig = Figure(figsize=(15, 6.4), dpi=DPI, layout="constrained")
    axd = fig.subplot_mosaic([["loss", "acc"], ["lr", "acc"]], height_ratios=[3, 1], width_ratios=[1.5, 1])
    ax_loss, ax_acc, ax_lr = axd["loss"], axd["acc"], axd["lr"]
    ax_lr.sharex(ax_loss)
    ax_acc.sharex(ax_loss)
    ax_loss.tick_params(labelbottom=False)
    # One x axis, the fractional epoch: per-epoch train numbers are means over the epoch (drawn mid-epoch),
    # test numbers are measured at its end.
    mid, end, dot = epochs + 0.5, epochs + 1.0, {"marker": "o", "ms": 4}
    if d["steps"] and spe:
        x = np.array([r["step"] for r in d["steps"]]) / spe
        loss = np.array([_num(r.get("loss")) for r in d["steps"]])
        few = len(loss) <= 60
        ax_loss.plot(x, loss, color="C0", lw=0.8, alpha=1 if few else 0.35, gid="train_loss_step",
                     label="train, every step", **({"marker": ".", "ms": 5} if few else {}))
        if not few:  # raw steps are noisy: a moving mean shows the trend, the raw line the spread
            window = max(5, len(loss) // 50)
            ax_loss.plot(x, _moving_mean(loss, window), color="C0", lw=1.8, label=f"train, mean of {window} steps")
    for ax, key, scale in ((ax_loss, "loss", 1), (ax_acc, "acc", 100)):
        if ax is ax_acc or not (d["steps"] and spe):
            ax.plot(mid, scale * col[f"train_{key}"], color="C0", gid=f"train_{key}_epoch", label="train (epoch mean)",
                    **dot)
        ax.plot(end, scale * col[f"test_{key}"], color="C1", gid=f"test_{key}", label="test (end of epoch)", **dot)
        if np.isfinite(col[f"test_{key}_tta"]).any():
            ax.plot(end, scale * col[f"test_{key}_tta"], color="C4", ls="--", label="test, flip TTA", **dot)
    _log_y(ax_loss, *[line.get_ydata() for line in ax_loss.lines])
    ax_loss.set(title="Cross-entropy loss (log scale)", ylabel="loss")
    if spe:  # the steps themselves: in a 1-2 epoch run an epoch is the whole x axis
        top = ax_loss.secondary_xaxis("top", functions=(lambda e: e * spe, lambda s: s / spe))
        top.xaxis.set_major_locator(MaxNLocator(integer=True))
        top.set_xlabel("global step", fontsize=9)

    tta = np.isfinite(col["test_acc_tta"]).any()  # with --tta flip the run's headline number is the TTA one
    headline, name = (col["test_acc_tta"], "test (flip TTA)") if tta else (col["test_acc"], "test")
    val = col["val_acc_tta"] if tta and np.isfinite(col["val_acc_tta"]).any() else col["val_acc"]
    if np.isfinite(val).any():  # --val-split: validation picks the best epoch; the test is reported for it
        ax_acc.plot(end, 100 * val, color="C2", gid="val_acc", label="validation (held-out training images)", **dot)
        best = int(np.nanargmax(val))
        ax_acc.scatter([end[best]], [100 * headline[best]], s=110, facecolors="none", edgecolors="k", zorder=3,
                       label=f"chosen on validation: epoch {epochs[best]}, {name} {100 * headline[best]:.2f}%")
    elif np.isfinite(headline).any():
        best = int(np.nanargmax(headline))
        ax_acc.scatter([end[best]], [100 * headline[best]], s=110, facecolors="none", edgecolors="k", zorder=3,
                       label=f"best {name} {100 * headline[best]:.2f}% (epoch {epochs[best]})")
    # Chance: what a model that learned nothing scores; an accuracy near it is no progress, however the axis zooms.
    chance = 100 / _num_classes(d)
    ax_acc.axhline(chance, color=REF_COLOR, ls="--", lw=1, gid="chance", label=f"chance ({chance:g}%)")
    ax_acc.set(title="Accuracy", ylabel="accuracy (%)")
    ax_acc.margins(y=0.12)

    lr_x, lr = _schedule(d)
    lr_x = lr_x / (spe or 1)
    ax_lr.plot(lr_x, lr, color="tab:green", lw=1.5, gid="lr")
    ax_lr.fill_between(lr_x, 0, lr, color="tab:green", alpha=0.15, lw=0)
    ax_lr.set_ylim(0, 1.15 * lr.max() if lr.size and lr.max() > 0 else 1)  # 0 in view: a decay to 0 shows
    title = "LR schedule, every step" if d["steps"] else "LR at each epoch's first and last step"
    if lr.size:  # first, peak and last: a warm-up's peak is not at either end
        title += f": {_sci(lr[0])} → " + (f"peak {_sci(lr.max())} → " if lr.max() > max(lr[0], lr[-1]) else "")
        title += f"{_sci(lr[-1])}"
    ax_lr.set(ylabel="learning rate", title=title)
    # Plain numbers: matplotlib's "1e-3" offset text would sit on top of the panel title.
    ax_lr.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.2g}"))
    span = epochs[-1] + 1
    ax_lr.set_xlim(-0.02 * span, 1.02 * span)  # points at the run's very end stay whole
    for ax in (ax_lr, ax_acc):
        ax.set_xlabel("epoch (epoch e spans e → e+1; test measured at its end)")
    for ax in (ax_loss, ax_acc, ax_lr):
        ax.grid(alpha=0.3)
    _readable_log(ax_loss)
    ax_loss.legend(fontsize=9)
    ax_acc.legend(fontsize=9)
    fig.suptitle(_title(run_dir, d, "Training curves"))
    return fig
