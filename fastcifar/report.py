"""Figures 1-3 of the lab report from a run directory's files alone (never live objects), so a finished,
crashed or copied run can be re-plotted any time. Each answers "is training healthy?":
  training_curves.png  per-step training loss (steps.jsonl; per-epoch metrics.jsonl in older runs) on a log
                       scale, test loss/accuracy, and the LR schedule on an axis that includes 0;
  gradient_flow.png    per-layer RMS gradient (norm/sqrt(numel), so layer size makes no sawtooth), conv and
                       norm layers as separate lines, and the margin of every gradient norm to the flag limits;
  weight_updates.png   ||dW||/||W|| divided by the LR that made it, so a decaying schedule reads as flat.
The monitor files are optional (--no-monitor). Epochs are 0-based everywhere, as in the files. Matplotlib's
Figure API, not pyplot: no global backend or figure registry is touched, so it is safe at the end of training.
"""

from __future__ import annotations

import json
import math
import warnings
from collections import defaultdict
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from fastcifar import FastCifarError
from fastcifar.config import default_grad_epochs
from fastcifar.files import read_jsonl

DPI = 120
FLAG_COLOR = "tab:red"
REF_COLOR = "0.45"  # reference lines are grey: a comparison, not a verdict


def _rows(path: Path, *keys: str) -> list[dict]:
    """Rows that have `keys` ([] when absent); read_jsonl raises FastCifarError for damage but a torn last line."""
    return [r for r in read_jsonl(path) if all(k in r for k in keys)]


def _num(value) -> float:
    """null (how the files store NaN/Inf) and non-numbers become NaN, so numpy and matplotlib skip them."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def _positive(values) -> np.ndarray:
    """For log axes: zeros and negatives cannot be drawn, so they become gaps instead of warnings."""
    a = np.asarray(values, dtype=float)
    return np.where(a > 0, a, np.nan)


def _nanstat(func, a, *args, **kwargs):
    with warnings.catch_warnings():  # an all-NaN slice is a gap in the plot, not a warning on the console
        warnings.simplefilter("ignore", RuntimeWarning)
        return func(a, *args, **kwargs)


def _sci(v: float) -> str:
    """1.8e-2, 2.8, 360, 1e3: short and unambiguous in a sentence."""
    if not math.isfinite(v) or 0.1 <= abs(v) < 1000:
        return f"{float(f'{v:.2g}'):g}"
    mantissa, exponent = f"{v:.1e}".split("e")
    return f"{mantissa.removesuffix('.0')}e{int(exponent)}"


def _kind(row: dict) -> str:
    """conv | norm | linear; older files have no "kind": the torchvision names say it."""
    if row.get("kind"):
        return row["kind"]
    name = row["layer"]
    return "norm" if "bn" in name or "downsample.1" in name else "linear" if name.startswith("fc") else "conv"


def _load(run_dir: Path) -> dict:
    path = run_dir / "metrics.jsonl"
    torn = []
    metrics = read_jsonl(path, notice=torn.append) if run_dir.is_dir() else []
    if not metrics and torn:  # its only line was unreadable: damage, not an absent file
        raise FastCifarError(f"{path} is damaged: its only line is not a JSON row. Restore the file or remove it.")
    metrics = [r for r in metrics if isinstance(r.get("epoch"), int)]
    if not metrics:
        raise FastCifarError(f"{run_dir} is not a fastcifar run directory (no metrics.jsonl)")
    # A resumed run rewrites its history; keep one row per epoch (the latest), in epoch order.
    metrics = sorted({r["epoch"]: r for r in metrics}.values(), key=lambda r: r["epoch"])
    try:
        config = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):
        config = {}  # plots still work without it; only the title and the epoch choice lose detail
    steps = sorted({r["step"]: r for r in _rows(run_dir / "steps.jsonl", "step")}.values(), key=lambda r: r["step"])
    d = {"metrics": metrics, "config": config.get("config") or {}, "resolved": config.get("resolved") or {},
         "steps": steps, "grad": _rows(run_dir / "grad_flow.jsonl", "epoch", "step", "layer", "index"),
         "updates": _rows(run_dir / "updates.jsonl", "scope", "epoch", "step", "layer", "index")}
    spe = d["resolved"].get("steps_per_epoch")
    if not (isinstance(spe, int) and spe > 0) and steps:  # an older config: count the steps of an epoch
        spe = max(sum(r.get("epoch") == e for r in steps) for e in {r.get("epoch") for r in steps})
    d["spe"] = spe if isinstance(spe, int) and spe > 0 else None
    return d


def _title(run_dir: Path, d: dict, what: str) -> str:
    parts = [what, f"run {run_dir.name}"]
    parts += [f"recipe {d['config']['recipe']}"] if d["config"].get("recipe") else []
    done, planned = len(d["metrics"]), d["config"].get("epochs")
    total = planned if isinstance(planned, int) and planned != done else None  # an unfinished run says so
    parts.append(f"{done}/{total} epochs" if total else f"{done} epoch{'s' * (done != 1)}")
    if "SYNTHETIC" in str(d["resolved"].get("dataset", "")).upper():
        parts.append("SYNTHETIC data (not CIFAR-10)")
    return " | ".join(parts)


def _note(ax, text: str, color="k") -> None:
    ax.text(0.5, 0.6, text, ha="center", transform=ax.transAxes, color=color)


def _log_y(ax, *arrays) -> None:
    """Log y when there is something positive to draw; a diverged run (all null) says so instead of failing."""
    if any(np.isfinite(_positive(a)).any() for a in arrays):
        ax.set_yscale("log")
    else:
        _note(ax, "no finite positive values", FLAG_COLOR)


def _readable_log(ax) -> None:
    """Label 1-2-5 in each decade in plain numbers: a loss between 0.3 and 2.3 has no power of ten to label."""
    ax = getattr(ax, "ax", ax)  # a colorbar's axes too
    low, high = ax.get_ylim()
    if ax.get_yscale() == "log" and 0 < low and math.log10(high / low) <= 3:
        ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())


def _layers(rows: list[dict]) -> dict[str, int]:
    """Layer name -> position in forward order, from the rows' own "index" (the files define the order)."""
    first = {}
    for r in rows:
        first.setdefault(r["layer"], r["index"])
    return {name: i for i, name in enumerate(sorted(first, key=lambda n: (first[n], n)))}


def _flagged(metrics: list[dict]) -> dict[str, dict[str, list[int]]]:
    """kind ("vanishing", ...) -> layer -> the epochs it was flagged in."""
    flagged: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for r in metrics:
        for kind, layers in (r.get("flags") or {}).items():
            for layer in layers or []:
                flagged[kind][layer].append(r["epoch"])
    return {k: v for k, v in flagged.items() if v}


def _style_layer_labels(labels, kinds: dict[str, str], flagged: set[str]) -> None:
    """Norm layers' names in grey italics (they are the second line style); flagged layers red and bold."""
    for label in labels:
        name = label.get_text()
        if name in flagged:
            label.set(color=FLAG_COLOR, fontweight="bold")
        elif kinds.get(name) == "norm":
            label.set(color="0.4", fontstyle="italic")


def _schedule(d: dict) -> tuple[np.ndarray, np.ndarray]:
    """The LR at known global steps: every step (steps.jsonl), else each epoch's first and last step (metrics'
    lr, lr_end). Without steps_per_epoch the x unit is the epoch (then it only serves Figure 1)."""
    spe = d["spe"] or 1
    if d["steps"]:
        xs, ys = [r["step"] for r in d["steps"]], [_num(r.get("lr")) for r in d["steps"]]
    else:  # without lr_end (older files) the LR is interpolated between epoch starts
        points = [(r["epoch"] * spe, r.get("lr")) for r in d["metrics"]] + [
            (r["epoch"] * spe + max(spe - 1, 1), r["lr_end"]) for r in d["metrics"] if "lr_end" in r]
        xs, ys = zip(*sorted((x, _num(y)) for x, y in points))
    xs, ys = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    return xs[np.isfinite(ys)], ys[np.isfinite(ys)]


# --- Figure 1 ------------------------------------------------------------------------------------------
def _moving_mean(y: np.ndarray, window: int) -> np.ndarray:
    ok = np.isfinite(y)
    total = np.convolve(np.where(ok, y, 0.0), np.ones(window), "same")
    count = np.convolve(ok.astype(float), np.ones(window), "same")
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _training_curves(run_dir: Path, d: dict) -> Figure:
    m, spe = d["metrics"], d["spe"]
    epochs = np.array([r["epoch"] for r in m])
    col = {k: np.array([_num(r.get(k)) for r in m]) for k in
           ("train_loss", "test_loss", "train_acc", "test_acc", "test_loss_tta", "test_acc_tta")}
    fig = Figure(figsize=(15, 6.4), dpi=DPI, layout="constrained")
    axd = fig.subplot_mosaic([["loss", "acc"], ["lr", "acc"]], height_ratios=[3, 1], width_ratios=[1.5, 1])
    ax_loss, ax_acc, ax_lr = axd["loss"], axd["acc"], axd["lr"]
    ax_lr.sharex(ax_loss)
    ax_acc.sharex(ax_loss)
    ax_loss.tick_params(labelbottom=False)
    # One x axis, the fractional epoch: per-epoch train numbers are means over the epoch (drawn mid-epoch),
    # test numbers are measured at its end.
    mid, end, dot = epochs + 0.5, epochs + 1.0, dict(marker="o", ms=4)
    if d["steps"] and spe:
        x = np.array([r["step"] for r in d["steps"]]) / spe
        loss = np.array([_num(r.get("loss")) for r in d["steps"]])
        few = len(loss) <= 60
        ax_loss.plot(x, loss, color="C0", lw=0.8, alpha=1 if few else 0.35, gid="train_loss_step",
                     label="train, every step", **(dict(marker=".", ms=5) if few else {}))
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

    headline, name = col["test_acc"], "test"
    if np.isfinite(col["test_acc_tta"]).any():  # with --tta flip the run's headline number is the TTA one
        headline, name = col["test_acc_tta"], "test (flip TTA)"
    if np.isfinite(headline).any():
        best = int(np.nanargmax(headline))
        ax_acc.scatter([end[best]], [100 * headline[best]], s=110, facecolors="none", edgecolors="k", zorder=3,
                       label=f"best {name} {100 * headline[best]:.2f}% (epoch {epochs[best]})")
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


# --- Figure 2 ------------------------------------------------------------------------------------------
def _select_epochs(available: list[int], d: dict) -> list[int]:
    """The configured --grad-epochs, else their default for the planned length (plus the latest epoch, so an
    unfinished run shows where it is); if none was sampled, up to six spread over what there is."""
    planned = d["config"].get("epochs")
    wanted = d["config"].get("grad_epochs") or (
        default_grad_epochs(planned if isinstance(planned, int) and planned > 0 else available[-1] + 1)
        + [available[-1]])
    chosen = sorted(set(wanted) & set(available))
    if chosen:
        return chosen
    idx = np.unique(np.linspace(0, len(available) - 1, min(6, len(available))).round().astype(int))
    return [available[i] for i in idx]


def _margin_text(norms: np.ndarray, lo: float, hi: float, flags: dict) -> tuple[str, bool]:
    """One sentence: flagged or not, the range of every sampled gradient norm, the limits and the margins;
    and whether it is an alarm."""
    finite = norms[np.isfinite(norms) & (norms > 0)]
    head = "; ".join(f"FLAGGED {kind} {name} (epoch {', '.join(map(str, epochs))})"
                     for kind, by_layer in sorted(flags.items()) for name, epochs in by_layer.items())
    head = head if len(head) <= 90 else head[:87] + "..."
    if not finite.size:
        return f"{head or 'no layer flagged'}; no finite gradient norm sampled", True
    text = (f"{head or 'no layer flagged'}; range {_sci(finite.min())}–{_sci(finite.max())} vs limits "
            f"{_sci(lo)}/{_sci(hi)}")
    if lo > 0 and hi > 0:
        below, above = finite.min() / lo, hi / finite.max()
        text += (f" (×{_sci(below)} above the low one" if below >= 1 else f" (lowest ×{_sci(1 / below)} BELOW it") + (
            f", ×{_sci(above)} below the high one)" if above >= 1 else f", highest ×{_sci(1 / above)} ABOVE it)")
    bad = int(np.sum(~np.isfinite(norms)))
    text += f"; {bad} non-finite" if bad else ""
    return text, bool(flags or bad or finite.min() < lo or finite.max() > hi)


def _groups(layers: list[str], kinds: dict[str, str]) -> dict[str, list[int]]:
    """Positions of the weight layers (conv, fc) and of the norm layers: drawn apart, never joined by a line."""
    return {g: [i for i, n in enumerate(layers) if (kinds[n] == "norm") == (g == "norm")] for g in ("weights", "norm")}


def _gradient_flow(run_dir: Path, d: dict) -> Figure:
    rows = d["grad"]
    pos = _layers(rows)
    layers, kinds = list(pos), {r["layer"]: _kind(r) for r in rows}
    groups = _groups(layers, kinds)
    rms = all("rms" in r or "numel" in r for r in rows)  # older files: the norm, and its sawtooth, remain
    samples: dict[int, list[list[float]]] = defaultdict(lambda: [[] for _ in pos])
    norms: dict[int, list[float]] = defaultdict(list)
    for r in rows:
        norm = _num(r.get("norm"))
        numel = _num(r.get("numel"))
        value = (_num(r["rms"]) if "rms" in r else norm / math.sqrt(numel) if numel > 0 else math.nan) if rms else norm
        samples[r["epoch"]][pos[r["layer"]]].append(value)
        norms[pos[r["layer"]]].append(norm)
    means = {e: np.array([_nanstat(np.nanmean, v) if v else math.nan for v in per_layer])
             for e, per_layer in samples.items()}
    chosen = _select_epochs(sorted(means), d)
    flags = _flagged(d["metrics"])
    flagged = {layer for by_layer in flags.values() for layer in by_layer}

    fig = Figure(figsize=(max(12, 0.3 * len(layers) + 2), 10), dpi=DPI, layout="constrained")
    ax, ax_m = fig.subplots(2, 1, sharex=True, height_ratios=[2.2, 1])
    handles = []
    for k, epoch in enumerate(chosen):
        color, n = f"C{k % 10}", len({r["step"] for r in rows if r["epoch"] == epoch})
        for group, idx in groups.items():
            if idx:  # norm layers hollow squares on a dotted line, weight layers dots on a solid one
                ax.plot(idx, _positive(means[epoch][idx]), color=color, ms=4, lw=1.3, gid=f"grad:{group}:{epoch}",
                        **(dict(ls=":", marker="s", mfc="white") if group == "norm" else dict(marker="o")))
        handles.append(Line2D([], [], color=color, lw=2, label=f"epoch {epoch}, {n} sample{'s' * (n != 1)}"))
    handles += [Line2D([], [], color="k", ms=5, marker="o", label="conv / fc layers"),
                Line2D([], [], color="k", ms=5, ls=":", marker="s", mfc="white", label="BatchNorm (grey names)")]
    if flagged:
        handles.append(Patch(color=FLAG_COLOR, alpha=0.3, label="flagged layer (red name)"))
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.005, 1), borderaxespad=0)
    _log_y(ax, *(means[e] for e in chosen))
    ax.set(ylabel=("RMS gradient = ||grad|| / √numel" if rms else "||grad||_2 (older file: no numel)") +
           "\n(mean over the epoch's samples)",
           title="Per-layer RMS gradient: comparable across layer sizes" if rms else "Per-layer gradient norm")

    # The flags test each sampled norm (not the RMS) against grad_low/grad_high: each layer's min-max norm over
    # all samples, between the two limits, and the margin said in words.
    lo, hi = _num(d["config"].get("grad_low", 1e-7)), _num(d["config"].get("grad_high", 1e3))
    every = np.concatenate([np.asarray(v) for v in norms.values()])
    text, alarm = _margin_text(every, lo, hi, flags)
    for group, idx in groups.items():
        ax_m.vlines(idx, [_nanstat(np.nanmin, _positive(norms[i])) for i in idx],
                    [_nanstat(np.nanmax, _positive(norms[i])) for i in idx], color="0.5" if group == "norm" else "k",
                    lw=3)
    ax_m.set_yscale("log")
    for bound, name in ((lo, "vanishing below"), (hi, "exploding above")):
        if bound > 0:
            ax_m.axhline(bound, color=FLAG_COLOR, ls="--", lw=1)
            ax_m.annotate(f"{name} {_sci(bound)}", (0, bound), xycoords=("axes fraction", "data"), xytext=(4, 3),
                          textcoords="offset points", color=FLAG_COLOR, fontsize=8,
                          bbox=dict(fc="white", ec="none", alpha=0.8, pad=0.5))
    span = np.concatenate([_positive(every), _positive([lo, hi])])
    if np.isfinite(span).any():
        ax_m.set_ylim(_nanstat(np.nanmin, span) / 30, _nanstat(np.nanmax, span) * 30)
    ax_m.set_title(text, color=FLAG_COLOR if alarm else "darkgreen", fontsize=11, fontweight="bold")
    ax_m.set(ylabel="||grad||_2, min–max\nover all samples", xlabel="layer (forward order)")
    for i in (pos[n] for n in flagged & set(pos)):
        for a in (ax, ax_m):
            a.axvspan(i - 0.5, i + 0.5, color=FLAG_COLOR, alpha=0.12, lw=0)
    for a in (ax, ax_m):
        a.grid(alpha=0.3)
    ax_m.set_xticks(range(len(layers)), layers, rotation=90, fontsize=8)
    ax_m.set_xlim(-0.6, len(layers) - 0.4)
    _style_layer_labels(ax_m.get_xticklabels(), kinds, flagged)
    fig.suptitle(_title(run_dir, d, "Gradient flow"))
    return fig


# --- Figure 3 ------------------------------------------------------------------------------------------
def _update_grid(d: dict, rows: list[dict], pos: dict[str, int], key: str):
    """(sorted values of `key`, layers x those values grid of ratio ÷ LR, normalised?). The LR is the row's own
    (a step's; an epoch's mean), else the run's schedule (older files); with no LR known, the raw ratio."""
    ratio = np.array([_num(r.get("ratio")) for r in rows])
    lr = np.array([_num(r.get("lr")) for r in rows])
    xs, ys = _schedule(d)
    for i in np.flatnonzero(~(lr > 0)):
        r, spe = rows[i], d["spe"] or 0
        span = [r["step"]] if r["scope"] == "step" else np.arange(r["epoch"] * spe, (r["epoch"] + 1) * spe)
        lr[i] = np.mean(np.interp(span, xs, ys)) if len(span) and xs.size and spe else math.nan
    normed = bool(np.isfinite(_positive(lr)).any())
    values = ratio / _positive(lr) if normed else ratio
    cols = sorted({r[key] for r in rows})
    at = {c: j for j, c in enumerate(cols)}
    grid = np.full((len(pos), len(cols)), np.nan)
    for r, v in zip(rows, values):
        grid[pos[r["layer"]], at[r[key]]] = v
    return np.array(cols), _positive(grid), normed


def _weight_updates(run_dir: Path, d: dict) -> Figure:
    epoch_rows = [r for r in d["updates"] if r.get("scope") == "epoch"]
    step_rows = [r for r in d["updates"] if r.get("scope") == "step"]
    pos = _layers(d["updates"])
    layers, kinds = list(pos), {r["layer"]: _kind(r) for r in d["updates"]}
    groups = _groups(layers, kinds)
    fig = Figure(figsize=(17, max(8, 0.2 * len(layers) + 2.5)), dpi=DPI, layout="constrained")
    ax_heat, ax_step = fig.subplots(1, 2, width_ratios=[1, 1.25])

    if epoch_rows:
        epochs, grid, normed = _update_grid(d, epoch_rows, pos, "epoch")
        vals = grid[np.isfinite(grid)]
        norm = LogNorm(vals.min(), max(vals.max(), vals.min() * 1.01)) if vals.size else None
        # Missing/zero updates are grey, not a colour on the scale.
        cmap = matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey")
        image = ax_heat.imshow(grid, aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
        if vals.size:
            _readable_log(fig.colorbar(image, ax=ax_heat, pad=0.01, label="(||ΔW|| / ||W|| over the epoch)" +
                                       (" ÷ the epoch's mean LR" if normed else "")))
        else:
            _note(ax_heat, "no finite positive values", FLAG_COLOR)
        stride = max(1, math.ceil(len(epochs) / 25))
        ax_heat.set_xticks(range(0, len(epochs), stride), [str(e) for e in epochs[::stride]])
        ax_heat.set_yticks(range(len(layers)), layers, fontsize=7)
        _style_layer_labels(ax_heat.get_yticklabels(), kinds, {n for v in _flagged(d["metrics"]).values() for n in v})
        ax_heat.set(xlabel="epoch (0-based)", ylabel="layer (forward order, top = input)",
                    title="Update over each epoch " + ("÷ LR: a row of even colour follows the LR" if normed
                                                       else "(no LR recorded: not normalised)"))
    else:
        ax_heat.set_axis_off()
        _note(ax_heat, "no per-epoch update rows")

    if step_rows:
        steps, ratios, normed = _update_grid(d, step_rows, pos, "step")
        ratios = ratios.T  # steps x layers
        marker = dict(marker="o", ms=2.5) if len(steps) <= 60 else {}
        # conv and norm layers apart: their typical levels differ, so one band over both says little.
        for group, color, ls, what in (("weights", "k", "-", "conv / fc"), ("norm", "0.4", ":", "BatchNorm")):
            if groups[group]:
                q25, med, q75 = _nanstat(np.nanpercentile, ratios[:, groups[group]], [25, 50, 75], axis=1)
                ax_step.fill_between(steps, q25, q75, color=color, alpha=0.12, lw=0)
                ax_step.plot(steps, med, color=color, ls=ls, lw=2.2, zorder=3, gid=f"update:{group}",
                             label=f"{what} layers: median, 25–75% band", **marker)
        # A neutral reference, not a verdict: the run's own typical level. Normalised by the LR, a healthy run
        # stays near it however the LR decays.
        ref = _nanstat(np.nanmedian, ratios[:, groups["weights"] or slice(None)])
        if math.isfinite(ref):
            ax_step.axhline(ref, color=REF_COLOR, ls="--", lw=1, label=f"reference: run median {_sci(ref)}")
        _log_y(ax_step, ratios)
        _readable_log(ax_step)
        ax_step.set(xlabel="global step (sampled steps)",
                    ylabel="(||ΔW|| / ||W|| of one step) ÷ its LR" if normed else "||ΔW|| / ||W|| of one step",
                    title="One optimizer step's update " + ("÷ the LR that made it: flat = follows the LR"
                                                            if normed else "(no LR recorded: not normalised)"))
        ax_step.xaxis.set_major_locator(MaxNLocator(integer=True))
        lr_x, lr = _schedule(d)
        if d["spe"] and lr.size:  # the schedule itself, thin, for comparison
            ax_lr = ax_step.twinx()
            ax_lr.plot(lr_x, lr, color="tab:green", lw=1, alpha=0.6)
            ax_lr.set(ylim=(0, 1.1 * lr.max() if lr.max() > 0 else 1), ylabel="learning rate (green)")
            ax_step.set_zorder(ax_lr.get_zorder() + 1)  # the LR behind the data
            ax_step.patch.set_visible(False)
            ax_step.plot([], [], color="tab:green", lw=1, alpha=0.6, label="LR (right axis)")
        if d["spe"]:  # an epoch axis on top relates steps to the heatmap's columns
            top = ax_step.secondary_xaxis("top", functions=(lambda s: s / d["spe"], lambda e: e * d["spe"]))
            top.set_xlabel("epoch (0-based, fractional)")
        ax_step.grid(alpha=0.3, which="both")
        ax_step.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.07), ncol=3)
    else:
        ax_step.set_axis_off()
        _note(ax_step, "no per-step update rows")
    fig.suptitle(_title(run_dir, d, "Weight updates"))
    return fig


def build_figures(run_dir) -> dict[str, Figure]:
    """File name -> Figure for `run_dir`; the monitor figures only when their files have rows."""
    run_dir = Path(run_dir)
    d = _load(run_dir)
    figures = {"training_curves.png": _training_curves(run_dir, d)}
    if d["grad"]:
        figures["gradient_flow.png"] = _gradient_flow(run_dir, d)
    if d["updates"]:
        figures["weight_updates.png"] = _weight_updates(run_dir, d)
    return figures


def make_report(run_dir, out_dir=None) -> list[Path]:
    """Write the report's PNGs for `run_dir` into `out_dir` (default RUN_DIR/plots/); return their paths."""
    figures = build_figures(run_dir)
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    for name, fig in figures.items():
        fig.savefig(out / name, dpi=DPI)
    return [out / name for name in figures]
