"""What the three figures share: reading a run directory's files (old formats included), number helpers,
layer kinds, flags, titles and log axes."""

from __future__ import annotations

import json
import math
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from fastcifar import FastCifarError
from fastcifar.files import read_jsonl

DPI = 120
FLAG_COLOR = "tab:red"
REF_COLOR = "0.45"  # reference lines are grey: a comparison, not a verdict
# ||dW||/||W|| this large means ||W|| was ~0 before (a zero-initialised layer, e.g. zero_init_residual's last BN):
# undefined, not a measurement; on the colour scale it would flatten every other layer into one colour.
UNDEFINED_RATIO = 1e6


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
    if not math.isfinite(v) or v == 0 or 0.1 <= abs(v) < 1000:
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


def _num_classes(d: dict) -> int:
    """The class count of the run (its resolved config's `classes`; runs written before it: 10)."""
    n = d["resolved"].get("classes")
    return n if isinstance(n, int) and n > 1 else 10


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
        ax.yaxis.set_major_locator(LogLocator(subs=(1, 1.5, 2, 3, 5, 7) if high / low < 8 else (1, 2, 5)))
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
