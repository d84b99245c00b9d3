"""What a person reads: the live progress bar, the run's header, the epoch line and the final results table.

The epoch line stays within 120 columns; what does not fit (flagged layers, the first epoch's compile time) goes
on an indented line under it.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch-free at import: the CLI guards its output with this module before any command runs
    from fastcifar import distributed as dist

WIDTH = 120
DROP_WARNING = 0.10  # warn when the last partial batch drops more than this share of the training set


def make_progress(cfg, info: dist.DistInfo, total_images: int, epoch: int):
    """A live bar with images/s on a terminal; None (plain epoch lines) when output is not a TTY."""
    show = cfg.progress == "on" or (cfg.progress == "auto" and sys.stderr.isatty())
    if not show or not info.is_main:
        return None
    from tqdm import tqdm

    return tqdm(total=total_images, unit="img", unit_scale=True, leave=False, dynamic_ncols=True,
                desc=f"epoch {epoch} [{epoch + 1}/{cfg.epochs}]", file=sys.stderr)


def header(cfg, ds, *, run_dir, steps: int, trained_images: int, world_size: int, notices: list[str],
           resolved: dict, active: str, start: str | None, device: str | None = None) -> str:
    """What a run prints before its first epoch: where it writes, on what device, what it trains on and how many
    images an epoch really trains on (the last partial batch is dropped), the settings that differ from the
    recipe (config.json has them all), what auto became, the columns."""
    from fastcifar import __version__
    from fastcifar.config import build_config

    total = len(ds.train_labels)
    dropped = total - trained_images
    lines = [f"fastcifar {__version__} — run directory {run_dir}"] + ([device] if device else [])
    lines.append(textwrap.fill(f"data: {ds.description}", WIDTH, subsequent_indent="    "))
    if cfg.limit_steps:
        lines.append(f"quick check (--limit-steps {cfg.limit_steps}): {plural(steps, 'step')} of {cfg.batch_size} "
                     f"and at most {plural(cfg.limit_steps, 'evaluation batch', 'es')} per epoch; numbers mean nothing")
    else:
        lines.append(f"training on {trained_images:,} of {total:,} images per epoch ({plural(steps, 'step')} of "
                     f"{cfg.batch_size}" + (f" x {world_size} processes" if world_size > 1 else "")
                     + (f"; the last {dropped} are dropped: only full batches, so shapes stay static)" if dropped
                        else ")"))
        if dropped > DROP_WARNING * total:
            lines.append(f"warning: {dropped / total:.1%} of the training set is dropped every epoch: pick "
                         f"--batch-size or --train-subset so that one divides the other more closely")
    recipe = build_config(cfg.recipe).to_dict()
    changed = {k: "auto" if v is None else f"{v:.4g}" if isinstance(v, float) else v
               for k, v in cfg.to_dict().items() if k not in ("recipe", "run_dir") and v != recipe.get(k)}
    lines += [*notices, wrapped(f"config: recipe {cfg.recipe}" + (", with" if changed else ""), changed,
                                f"(all settings: {Path(run_dir) / 'config.json'})"), wrapped("resolved:", resolved),
              f"active: {active}"]
    lines += [start] if start else []
    lines.append(legend(cfg.tta == "flip"))
    if getattr(cfg, "val_split", 0):
        lines.append(f"val: accuracy on the {cfg.val_split:,} held-out training images; it picks the best epoch "
                     f"and best.pt")
    return "\n".join(lines)


def device_line(cfg, device, name: str) -> str:
    """Lightning's "GPU available: False", said where it matters: a CPU run of the full set takes hours."""
    if device.type == "cuda":
        return f"device: {name} ({device})"
    why = "no GPU found" if cfg.device == "auto" else "--device cpu"
    return f"warning: {why}: training on {name} is slow; a quick check of everything: --fast-dev-run"


def plural(n: int, word: str, suffix: str = "s") -> str:
    return f"{n:,} {word}{'' if n == 1 else suffix}"


def wrapped(label: str, items: dict, tail: str = "") -> str:
    return textwrap.fill(" ".join([label] + [f"{k}={v}" for k, v in items.items()] + [tail] * bool(tail)), width=WIDTH,
                         subsequent_indent="    ", break_on_hyphens=False, break_long_words=False)


def legend(tta: bool) -> str:
    acc = "train/test/flip-TTA" if tta else "train/test"
    return (f"columns: loss train/test | acc {acc} % | lr start(→peak)→end | epoch s (+checkpoint s) | "
            f"training images/s")


def _short(x: float) -> str:
    """1e-3 rather than 1.00e-03, 0.13 rather than 1.3e-1: the LR range must fit the line."""
    if 0.01 <= abs(x) < 100:
        return f"{x:.2g}"
    mantissa, exponent = f"{x:.1e}".split("e")
    return f"{mantissa.removesuffix('.0')}e{int(exponent)}"


def _compact(seconds: float) -> str:
    return f"{seconds:.2f}" if seconds < 10 else f"{seconds:.1f}" if seconds < 100 else f"{seconds:.0f}"


def _loss(x: float) -> str:
    """Six characters whatever the size (2.4750, 12.346, 123.46), so the columns stay put from epoch to epoch."""
    digits = 4 if abs(x) < 10 else 3 if abs(x) < 100 else 2 if abs(x) < 1000 else 0
    return f"{x:6.{digits}f}"


def lr_text(lr: float, peak: float | None, end: float) -> str:
    """start→end, with the peak between them when the epoch's LR rose above both (a warm-up epoch)."""
    middle = f"→{_short(peak)}" if peak is not None and peak > max(lr, end) * (1 + 1e-9) else ""
    return f"{_short(lr)}{middle}→{_short(end)}"


def lr_width(cfg) -> int:
    """The LR column's width for the run: start→end are at most 6 characters each (1.2e-3), and under a warm-up
    the peak between them is --lr."""
    return 6 + 1 + (len(_short(cfg.lr)) + 1 if cfg.warmup_epochs else 0) + 6


def epoch_line(cfg, row: dict) -> str:
    """One line of fixed-width columns (aligned from epoch to epoch), at most 120 wide; notes go under it."""
    width = len(str(cfg.epochs))
    accs = [row["train_acc"], row["test_acc"]] + ([row["test_acc_tta"]] if row.get("test_acc_tta") is not None else [])
    acc = "/".join(f"{100 * a:5.2f}" for a in accs)
    if row.get("val_acc") is not None:  # --val-split: the headline validation accuracy
        acc += f"% val {100 * row.get('val_acc_tta', row['val_acc']):5.2f}"
    ips = row["train_images_per_s"]
    perf = f"{ips / 1000:4,.0f}k img/s" if ips >= 100_000 else f"{ips:5,.0f} img/s"
    if row.get("mfu") is not None:
        perf += f" MFU {100 * row['mfu']:4.1f}%"
    elif row.get("achieved_tflops") is not None:
        perf += f" {row['achieved_tflops']:5.1f} TFLOP/s"
    elif row.get("achieved_gflops") is not None:
        perf += f" {row['achieved_gflops']:5.1f} GFLOP/s"
    saved = f" +{_compact(row['checkpoint_time_s'])}" if row.get("checkpoint_time_s") else ""
    lr = lr_text(row["lr"], row.get("lr_peak"), row["lr_end"])
    line = (f"epoch {row['epoch']:>{width}} [{row['epoch'] + 1:>{width}}/{cfg.epochs}] "
            f"loss {_loss(row['train_loss'])}/{_loss(row['test_loss'])} acc {acc}% "
            f"lr {lr:<{lr_width(cfg)}} | {_compact(row['epoch_time_s']):>5} s{saved:<6} | {perf}")
    notes = []
    if row.get("compile_s"):
        notes.append(f"this epoch includes {row['compile_s']:.1f} s of compilation and graph capture")
    if row.get("first_reached"):
        notes.append("reached " + ", ".join(f"{100 * t:g}%" for t in row["first_reached"]) +
                     f" test accuracy after {row['elapsed_s']:.1f} s")
    flags = "; ".join(f"{k}: {', '.join(v[:4])}" + (f" (+{len(v) - 4} more)" if len(v) > 4 else "")
                      for k, v in row["flags"].items() if v)
    if flags:
        notes.append(f"FLAGGED {flags}")
    return "\n".join([line] + [f"    {n}" for n in notes])


def _seconds(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s:.2f} s" if s < 120 else f"{s:.0f} s ({s / 60:.1f} min)"


def summary_table(summary: dict) -> str:
    """The report's Table 2, for this run, with its time-to-accuracy and where the weights are."""
    tta = summary.get("final_test_acc_tta") is not None
    rows = [("Final train accuracy", f"{100 * summary['final_train_acc']:.2f} %"),
            ("Final test accuracy", f"{100 * summary['final_test_acc']:.2f} %" +
             (f" (flip TTA: {100 * summary['final_test_acc_tta']:.2f} %)" if tta else ""))]
    if summary.get("chosen_on") == "validation":
        rows += [(f"Chosen epoch (best validation accuracy, {summary['headline']})",
                  f"epoch {summary['best_epoch']} (0-based): validation {100 * summary['best_val_acc']:.2f} %, "
                  f"test {100 * summary['test_acc_at_best']:.2f} %"),
                 ("Best test accuracy (for comparison; not used to choose)",
                  f"{100 * summary['best_test_acc']:.2f} % (epoch {summary['best_test_epoch']})")]
    else:
        rows += [(f"Best test accuracy ({summary['headline']})",
                  f"{100 * summary['best_test_acc']:.2f} % (epoch {summary['best_epoch']}, 0-based)")]
    rows += [("Final train loss", f"{summary['final_train_loss']:.4f}"),
             ("Final test loss", f"{summary['final_test_loss']:.4f}"),
             ("Average epoch time", f"{summary['mean_epoch_time_s']:.2f} s (training part "
                                    f"{summary['mean_train_time_s']:.2f} s, {summary['device_name']}"
                                    + (f"; over the {summary['timed_epochs']} epoch(s) without compilation)"
                                       if summary["compile_s"] else ")")),
             ("Checkpoints", f"{summary['checkpoints']} saved in {summary['checkpoint_time_s']:.2f} s"),
             ("Total wall time", f"{_seconds(summary['total_wall_s'])} (training {_seconds(summary['train_wall_s'])})")]
    if summary["compile_s"]:
        rows.insert(-2, ("Compilation and capture", f"{summary['compile_s']:.1f} s in all (first epoch "
                                                    f"{summary['first_epoch_time_s']:.2f} s with it)"))
    missed = [threshold for threshold, reached in summary["time_to_acc"].items() if not reached]
    for threshold, reached in summary["time_to_acc"].items():
        if reached:
            rows.append((f"Time to {threshold} test accuracy", f"epoch {reached['epoch']}, "
                         f"{_seconds(reached['wall_s'])} wall, {_seconds(reached['train_s'])} training"))
    if missed:
        rows.append((f"Time to {'/'.join(m.rstrip('%') for m in missed)}%", "not reached"))
    rows += [("Last checkpoint", summary["last_pt"] or "none saved"), ("Best weights", summary["best_pt"] or "-")]
    width = max(len(k) for k, _ in rows)
    lines = [f"{'Metric':<{width}} | Value", f"{'-' * width}-+-{'-' * 40}"]
    return "\n".join([*lines, *(f"{k:<{width}} | {v}" for k, v in rows)])


def shell_command(*words) -> str:
    """A command (or path) a message tells the user to paste: each word shell-quoted, so a run directory with a
    space, quote or non-ASCII name still pastes as one argument."""
    return " ".join(shlex.quote(str(word)) for word in words)


class SurvivingStream:
    """sys.stdout or sys.stderr, for a process that must outlive its terminal.

    A run's record is its run directory; the terminal is only a view of it. When the reader goes away (stdout
    piped into `head -1` that exited, a closed terminal) a write raises BrokenPipeError or EIO: here that drops
    this and all later output instead, one note on the other stream says so, and training goes on to its next
    checkpoint and its end. Stopping instead would lose the epoch in progress for a view nobody is reading.
    The file descriptor itself is pointed at /dev/null, so writes from C, from child processes and Python's
    flush at exit do not fail either."""

    def __init__(self, stream, name: str):
        self._stream, self._name, self.gone = stream, name, False

    def write(self, text: str) -> int:
        if not self.gone:
            try:
                return self._stream.write(text)
            except UnicodeEncodeError:  # e.g. a run directory named in letters an ASCII terminal cannot show
                encoding = getattr(self._stream, "encoding", None) or "ascii"
                return self.write(text.encode(encoding, "backslashreplace").decode(encoding))
            except (OSError, ValueError) as exc:  # ValueError: the stream was closed
                self._lose(exc)
        return len(text)

    def flush(self) -> None:
        if not self.gone:
            try:
                self._stream.flush()
            except (OSError, ValueError) as exc:
                self._lose(exc)

    def isatty(self) -> bool:
        return not self.gone and self._stream.isatty()

    def __getattr__(self, name):
        return getattr(self._stream, name)

    def _lose(self, exc: Exception) -> None:
        self.gone = True
        if self not in (sys.stdout, sys.stderr):
            # written after surviving_output() ended (a logging handler keeps the stream it was made with): the
            # stream may have been closed and its descriptor number reused by another file, which must not be
            # pointed at /dev/null; and the note is for the command that was running, which is over
            return
        with contextlib.suppress(Exception):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)
        other = sys.stderr if self._name == "stdout" else sys.stdout
        if other is not self:
            reason = getattr(exc, "strerror", None) or type(exc).__name__
            print(f"note: {self._name} is gone ({reason}): nothing more is printed to it; a training run goes on, "
                  f"its run directory keeps the record", file=other, flush=True)


@contextlib.contextmanager
def surviving_output():
    """stdout and stderr that a closed or broken terminal cannot turn into a crash (see SurvivingStream). A
    stream closed before the start (`>&-`) is /dev/null: its file descriptor is taken, so no file opened later
    gets it and receives what is printed."""
    saved = sys.stdout, sys.stderr
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is None:
            stream = open(os.devnull, "w")  # noqa: SIM115 (lives as long as the process)
        if not isinstance(stream, SurvivingStream):
            stream = SurvivingStream(stream, name)
        setattr(sys, name, stream)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved
