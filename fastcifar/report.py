"""Figures 1-3 of the lab report from a run directory's files alone (never live objects), so a finished,
crashed or copied run can be re-plotted any time: training_curves.png (metrics.jsonl), gradient_flow.png
(grad_flow.jsonl) and weight_updates.png (updates.jsonl). The monitor files are optional (--no-monitor).
Epochs are 0-based everywhere, as in the files. Matplotlib's Figure API, not pyplot: no global backend or
figure registry is touched, so it is safe at the end of training, headless or not.
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
from matplotlib.lines import Line2D
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter

from fastcifar import FastCifarError

DPI = 120
FLAG_COLOR = "tab:red"
HEALTHY_STEP_RATIO = 1e-3  # a single optimizer step typically moves a layer's weights by ~0.1%


def _read_jsonl(path: Path, *keys: str) -> list[dict]:
    """Rows of a JSON-lines file that have `keys`; [] when absent. A torn last line (a crash mid-write) is
    skipped rather than failing the whole report."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return [r for r in rows if isinstance(r, dict) and all(k in r for k in keys)]


def _num(value) -> float:
    """null (how the files store NaN/Inf) and non-numbers become NaN, so numpy and matplotlib skip them."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def _positive(values) -> np.ndarray:
    """For log axes: zeros and negatives cannot be drawn, so they become gaps instead of warnings."""
    a = np.asarray(values, dtype=float)
    return np.where(a > 0, a, np.nan)


def _load(run_dir: Path) -> dict:
    metrics = _read_jsonl(run_dir / "metrics.jsonl", "epoch") if run_dir.is_dir() else []
    if not metrics:
        raise FastCifarError(f"{run_dir} is not a fastcifar run directory (no metrics.jsonl)")
    # A resumed run rewrites its history; keep one row per epoch (the latest), in epoch order.
    metrics = sorted({r["epoch"]: r for r in metrics}.values(), key=lambda r: r["epoch"])
    try:
        config = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):
        config = {}  # plots still work without it; only the title and the epoch choice lose detail
    return {"metrics": metrics, "config": config.get("config") or {}, "resolved": config.get("resolved") or {},
            "grad": _read_jsonl(run_dir / "grad_flow.jsonl", "epoch", "step", "layer", "index"),
            "updates": _read_jsonl(run_dir / "updates.jsonl", "scope", "epoch", "step", "layer", "index")}


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


def _layers(rows: list[dict]) -> dict[str, int]:
    """Layer name -> position in forward order, from the rows' own "index" (the files define the order)."""
    first = {}
    for r in rows:
        first.setdefault(r["layer"], r["index"])
    return {name: i for i, name in enumerate(sorted(first, key=lambda n: (first[n], n)))}


def _per_epoch_layer_mean(rows: list[dict], key: str, pos: dict[str, int]) -> dict[int, np.ndarray]:
    """epoch -> per-layer mean of `key` over that epoch's samples (NaN-aware)."""
    samples: dict[int, list[list[float]]] = defaultdict(lambda: [[] for _ in pos])
    for r in rows:
        samples[r["epoch"]][pos[r["layer"]]].append(_num(r.get(key)))
    return {epoch: np.array([np.nanmean(v) if np.isfinite(v).any() else math.nan for v in per_layer])
            for epoch, per_layer in samples.items()}


def _select_epochs(available: list[int], config: dict) -> list[int]:
    """The report's Figure 2 epochs: the configured ones, else 0, 5, 10, 15, 20 and the last present."""
    wanted = config.get("grad_epochs")
    if not wanted:
        wanted = [e for e in (0, 5, 10, 15, 20) if e <= available[-1]] + [available[-1]]
    chosen = sorted(set(wanted) & set(available))
    if chosen:
        return chosen
    # None of those were sampled: spread up to six of what there is over the run.
    idx = np.unique(np.linspace(0, len(available) - 1, min(6, len(available))).round().astype(int))
    return [available[i] for i in idx]


def _flagged(metrics: list[dict]) -> dict[str, dict[str, list[int]]]:
    """kind ("vanishing", ...) -> layer -> the epochs it was flagged in."""
    flagged: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for r in metrics:
        for kind, layers in (r.get("flags") or {}).items():
            for layer in layers or []:
                flagged[kind][layer].append(r["epoch"])
    return {k: v for k, v in flagged.items() if v}


def _mark_flagged(labels, flagged: set[str]) -> None:
    for label in labels:
        if label.get_text() in flagged:
            label.set_color(FLAG_COLOR)
            label.set_fontweight("bold")


# --- Figure 1 ------------------------------------------------------------------------------------------
def _training_curves(run_dir: Path, d: dict, path: Path) -> Path:
    m = d["metrics"]
    epochs = [r["epoch"] for r in m]
    col = {k: [_num(r.get(k)) for r in m] for k in ("train_loss", "test_loss", "train_acc", "test_acc", "lr")}
    fig = Figure(figsize=(15, 4.6), dpi=DPI, layout="constrained")
    ax_loss, ax_acc, ax_lr = fig.subplots(1, 3)
    style = dict(marker="o", markersize=3 if len(epochs) <= 60 else 0)
    ax_loss.plot(epochs, col["train_loss"], label="train", **style)
    ax_loss.plot(epochs, col["test_loss"], label="test", **style)
    ax_loss.set(title="Cross-entropy loss", ylabel="loss")
    ax_acc.plot(epochs, [100 * a for a in col["train_acc"]], label="train", **style)
    ax_acc.plot(epochs, [100 * a for a in col["test_acc"]], label="test", **style)
    test_acc = np.array(col["test_acc"])
    if np.isfinite(test_acc).any():
        best = int(np.nanargmax(test_acc))
        ax_acc.scatter([epochs[best]], [100 * test_acc[best]], s=80, facecolors="none", edgecolors="k",
                       zorder=3, label=f"best test {100 * test_acc[best]:.2f}% (epoch {epochs[best]})")
    ax_acc.set(title="Accuracy", ylabel="accuracy (%)")
    ax_lr.plot(epochs, col["lr"], color="tab:green", **style)
    ax_lr.set(title="Learning rate (at the start of each epoch)", ylabel="learning rate")
    # Plain numbers: matplotlib's "1e-3" offset text would sit on top of the panel title.
    ax_lr.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
    for ax in (ax_loss, ax_acc, ax_lr):
        ax.set_xlabel("epoch (0-based)")
        ax.grid(alpha=0.3)
        if len(epochs) <= 30:
            ax.set_xticks(epochs if len(epochs) <= 15 else epochs[::2])
    ax_loss.legend()
    ax_acc.legend()
    fig.suptitle(_title(run_dir, d, "Training curves"))
    fig.savefig(path, dpi=DPI)
    return path


# --- Figure 2 ------------------------------------------------------------------------------------------
def _gradient_flow(run_dir: Path, d: dict, path: Path) -> Path:
    rows = d["grad"]
    pos = _layers(rows)
    layers = list(pos)
    means = _per_epoch_layer_mean(rows, "mean_abs", pos)
    norms = _per_epoch_layer_mean(rows, "norm", pos)
    available = sorted(means)
    chosen = _select_epochs(available, d["config"])
    flags = _flagged(d["metrics"])
    flagged = {layer for by_layer in flags.values() for layer in by_layer}

    fig = Figure(figsize=(max(12, 0.3 * len(layers) + 2), 9.5), dpi=DPI, layout="constrained")
    ax_mean, ax_norm = fig.subplots(2, 1, sharex=True)
    x, crossed = np.arange(len(layers)), False
    for k, epoch in enumerate(chosen):
        color = f"C{k % 10}"
        tag = " (first)" if epoch == available[0] else " (last)" if epoch == available[-1] else ""
        n = len({r["step"] for r in rows if r["epoch"] == epoch})
        ax_mean.plot(x, _positive(means[epoch]), marker="o", ms=3, color=color,
                     label=f"epoch {epoch}{tag}, {n} sample{'s' * (n != 1)}")
        ax_norm.plot(x, _positive(norms[epoch]), marker="o", ms=3, color=color)
        # A cross where a drawn line passes through a layer flagged in that very epoch.
        hit = [i for i, name in enumerate(layers)
               if any(epoch in by_layer.get(name, ()) for by_layer in flags.values())]
        crossed |= bool(hit)
        for ax, values in ((ax_mean, means[epoch]), (ax_norm, norms[epoch])):
            ax.plot(hit, _positive(values[hit]), "X", ms=10, color=FLAG_COLOR, mec="k", mew=0.6, zorder=4)
    _log_y(ax_mean, *(means[e] for e in chosen))
    _log_y(ax_norm, *(norms[e] for e in chosen))
    ax_mean.set(ylabel="mean |grad| (avg over the epoch's samples)", title="Mean absolute gradient per layer")
    ax_norm.set(ylabel="||grad||_2 (avg over samples)", xlabel="layer (forward order)",
                title="Gradient L2 norm per layer (what the vanishing/exploding flags test)")
    handles, _ = ax_mean.get_legend_handles_labels()
    # The flags test each layer's norm against these bounds: show them where they fall near the data.
    lo, hi = _num(d["config"].get("grad_low")), _num(d["config"].get("grad_high"))
    finite = np.concatenate([_positive(norms[e]) for e in chosen])
    finite = finite[np.isfinite(finite)]
    for bound, name in ((lo, "vanishing below"), (hi, "exploding above")):
        if math.isfinite(bound) and finite.size and finite.min() / 100 <= bound <= finite.max() * 100:
            ax_norm.axhline(bound, color=FLAG_COLOR, ls="--", lw=1)
            ax_norm.annotate(f"{name} {bound:g}", (0, bound), xycoords=("axes fraction", "data"),
                             xytext=(4, 3), textcoords="offset points", color=FLAG_COLOR, fontsize=8)
    for i, ax in ((pos[name], ax) for name in flagged & set(pos) for ax in (ax_mean, ax_norm)):
        ax.axvspan(i - 0.5, i + 0.5, color=FLAG_COLOR, alpha=0.12, lw=0)
    if flagged:
        kinds = "; ".join(f"{kind} {name} (epoch {', '.join(map(str, epochs))})"
                          for kind, by_layer in sorted(flags.items())
                          for name, epochs in sorted(by_layer.items(), key=lambda kv: pos.get(kv[0], 1e9)))
        kinds = kinds if len(kinds) <= 100 else kinds[:97] + "..."  # a legend, not a log
        handles.append(Patch(color=FLAG_COLOR, alpha=0.3, label=f"flagged layer: {kinds}"))
    if crossed:
        handles.append(Line2D([], [], ls="", marker="X", ms=9, color=FLAG_COLOR, mec="k", mew=0.6,
                              label="flagged in the epoch drawn"))
    ax_mean.legend(handles=handles, fontsize=8, loc="best")
    ax_mean.grid(alpha=0.3)
    ax_norm.grid(alpha=0.3)
    ax_norm.set_xticks(x, layers, rotation=90, fontsize=8)
    ax_norm.set_xlim(-0.6, len(layers) - 0.4)
    _mark_flagged(ax_norm.get_xticklabels(), flagged)
    fig.suptitle(_title(run_dir, d, "Gradient flow"))
    fig.savefig(path, dpi=DPI)
    return path


# --- Figure 3 ------------------------------------------------------------------------------------------
def _representative(layers: list[str]) -> list[int]:
    """First conv, the middle block's first conv, and the classifier: the layers the report discusses."""
    convs = [i for i, n in enumerate(layers) if "conv" in n or "downsample.0" in n]
    middle = [i for i in convs if layers[i].startswith("layer3.0.conv1")] or convs[len(convs) // 2:][:1]
    picks = [convs[0] if convs else 0] + middle + [len(layers) - 1]
    return sorted(set(picks))


def _weight_updates(run_dir: Path, d: dict, path: Path) -> Path:
    epoch_rows = [r for r in d["updates"] if r.get("scope") == "epoch"]
    step_rows = [r for r in d["updates"] if r.get("scope") == "step"]
    pos = _layers(d["updates"])
    layers = list(pos)
    fig = Figure(figsize=(17, max(8, 0.2 * len(layers) + 2)), dpi=DPI, layout="constrained")
    ax_heat, ax_step = fig.subplots(1, 2, width_ratios=[1, 1.25])

    if epoch_rows:
        epochs = sorted({r["epoch"] for r in epoch_rows})
        grid = np.full((len(layers), len(epochs)), np.nan)
        for r in epoch_rows:
            grid[pos[r["layer"]], epochs.index(r["epoch"])] = _num(r.get("ratio"))
        grid = _positive(grid)
        vals = grid[np.isfinite(grid)]
        norm = LogNorm(vals.min(), max(vals.max(), vals.min() * 1.01)) if vals.size else None
        # Missing/zero updates are grey, not a colour on the scale.
        cmap = matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey")
        image = ax_heat.imshow(grid, aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
        if vals.size:
            fig.colorbar(image, ax=ax_heat, label="||ΔW|| / ||W|| per epoch", pad=0.01)
        else:
            _note(ax_heat, "no finite positive values", FLAG_COLOR)
        stride = max(1, math.ceil(len(epochs) / 25))
        ax_heat.set_xticks(range(0, len(epochs), stride), [str(e) for e in epochs[::stride]])
        ax_heat.set_yticks(range(len(layers)), layers, fontsize=7)
        _mark_flagged(ax_heat.get_yticklabels(), {n for v in _flagged(d["metrics"]).values() for n in v})
        ax_heat.set(xlabel="epoch (0-based)", ylabel="layer (forward order, top = input)",
                    title="Update over each epoch, against its start")
    else:
        ax_heat.set_axis_off()
        _note(ax_heat, "no per-epoch update rows")

    if step_rows:
        by_step: dict[int, np.ndarray] = defaultdict(lambda: np.full(len(layers), np.nan))
        for r in step_rows:
            by_step[r["step"]][pos[r["layer"]]] = _num(r.get("ratio"))
        steps = np.array(sorted(by_step))
        ratios = _positive(np.stack([by_step[s] for s in steps]))  # steps x layers
        with warnings.catch_warnings():  # a step whose layers are all null gives a NaN gap, not a warning
            warnings.simplefilter("ignore", RuntimeWarning)
            q25, med, q75 = np.nanpercentile(ratios, [25, 50, 75], axis=1)
        marker = dict(marker="o", ms=2.5) if len(steps) <= 60 else {}
        ax_step.fill_between(steps, q25, q75, color="grey", alpha=0.25, lw=0, label="25–75% of layers")
        for j, i in enumerate(_representative(layers)):
            ax_step.plot(steps, ratios[:, i], color=f"C{j}", lw=1.1, alpha=0.85, label=layers[i], **marker)
        ax_step.plot(steps, med, color="k", lw=2.2, label="median over all layers", zorder=3, **marker)
        ax_step.axhline(HEALTHY_STEP_RATIO, color=FLAG_COLOR, ls="--", lw=1,
                        label=f"{HEALTHY_STEP_RATIO:g} (typical healthy step)")
        _log_y(ax_step, ratios)
        ax_step.set(xlabel="global step (sampled steps)", ylabel="||ΔW|| / ||W|| for one step",
                    title="Update of a single optimizer step")
        spe = d["resolved"].get("steps_per_epoch")
        if isinstance(spe, int) and spe > 0:  # an epoch axis on top relates steps to the heatmap's columns
            top = ax_step.secondary_xaxis("top", functions=(lambda s: s / spe, lambda e: e * spe))
            top.set_xlabel("epoch (0-based, fractional)")
        ax_step.grid(alpha=0.3, which="both")
        ax_step.legend(fontsize=8, loc="best")
    else:
        ax_step.set_axis_off()
        _note(ax_step, "no per-step update rows")

    fig.suptitle(_title(run_dir, d, "Weight updates"))
    fig.savefig(path, dpi=DPI)
    return path


def make_report(run_dir, out_dir=None) -> list[Path]:
    """Write the report's PNGs for `run_dir` into `out_dir` (default RUN_DIR/plots/); return their paths.
    Monitor figures are drawn only when their files have rows."""
    run_dir = Path(run_dir)
    d = _load(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    paths = [_training_curves(run_dir, d, out / "training_curves.png")]
    if d["grad"]:
        paths.append(_gradient_flow(run_dir, d, out / "gradient_flow.png"))
    if d["updates"]:
        paths.append(_weight_updates(run_dir, d, out / "weight_updates.png"))
    return paths
