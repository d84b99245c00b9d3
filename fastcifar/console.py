"""What a person reads: the live progress bar, the epoch line and the final results table."""

from __future__ import annotations

import sys

from fastcifar import distributed as dist
from fastcifar.config import TrainConfig


def make_progress(cfg: TrainConfig, info: dist.DistInfo, total_images: int, epoch: int):
    """A live bar with images/s on a terminal; None (plain epoch lines) when output is not a TTY."""
    show = cfg.progress == "on" or (cfg.progress == "auto" and sys.stderr.isatty())
    if not show or not info.is_main:
        return None
    from tqdm import tqdm

    return tqdm(total=total_images, unit="img", unit_scale=True, leave=False, dynamic_ncols=True,
                desc=f"epoch {epoch} [{epoch + 1}/{cfg.epochs}]", file=sys.stderr)


def epoch_line(cfg: TrainConfig, res, row: dict) -> str:
    perf = f"{row['train_images_per_s']:,.0f} img/s"
    if row.get("achieved_tflops") is not None:
        perf += f" | {row['achieved_tflops']:.1f} TFLOP/s"
        if row.get("mfu") is not None:
            perf += f" MFU {100 * row['mfu']:.1f}%"
    elif row.get("achieved_gflops") is not None:
        perf += f" | {row['achieved_gflops']:.1f} GFLOP/s"
    flags = "; ".join(f"{k}: {', '.join(v[:4])}" + (f" (+{len(v) - 4} more)" if len(v) > 4 else "")
                      for k, v in row["flags"].items() if v)
    # Epochs are 0-based everywhere (files, plots, the report's "epochs 0, 5, …, 24"); [k/N] counts progress.
    width = len(str(cfg.epochs))
    return (f"epoch {row['epoch']:>{width}} [{row['epoch'] + 1:>{width}}/{cfg.epochs}] | train loss {row['train_loss']:.4f} "
            f"acc {100 * row['train_acc']:.2f}% | test loss {row['test_loss']:.4f} acc {100 * row['test_acc']:.2f}% | "
            f"lr {row['lr']:.2e} | {row['epoch_time_s']:.1f} s (train {row['train_time_s']:.1f} s) | {perf} | "
            f"{res.device.type} {row['active']}" + (f" | FLAGGED {flags}" if flags else ""))


def summary_table(summary: dict) -> str:
    """The report's Table 2, for this run."""
    rows = [("Final train accuracy", f"{100 * summary['final_train_acc']:.2f} %"),
            ("Final test accuracy", f"{100 * summary['final_test_acc']:.2f} %"),
            ("Best test accuracy", f"{100 * summary['best_test_acc']:.2f} % (epoch {summary['best_epoch']}, 0-based)"),
            ("Final train loss", f"{summary['final_train_loss']:.4f}"),
            ("Final test loss", f"{summary['final_test_loss']:.4f}"),
            ("Average epoch time", f"{summary['mean_epoch_time_s']:.2f} s (training part "
                                   f"{summary['mean_train_time_s']:.2f} s, {summary['device_name']})")]
    width = max(len(k) for k, _ in rows)
    lines = [f"{'Metric':<{width}} | Value", f"{'-' * width}-+-{'-' * 30}"]
    return "\n".join([*lines, *(f"{k:<{width}} | {v}" for k, v in rows)])
