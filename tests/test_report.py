"""fastcifar.report: the report's figures drawn from a fabricated run directory (no training needed)."""

import json
import math
import random
import re
import subprocess
import sys

import numpy as np
import pytest
from matplotlib.image import imread

from fastcifar import FastCifarError
from fastcifar.cli import main
from fastcifar.config import default_grad_epochs
from fastcifar.model import resnet18_cifar
from fastcifar.monitor import parameterised_layers
from fastcifar.report import build_figures, make_report
from fastcifar.report.common import FLAG_COLOR, REF_COLOR

LAYERS = [name for name, _ in parameterised_layers(resnet18_cifar())]
PNGS = ["training_curves.png", "gradient_flow.png", "weight_updates.png"]


def _kind(layer):
    return "norm" if "bn" in layer or "downsample.1" in layer else "linear" if layer == "fc" else "conv"


NORM = [i for i, n in enumerate(LAYERS) if _kind(n) == "norm"]
WEIGHTS = [i for i, n in enumerate(LAYERS) if _kind(n) != "norm"]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def fabricate_run(run_dir, *, epochs=6, planned=None, steps_per_epoch=40, samples=4, monitor=True, grad_epochs=None,
                  flagged="layer1.0.bn1", flagged_epoch=1, synthetic=True, old_format=False, seed=0):
    """A run directory shaped like train.py's: config.json, metrics.jsonl, steps.jsonl and (monitor) the
    per-layer rows, with plausible magnitudes: a cosine LR decaying towards 0, RMS gradients falling smoothly
    with depth while the norm saws up and down with layer size (conv 10^4-10^6 parameters, BatchNorm 10^2),
    update ratios proportional to the LR, one layer flagged vanishing. old_format: the files of older runs (no
    steps.jsonl; no kind, numel, rms or lr in the monitor rows)."""
    rng = random.Random(seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    dataset = "SYNTHETIC data (2048 train / 1024 test, not CIFAR-10)" if synthetic else "CIFAR-10 from ./data"
    (run_dir / "config.json").write_text(json.dumps({
        "config": {"epochs": planned or epochs, "recipe": "worksheet", "batch_size": 128, "lr": 1e-3,
                   "grad_epochs": grad_epochs, "grad_low": 1e-7, "grad_high": 1e3},
        "resolved": {"device_name": "cpu", "dataset": dataset, "steps_per_epoch": steps_per_epoch}}))
    total = (planned or epochs) * steps_per_epoch
    lr_at = lambda s: 1e-3 * 0.5 * (1 + math.cos(math.pi * s / total))
    metrics, steps, grads, updates = [], [], [], []
    n = len(LAYERS)
    for epoch in range(epochs):
        acc = 0.35 + 0.55 * (1 - math.exp(-epoch / 2))
        first, last = epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch - 1
        metrics.append({"epoch": epoch, "train_loss": 1.8 * math.exp(-epoch / 3) + 0.1, "train_acc": acc + 0.03,
                        "test_loss": 1.7 * math.exp(-epoch / 3) + 0.3, "test_acc": acc, "lr": lr_at(first),
                        "lr_end": lr_at(last), "train_time_s": 10.0, "eval_time_s": 1.0, "epoch_time_s": 11.0,
                        "train_images_per_s": 512.0,
                        "flags": {"vanishing": [flagged] if flagged and epoch == flagged_epoch else [],
                                  "exploding": []}})
        for s in range(first, last + 1):
            steps.append({"epoch": epoch, "step": s, "loss": 2.3 * math.exp(-s / total * 3) * rng.uniform(0.8, 1.2),
                          "lr": lr_at(s)})
        for k in range(samples):
            step = first + k * (steps_per_epoch // samples)
            for i, layer in enumerate(LAYERS):
                numel = 128 if _kind(layer) == "norm" else 9 * 64 * 64 * 2 ** (i // 10)
                rms = 10 ** (-2 - 1.5 * i / n) * (0.85 ** epoch) * rng.uniform(0.8, 1.25)
                if layer == flagged and epoch == flagged_epoch:
                    rms = 1e-10 / math.sqrt(numel)
                norm = rms * math.sqrt(numel)
                grads.append({"epoch": epoch, "step": step, "layer": layer, "index": i, "kind": _kind(layer),
                              "numel": numel, "mean_abs": 0.8 * rms, "max_abs": 30 * rms, "norm": norm, "rms": rms})
                updates.append({"scope": "step", "epoch": epoch, "step": step, "lr": lr_at(step), "layer": layer,
                                "index": i, "kind": _kind(layer),
                                "ratio": lr_at(step) * rng.uniform(0.5, 2) * (3 if _kind(layer) == "norm" else 1)})
        mean_lr = float(np.mean([lr_at(s) for s in range(first, last + 1)]))
        for i, layer in enumerate(LAYERS):
            updates.append({"scope": "epoch", "epoch": epoch, "step": last + 1, "lr": mean_lr, "layer": layer,
                            "index": i, "kind": _kind(layer), "ratio": 20 * mean_lr * rng.uniform(0.5, 2)})
    updates[5]["ratio"] = None  # NaN/Inf are stored as null: must be skipped, not crash
    if old_format:
        for rows, keys in ((grads, ["kind", "numel", "rms"]), (updates, ["kind", "lr"])):
            for r in rows:
                for key in keys:
                    del r[key]
    _write_jsonl(run_dir / "metrics.jsonl", metrics)
    if not old_format:
        _write_jsonl(run_dir / "steps.jsonl", steps)
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


def _lines(fig, prefix=""):
    """gid -> Line2D of every line a figure's code tagged (the data series the tests check)."""
    return {line.get_gid(): line for ax in fig.axes for line in ax.lines
            if line.get_gid() and line.get_gid().startswith(prefix)}


def _axes_of(fig, gid):
    return next(ax for ax in fig.axes for line in ax.lines if line.get_gid() == gid)


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
    assert set(_lines(build_figures(run)["gradient_flow.png"], "grad:weights:")) == {"grad:weights:0",
                                                                                     "grad:weights:2"}


@pytest.mark.parametrize("epochs, planned", [(12, None), (7, 12)])
def test_gradient_flow_default_epochs_follow_the_config_default(tmp_path, epochs, planned):
    run = fabricate_run(tmp_path / "run", epochs=epochs, planned=planned, steps_per_epoch=4, samples=1)
    drawn = sorted(int(g.rsplit(":", 1)[1]) for g in _lines(build_figures(run)["gradient_flow.png"], "grad:weights:"))
    # The planned run's defaults that exist, plus the latest epoch of an unfinished run.
    assert drawn == sorted({e for e in default_grad_epochs(planned or epochs) if e < epochs} | {epochs - 1})
    assert drawn == ([0, 5, 10, 11] if planned is None else [0, 5, 6])


def test_training_curves_plot_every_step_and_an_lr_axis_that_reaches_zero(tmp_path):
    run = fabricate_run(tmp_path / "run", epochs=2, steps_per_epoch=40)
    steps = _read_jsonl(run / "steps.jsonl")
    fig = build_figures(run)["training_curves.png"]
    lines = _lines(fig)
    assert "train_loss_epoch" not in lines  # per step, not per epoch
    step_line = lines["train_loss_step"]
    np.testing.assert_allclose(step_line.get_ydata(), [r["loss"] for r in steps])
    np.testing.assert_allclose(step_line.get_xdata(), [r["step"] / 40 for r in steps])  # x: fractional epoch
    assert _axes_of(fig, "train_loss_step").get_yscale() == "log"
    np.testing.assert_allclose(lines["test_loss"].get_xdata(), [1, 2])  # measured at each epoch's end
    np.testing.assert_allclose(lines["lr"].get_ydata(), [r["lr"] for r in steps])
    assert _axes_of(fig, "lr").get_ylim()[0] == 0


def test_training_curves_of_a_one_epoch_run_show_its_steps(tmp_path):
    run = fabricate_run(tmp_path / "run", epochs=1, steps_per_epoch=12, flagged_epoch=0)
    fig = build_figures(run)["training_curves.png"]
    assert len(_lines(fig)["train_loss_step"].get_xdata()) == 12
    assert fig.axes[0].get_xlim()[1] >= 1  # the end-of-epoch test point is inside the axes


def test_gradient_flow_plots_rms_with_conv_and_norm_layers_apart(tmp_path):
    run = fabricate_run(tmp_path / "run", epochs=2)
    rows = [r for r in _read_jsonl(run / "grad_flow.jsonl") if r["epoch"] == 0]
    expected = [np.mean([r["rms"] for r in rows if r["index"] == i]) for i in range(len(LAYERS))]
    lines = _lines(build_figures(run)["gradient_flow.png"], "grad:")
    for group, idx in (("weights", WEIGHTS), ("norm", NORM)):
        line = lines[f"grad:{group}:0"]
        assert list(line.get_xdata()) == idx  # a line never joins a conv layer to a norm layer
        np.testing.assert_allclose(line.get_ydata(), [expected[i] for i in idx], rtol=1e-9)


def _margin(fig):
    return next(t for ax in fig.axes if "vs limits" in (t := ax.get_title()))


def test_gradient_flow_states_the_margin_to_the_flag_limits(tmp_path):
    run = fabricate_run(tmp_path / "ok", flagged=None)
    norms = [r["norm"] for r in _read_jsonl(run / "grad_flow.jsonl")]
    text = _margin(build_figures(run)["gradient_flow.png"])
    low, high = re.search(r"^no layer flagged; range (\S+)–(\S+) vs limits 1e-7/1e3 \(", text).groups()
    assert float(low) == pytest.approx(min(norms), rel=0.05) and float(high) == pytest.approx(max(norms), rel=0.05)
    flagged = _margin(build_figures(fabricate_run(tmp_path / "bad"))["gradient_flow.png"])
    assert flagged.startswith("FLAGGED vanishing: layer1.0.bn1 (epoch 1); range 1e-10–")
    assert re.search(r"\(lowest ×(1000|1e3) BELOW it, ×\S+ below the high one\)$", flagged)


def test_gradient_flow_counts_zero_norms_and_keeps_many_flags_short(tmp_path):
    """zero_init_residual: at the first step every residual branch gets a gradient of exactly 0 and is flagged.
    A log axis cannot show 0; the margin must not quietly start at the smallest non-zero norm."""
    run = fabricate_run(tmp_path / "run", flagged=None)
    branch = [n for n in LAYERS if ".conv" in n or ".bn1" in n]
    rows = _read_jsonl(run / "grad_flow.jsonl")
    _write_jsonl(run / "grad_flow.jsonl", [{**r, "norm": 0.0, "rms": 0.0, "mean_abs": 0.0, "max_abs": 0.0}
                                           if r["step"] == 0 and r["layer"] in branch else r for r in rows])
    metrics = _read_jsonl(run / "metrics.jsonl")
    metrics[0]["flags"]["vanishing"] = branch
    _write_jsonl(run / "metrics.jsonl", metrics)
    fig = build_figures(run)["gradient_flow.png"]
    text = _margin(fig)
    assert text.startswith(f"FLAGGED vanishing: {len(branch)} layers (epoch 0); range 0–")
    assert f"({len(branch)} norms exactly 0, " in text and len(text) < 130
    floor = next(line for ax in fig.axes for line in ax.lines if line.get_label() == "a sampled norm was exactly 0")
    assert sorted(floor.get_xdata()) == [LAYERS.index(n) for n in branch]


def test_zero_norms_of_a_zero_init_run_at_step_0_are_no_alarm(tmp_path):
    """The monitor does not flag the branches' zero gradients at step 0 of a zero_init_residual run (they are
    zero by construction); the figure says so instead of turning its margin line red."""
    run = fabricate_run(tmp_path / "run", flagged=None)
    branch = [n for n in LAYERS if ".conv" in n or ".bn1" in n]
    _write_jsonl(run / "grad_flow.jsonl", [{**r, "norm": 0.0, "rms": 0.0} if r["step"] == 0 and r["layer"] in branch
                                           else r for r in _read_jsonl(run / "grad_flow.jsonl")])
    config = json.loads((run / "config.json").read_text())
    for zero_init, colour in ((True, "k"), (False, FLAG_COLOR)):  # black, not green: no verdict of health
        config["config"]["zero_init_residual"] = zero_init
        (run / "config.json").write_text(json.dumps(config))
        fig = build_figures(run)["gradient_flow.png"]
        title = next(ax.title for ax in fig.axes if "vs limits" in ax.get_title())
        assert title.get_text().startswith("no layer flagged; range 0–")
        assert ("by design" in title.get_text()) == zero_init and title.get_color() == colour
        markers = {line.get_label(): line.get_color() for ax in fig.axes for line in ax.lines
                   if "exactly 0" in line.get_label()}  # the zero markers: grey when by design, red otherwise
        assert markers == ({"exactly 0 at step 0, by design (zero-initialised)": REF_COLOR} if zero_init
                           else {"a sampled norm was exactly 0": FLAG_COLOR})


def test_weight_updates_leave_out_undefined_ratios_of_zero_initialised_layers(tmp_path):
    run = fabricate_run(tmp_path / "run")
    rows = _read_jsonl(run / "updates.jsonl")  # a layer starting at ||W|| = 0: the monitor divides by ~1e-30
    _write_jsonl(run / "updates.jsonl", [{**r, "ratio": 1e28} if r["epoch"] == 0 and r["layer"] == "layer1.0.bn2"
                                         else r for r in rows])
    fig = build_figures(run)["weight_updates.png"]
    heat = next(ax for ax in fig.axes if ax.images)
    assert heat.images[0].norm.vmax < 1e3  # the colour scale is the other layers'
    assert "white: undefined" in heat.get_xlabel()
    assert max(_lines(fig)["update:norm"].get_ydata()) < 1e3
    assert any("left out" in t.get_text() for ax in fig.axes for t in ax.texts)


def test_weight_updates_are_normalised_by_the_lr(tmp_path):
    run = fabricate_run(tmp_path / "run")
    rows = [r for r in _read_jsonl(run / "updates.jsonl") if r["scope"] == "step" and r["index"] in WEIGHTS]
    by_step = {}
    for r in rows:
        by_step.setdefault(r["step"], []).append(r["ratio"] / r["lr"] if r["ratio"] else math.nan)
    fig = build_figures(run)["weight_updates.png"]
    line = _lines(fig)["update:weights"]
    np.testing.assert_allclose(line.get_ydata(), [np.nanmedian(by_step[s]) for s in sorted(by_step)])
    # The cosine LR falls ~100x over the sampled steps; the normalised update stays level.
    raw = [np.nanmedian([r["ratio"] or math.nan for r in rows if r["step"] == s]) for s in sorted(by_step)]
    assert max(raw) / min(raw) > 50 and np.ptp(np.log10(line.get_ydata())) < 0.3
    assert "÷ its LR" in _axes_of(fig, "update:weights").get_ylabel()


def test_old_run_files_still_plot(tmp_path):
    """No steps.jsonl, and no kind/numel/rms/lr in the monitor rows: what runs before them wrote."""
    run = fabricate_run(tmp_path / "run", old_format=True)
    metrics = _read_jsonl(run / "metrics.jsonl")
    _write_jsonl(run / "metrics.jsonl", metrics + [{**metrics[-1], "train_loss": 0.123}])  # a resumed epoch
    figures = build_figures(run)
    assert list(figures) == PNGS
    epoch_line = _lines(figures["training_curves.png"])["train_loss_epoch"]
    np.testing.assert_allclose(epoch_line.get_ydata(), [r["train_loss"] for r in metrics[:-1]] + [0.123])
    # Kinds come from the layer names; without numel the norm is drawn (and the axis says so).
    grad = _lines(figures["gradient_flow.png"], "grad:")
    assert list(grad["grad:norm:0"].get_xdata()) == NORM
    assert "no numel" in _axes_of(figures["gradient_flow.png"], "grad:norm:0").get_ylabel()
    # Without a per-row lr the updates are divided by the LR of metrics.jsonl (lr at an epoch's first step).
    lr = {r["epoch"]: r["lr"] for r in metrics}
    rows = [r for r in _read_jsonl(run / "updates.jsonl") if r["scope"] == "step" and r["index"] in WEIGHTS]
    first = [r["ratio"] / lr[0] for r in rows if r["step"] == 0 and r["ratio"]]
    assert _lines(figures["weight_updates.png"])["update:weights"].get_ydata()[0] == pytest.approx(
        np.median(first))
    for p in make_report(run):
        _check_png(p)
    # Older still: no lr_end either. The LR is then known at each epoch's first step only.
    _write_jsonl(run / "metrics.jsonl", [{k: v for k, v in r.items() if k != "lr_end"} for r in metrics])
    lr_line = _lines(build_figures(run)["training_curves.png"])["lr"]
    np.testing.assert_allclose(lr_line.get_ydata(), [r["lr"] for r in metrics])


def test_report_without_monitor_files_draws_curves_only(tmp_path):
    run = fabricate_run(tmp_path / "run", monitor=False)
    paths = make_report(run)
    assert [p.name for p in paths] == ["training_curves.png"]
    _check_png(paths[0])


def test_report_tolerates_torn_lines_nulls_and_a_single_epoch(tmp_path):
    run = fabricate_run(tmp_path / "run", epochs=1, flagged_epoch=0)
    (run / "config.json").unlink()  # optional: only the title loses detail
    for name in ("grad_flow.jsonl", "steps.jsonl", "metrics.jsonl"):
        with open(run / name, "a") as f:
            f.write('{"epoch": 0, "step": 3, "lay')  # a crash mid-write
    # A diverged run: every ratio and loss non-finite (null). Log axes must not fail on having nothing to draw.
    rows = _read_jsonl(run / "updates.jsonl")
    _write_jsonl(run / "updates.jsonl", [{**r, "ratio": None} for r in rows])
    assert [p.name for p in make_report(run)] == PNGS


@pytest.mark.parametrize("content", [
    bytes(range(256)) * 4,  # binary, with newlines in it
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\xff",  # another file's bytes
    b"\x00\xff\xfe\x01" * 64,  # binary without a newline: a single "torn" line, yet no run wrote it
    b"not json at all\n",
    b'{"epoch": 0, "train_loss": 1.0}\n<<garbage>>\n{"epoch": 1, "train_loss": 0.9}\n',
])
def test_damaged_metrics_is_one_clear_error(tmp_path, capsys, content):
    run = fabricate_run(tmp_path / "run", epochs=2, monitor=False)
    (run / "metrics.jsonl").write_bytes(content)
    with pytest.raises(FastCifarError, match=r"metrics\.jsonl is damaged"):
        make_report(run)
    assert main(["report", str(run)]) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "metrics.jsonl is damaged" in err and "Traceback" not in err


def test_report_rejects_a_non_run_directory(tmp_path):
    with pytest.raises(FastCifarError, match="not a fastcifar run directory"):
        make_report(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text("")
    with pytest.raises(FastCifarError, match=r"no metrics\.jsonl"):
        make_report(tmp_path / "empty")


def test_report_module_stays_light():
    """`fastcifar report` must not pay for torch (nor the monitor or the trainer that import it)."""
    code = ("import sys, fastcifar.report; "
            "print(sorted(m for m in ('torch', 'fastcifar.monitor', 'fastcifar.train') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_accuracy_has_a_chance_line_and_validation_chooses_the_circled_epoch(tmp_path):
    run = fabricate_run(tmp_path / "run", epochs=4, monitor=False)
    metrics = _read_jsonl(run / "metrics.jsonl")
    for row, val in zip(metrics, [0.2, 0.6, 0.4, 0.3]):  # validation peaks at epoch 1, the test at epoch 3
        row["val_acc"] = val
    _write_jsonl(run / "metrics.jsonl", metrics)
    fig = build_figures(run)["training_curves.png"]
    chance = _lines(fig)["chance"]
    assert list(chance.get_ydata()) == [10, 10] and chance.get_label() == "chance (10%)"
    np.testing.assert_allclose(_lines(fig)["val_acc"].get_ydata(), [20, 60, 40, 30])
    ax = _axes_of(fig, "val_acc")
    circled = ax.collections[0]
    assert circled.get_label().startswith("chosen on validation: epoch 1, test ")
    np.testing.assert_allclose(circled.get_offsets()[0], [2, 100 * metrics[1]["test_acc"]])


def test_gradient_flow_shows_the_vanishing_limit_in_rms_terms_per_layer(tmp_path):
    """The flags test the norm against --grad-low; the top panel plots RMS = norm/√numel, so the limit a layer
    meets there is grad_low/√numel: drawn per layer, not left for the reader to confuse with the RMS values."""
    run = fabricate_run(tmp_path / "run", epochs=1, flagged=None)
    numel = {r["index"]: r["numel"] for r in _read_jsonl(run / "grad_flow.jsonl")}
    limits = _lines(build_figures(run)["gradient_flow.png"])["limit:vanishing-rms"]
    np.testing.assert_allclose(limits.get_ydata(), [1e-7 / math.sqrt(numel[i]) for i in range(len(LAYERS))])


def test_weight_updates_say_what_healthy_looks_like_without_a_self_referencing_line(tmp_path):
    fig = build_figures(fabricate_run(tmp_path / "run", epochs=2))["weight_updates.png"]
    titles = " ".join(ax.get_title() for ax in fig.axes)
    assert titles.count("Healthy:") == 2 and "a row of even colour follows the LR" not in titles
    labels = [line.get_label() for ax in fig.axes for line in ax.lines]
    assert not any("median" in label and "reference" in label for label in labels)  # the run's own median is gone


def test_zero_initialised_rows_are_hatched_and_kept_off_the_colour_scale(tmp_path):
    """--zero-init-residual: each block's bn2 starts at ||W|| = 0, so its ratio is undefined at epoch 0 and huge
    while ||W|| grows: hatched and labelled, not the top of a scale that makes it read as exploding."""
    run = fabricate_run(tmp_path / "run", epochs=3, flagged=None)
    config = json.loads((run / "config.json").read_text())
    config["config"]["zero_init_residual"] = True
    (run / "config.json").write_text(json.dumps(config))
    bn2 = [n for n in LAYERS if n.endswith(".bn2") and n.startswith("layer")]
    growing = {0: 1e28, 1: 5.0, 2: 0.5}  # undefined, then 1000x the others, then settling
    _write_jsonl(run / "updates.jsonl", [{**r, "ratio": growing[r["epoch"]]} if r["layer"] in bn2 else r
                                         for r in _read_jsonl(run / "updates.jsonl")])
    fig = build_figures(run)["weight_updates.png"]
    heat = next(ax for ax in fig.axes if ax.images)
    others = [r["ratio"] / r["lr"] for r in _read_jsonl(run / "updates.jsonl")
              if r["scope"] == "epoch" and r["layer"] not in bn2 and r["ratio"]]
    assert heat.images[0].norm.vmax == pytest.approx(max(others))
    assert sorted(p.get_gid() for p in heat.patches) == sorted(f"zero-init:{n}" for n in bn2)
    assert [t.get_text() for t in heat.get_yticklabels() if "(zero-init)" in t.get_text()] == [
        f"{n} (zero-init)" for n in bn2]
    assert "hatched: zero-initialised" in heat.get_xlabel()
    white = heat.images[1].get_array()  # the overlay: off the scale, whole rows of the zero-init layers
    assert all(np.ma.getdata(white)[LAYERS.index(n)].tolist() == [1.0, 1.0, 1.0] for n in bn2)
    norm_band = _lines(fig)["update:norm"]
    assert max(norm_band.get_ydata()) < 1e3 and "(not zero-init)" in norm_band.get_label()
