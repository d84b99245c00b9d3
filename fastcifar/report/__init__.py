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

from pathlib import Path

from matplotlib.figure import Figure

from fastcifar import FastCifarError
from fastcifar.report.common import DPI, _load
from fastcifar.report.curves import training_curves
from fastcifar.report.layers import gradient_flow, weight_updates

__all__ = ["build_figures", "make_report"]


def build_figures(run_dir) -> dict[str, Figure]:
    """File name -> Figure for `run_dir`; the monitor figures only when their files have rows. A --seeds group:
    group_curves.png (each seed's own figures are in its run directory)."""
    run_dir = Path(run_dir)
    if (run_dir / "group.json").is_file():
        from fastcifar.report.group import group_curves

        return {"group_curves.png": group_curves(run_dir)}
    d = _load(run_dir)
    figures = {"training_curves.png": training_curves(run_dir, d)}
    if d["grad"]:
        figures["gradient_flow.png"] = gradient_flow(run_dir, d)
    if d["updates"]:
        figures["weight_updates.png"] = weight_updates(run_dir, d)
    return figures


def make_report(run_dir, out_dir=None) -> list[Path]:
    """Write the report's PNGs for `run_dir` into `out_dir` (default RUN_DIR/plots/); return their paths."""
    figures = build_figures(run_dir)
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "plots"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # e.g. --out under a regular file
        raise FastCifarError(f"cannot write the plots to {out} ({(exc.strerror or str(exc)).lower()}): pass --out "
                             f"with a folder you can write to.") from None
    for name, fig in figures.items():
        try:
            fig.savefig(out / name, dpi=DPI)
        except OSError as exc:
            raise FastCifarError(f"cannot write {out / name} ({(exc.strerror or str(exc)).lower()}).") from None
    return [out / name for name in figures]
