"""Figures 2 and 3 from the monitor's files: gradient_flow.png (per-layer RMS gradient, conv and norm layers
apart, the margin to the flag limits) and weight_updates.png (||dW||/||W|| divided by the LR that made it)."""

from __future__ import annotations

import math
import re
from collections import defaultdict
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.colors import ListedColormap, LogNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle
from matplotlib.ticker import MaxNLocator

from fastcifar.config import default_grad_epochs
from fastcifar.report.common import (
    DPI,
    FLAG_COLOR,
    REF_COLOR,
    UNDEFINED_RATIO,
    _flagged,
    _kind,
    _layers,
    _log_y,
    _nanstat,
    _note,
    _num,
    _positive,
    _readable_log,
    _schedule,
    _sci,
    _style_layer_labels,
    _title,
)


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


def _few(items, n: int = 3) -> str:
    items = [str(i) for i in items]
    return ", ".join(items[:n]) + (f", … ({len(items)})" if len(items) > n else "")


def _margin_text(norms: np.ndarray, lo: float, hi: float, flags: dict, zeros_by_design: int = 0) -> tuple[str, bool]:
    """One sentence: flagged or not, the range of every sampled gradient norm (zeros included: a norm of exactly
    0 is what a vanishing flag often is), the limits and the margins; and whether it is an alarm. zeros_by_design:
    how many of the zeros the monitor did not flag (step 0 of a zero-init-residual run): no alarm for those."""
    heads = []
    for kind, by_layer in sorted(flags.items()):
        names = _few(by_layer, 2) if len(by_layer) <= 2 else f"{len(by_layer)} layers"
        epochs = sorted({e for v in by_layer.values() for e in v})
        heads.append(f"FLAGGED {kind}: {names} (epoch{'s' * (len(epochs) > 1)} {_few(epochs)})")
    text = "; ".join(heads) or "no layer flagged"
    finite = norms[np.isfinite(norms)]
    bad = int(norms.size - finite.size)
    if not finite.size:
        return f"{text}; no finite gradient norm sampled", True
    low, high = finite.min(), finite.max()
    text += f"; range {_sci(low)}–{_sci(high)} vs limits {_sci(lo)}/{_sci(hi)}"
    if lo > 0 and hi > 0:
        zeros = int(np.sum(finite <= 0))
        if zeros and zeros == zeros_by_design:
            text += f" ({zeros} norm{'s' * (zeros > 1)} exactly 0 at step 0, by design: zero-initialised branches"
            low = finite[finite > 0].min() if (finite > 0).any() else lo
        elif zeros:
            text += f" ({zeros} norm{'s' * (zeros > 1)} exactly 0"
        else:
            text += f" (×{_sci(low / lo)} above the low one" if low >= lo else f" (lowest ×{_sci(lo / low)} BELOW it"
        text += (f", ×{_sci(hi / high)} below the high one)" if high <= hi
                 else f", highest ×{_sci(high / hi)} ABOVE it)")
    text += f"; {bad} non-finite" if bad else ""
    return text, bool(flags or bad or low < lo or high > hi)


def _groups(layers: list[str], kinds: dict[str, str]) -> dict[str, list[int]]:
    """Positions of the weight layers (conv, fc) and of the norm layers: drawn apart, never joined by a line."""
    return {g: [i for i, n in enumerate(layers) if (kinds[n] == "norm") == (g == "norm")] for g in ("weights", "norm")}


def gradient_flow(run_dir: Path, d: dict) -> Figure:
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
                        **({"ls": ":", "marker": "s", "mfc": "white"} if group == "norm" else {"marker": "o"}))
        handles.append(Line2D([], [], color=color, lw=2, label=f"epoch {epoch}, {n} sample{'s' * (n != 1)}"))
    handles += [Line2D([], [], color="k", ms=5, marker="o", label="conv / fc layers"),
                Line2D([], [], color="k", ms=5, ls=":", marker="s", mfc="white", label="BatchNorm (grey names)")]
    if flagged:
        handles.append(Patch(color=FLAG_COLOR, alpha=0.3, label="flagged layer (red name)"))
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.005, 1), borderaxespad=0)
    lo, hi = _num(d["config"].get("grad_low", 1e-7)), _num(d["config"].get("grad_high", 1e3))
    numel = {pos[r["layer"]]: _num(r.get("numel")) for r in rows}
    limit_title = ""
    if rms and lo > 0 and all(numel.get(i, 0) > 0 for i in range(len(layers))):
        # The flags test the norm, not the RMS: in RMS terms a layer's vanishing limit is grad_low / √numel, so
        # a large conv layer is flagged only some decades below the grad_low line a reader would look for.
        ax.plot(range(len(layers)), [lo / math.sqrt(numel[i]) for i in range(len(layers))], ls="none", marker="_",
                ms=9, mew=1.5, color=FLAG_COLOR, gid="limit:vanishing-rms")
        handles.append(Line2D([], [], ls="none", marker="_", ms=9, mew=1.5, color=FLAG_COLOR,
                              label=f"vanishing flag limit in RMS terms\n(--grad-low {_sci(lo)} ÷ √numel)"))
        limit_title = "; red dashes: where the vanishing flag would fire for that layer"
        ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.005, 1), borderaxespad=0)
    _log_y(ax, *(means[e] for e in chosen))
    ax.set(ylabel=("RMS gradient = ||grad|| / √numel" if rms else "||grad||_2 (older file: no numel)") +
           "\n(mean over the epoch's samples)",
           title=("Per-layer RMS gradient: comparable across layer sizes" if rms else "Per-layer gradient norm")
           + limit_title)

    # The flags test each sampled norm (not the RMS) against grad_low/grad_high: each layer's min-max norm over
    # all samples, between the two limits, and the margin said in words.
    every = np.concatenate([np.asarray(v) for v in norms.values()])
    by_design = sum(1 for r in rows if r["step"] == 0 and _num(r.get("norm")) == 0) \
        if d["config"].get("zero_init_residual") else 0
    text, alarm = _margin_text(every, lo, hi, flags, by_design)
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
                          bbox={"fc": "white", "ec": "none", "alpha": 0.8, "pad": 0.5})
    span = np.concatenate([_positive(every), _positive([lo, hi])])
    if np.isfinite(span).any():
        ax_m.set_ylim(_nanstat(np.nanmin, span) / 30, _nanstat(np.nanmax, span) * 30)
    # Log axes cannot show 0: mark it at the floor; grey where it is by design (step 0 of --zero-init-residual,
    # not flagged by the monitor), red otherwise.
    design = {pos[r["layer"]] for r in rows if r["step"] == 0 and _num(r.get("norm")) == 0} if by_design else set()
    other = {pos[r["layer"]] for r in rows if _num(r.get("norm")) == 0 and not (r["step"] == 0 and by_design)}
    floor = ax_m.get_ylim()[0] * 1.5
    for zero, color, label in ((sorted(design), REF_COLOR, "exactly 0 at step 0, by design (zero-initialised)"),
                               (sorted(other), FLAG_COLOR, "a sampled norm was exactly 0")):
        if zero:
            ax_m.plot(zero, [floor] * len(zero), "v", color=color, ms=7, label=label)
    if design or other:
        ax_m.legend(fontsize=8, loc="lower right")
    # Red when something is wrong; otherwise black, not green: limits this wide cannot certify a healthy run.
    ax_m.set_title(text, color=FLAG_COLOR if alarm else "k", fontsize=11, fontweight="bold")
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
    """(sorted values of `key`, layers x those values grid of ratio ÷ LR, normalised?, grid of undefined ratios).
    The LR is the row's own (a step's; an epoch's mean), else the run's schedule (older files); with no LR known,
    the raw ratio."""
    ratio = np.array([_num(r.get("ratio")) for r in rows])
    undefined = ratio > UNDEFINED_RATIO
    ratio[undefined] = math.nan
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
    grid, mask = np.full((len(pos), len(cols)), np.nan), np.zeros((len(pos), len(cols)), dtype=bool)
    for r, v, u in zip(rows, values, undefined):
        grid[pos[r["layer"]], at[r[key]]], mask[pos[r["layer"]], at[r[key]]] = v, u
    return np.array(cols), _positive(grid), normed, mask


ZERO_INIT_LAYER = re.compile(r"^layer\d+\.\d+\.bn2$")  # what --zero-init-residual starts at 0 (torchvision)


def _zero_initialised(d: dict, layers: list[str]) -> set[str]:
    """Layers whose weights start at 0: the residual branches' last BatchNorm under --zero-init-residual, and any
    layer the monitor found with ||W|| ≈ 0 (its ratio undefined). Their ||ΔW||/||W|| is large while ||W|| grows
    from 0: expected, and no measure of the other layers' health."""
    named = {n for n in layers if ZERO_INIT_LAYER.match(n)} if d["config"].get("zero_init_residual") else set()
    return named | {r["layer"] for r in d["updates"] if _num(r.get("ratio")) > UNDEFINED_RATIO}


def weight_updates(run_dir: Path, d: dict) -> Figure:
    epoch_rows = [r for r in d["updates"] if r.get("scope") == "epoch"]
    step_rows = [r for r in d["updates"] if r.get("scope") == "step"]
    pos = _layers(d["updates"])
    layers, kinds = list(pos), {r["layer"]: _kind(r) for r in d["updates"]}
    zero_init = _zero_initialised(d, layers)
    groups = {g: [i for i in idx if layers[i] not in zero_init] for g, idx in _groups(layers, kinds).items()}
    fig = Figure(figsize=(17, max(8, 0.2 * len(layers) + 2.5)), dpi=DPI, layout="constrained")
    ax_heat, ax_step = fig.subplots(1, 2, width_ratios=[1, 1.25])

    if epoch_rows:
        epochs, grid, normed, undefined = _update_grid(d, epoch_rows, pos, "epoch")
        zero_rows = np.array([n in zero_init for n in layers])
        vals = grid[~zero_rows][np.isfinite(grid[~zero_rows])]  # the scale is the other layers': a zero-init
        vals = vals if vals.size else grid[np.isfinite(grid)]    # row growing from 0 would saturate it
        norm = LogNorm(vals.min(), max(vals.max(), vals.min() * 1.01)) if vals.size else None
        # Missing/zero updates are grey, not a colour on the scale.
        cmap = matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey")
        image = ax_heat.imshow(grid, aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
        # White, apart from both the scale and the grey of a missing value: undefined ratios, and the whole row of
        # a zero-initialised layer (its ratio says how fast ||W|| grows from 0; on the scale it reads as exploding)
        off_scale = undefined | (zero_rows[:, None] & np.isfinite(grid))
        if off_scale.any():
            ax_heat.imshow(np.where(off_scale, 1.0, np.nan), aspect="auto", cmap=ListedColormap(["white"]),
                           interpolation="nearest")
        for i in np.flatnonzero(zero_rows):  # hatched: read apart from the scale
            ax_heat.add_patch(Rectangle((-0.5, i - 0.5), len(epochs), 1, fill=False, hatch="///", ec="0.35", lw=0,
                                        gid=f"zero-init:{layers[i]}"))
        if vals.size:
            _readable_log(fig.colorbar(image, ax=ax_heat, pad=0.01, extend="both",
                                       label="(||ΔW|| / ||W|| over the epoch)" +
                                       (" ÷ the epoch's mean LR" if normed else "")))
        else:
            _note(ax_heat, "no finite positive values", FLAG_COLOR)
        stride = max(1, math.ceil(len(epochs) / 25))
        ax_heat.set_xticks(range(0, len(epochs), stride), [str(e) for e in epochs[::stride]])
        ax_heat.set_yticks(range(len(layers)), [n + (" (zero-init)" if n in zero_init else "") for n in layers],
                           fontsize=7)
        _style_layer_labels(ax_heat.get_yticklabels(), kinds, {n for v in _flagged(d["metrics"]).values() for n in v})
        white = "\nwhite: undefined, ||W|| ≈ 0 at the epoch's start (zero-initialised)" if undefined.any() else ""
        hatched = ("\nhatched: zero-initialised layers, left off the scale (their ratio is large while ||W|| grows "
                   "from 0: expected);\nthe branches' other layers get ≈0 gradient until then, so their rows "
                   "brighten over the first epochs, by design" if zero_rows.any() else "")
        ax_heat.set(xlabel="epoch (0-based)" + white + hatched, ylabel="layer (forward order, top = input)",
                    title=("Update over each epoch ÷ LR. Healthy: colours drift slowly along a row\n(gradients "
                           "shrink as the loss falls, weights grow); a sudden jump between epochs is the alarm")
                    if normed else "Update over each epoch (no LR recorded: not normalised)")
    else:
        ax_heat.set_axis_off()
        _note(ax_heat, "no per-epoch update rows")

    if step_rows:
        steps, ratios, normed, undefined = _update_grid(d, step_rows, pos, "step")
        ratios = ratios.T  # steps x layers
        if n := int(undefined.sum()):
            ax_step.text(0.01, 0.01, f"{n} ratio{'s' * (n > 1)} > {_sci(UNDEFINED_RATIO)} left out: ||W|| ≈ 0 "
                         "before the step (zero-initialised)", transform=ax_step.transAxes, fontsize=8, color=REF_COLOR)
        marker = {"marker": "o", "ms": 2.5} if len(steps) <= 60 else {}
        # conv and norm layers apart: their typical levels differ, so one band over both says little; the
        # zero-initialised layers (growing from 0) are left out of the BatchNorm band.
        for group, color, ls, what in (("weights", "k", "-", "conv / fc"), ("norm", "0.4", ":", "BatchNorm")):
            if groups[group]:
                q25, med, q75 = _nanstat(np.nanpercentile, ratios[:, groups[group]], [25, 50, 75], axis=1)
                ax_step.fill_between(steps, q25, q75, color=color, alpha=0.12, lw=0)
                left_out = " (not zero-init)" if group == "norm" and zero_init else ""
                ax_step.plot(steps, med, color=color, ls=ls, lw=2.2, zorder=3, gid=f"update:{group}",
                             label=f"{what} layers{left_out}: median, 25–75% band", **marker)
        _log_y(ax_step, ratios)
        _readable_log(ax_step)
        ax_step.set(xlabel="global step (sampled steps)",
                    ylabel="(||ΔW|| / ||W|| of one step) ÷ its LR" if normed else "||ΔW|| / ||W|| of one step",
                    title="One optimizer step's update " + (
                        "÷ the LR that made it.\nHealthy: level or slowly falling once under way; a rise of 10× or more "
                        "then is an instability" + ("\n(early rises: momentum building up"
                                                    + (", zero-initialised branches waking up" if zero_init else "")
                                                    + ")") if normed else "(no LR recorded: not normalised)"))
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
