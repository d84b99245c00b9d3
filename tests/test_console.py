"""What a person reads, through the command line: the header (device, no placeholders), the md5 note once, progress
lines off a terminal and the run's estimate, the loss on the bar, aligned epoch columns, 120 columns everywhere."""

import json
import re

import pytest

from support import run_cli

WIDTH = 120
TINY_CLI = ["--dataset", "synthetic", "--synthetic-size", "32", "--batch-size", "8", "--wandb", "off"]


def too_wide(text: str) -> list[str]:
    return [line for line in text.splitlines() if len(line) > WIDTH]


@pytest.fixture(scope="module")
def fast_recipe_run(tmp_path_factory, fake_cifar):
    """The fast recipe (flip TTA, a warm-up epoch with its peak inside) on fake CIFAR files, off a terminal."""
    run = tmp_path_factory.mktemp("console") / "r"
    result = run_cli("train", "--recipe", "fast", "--data-dir", str(fake_cifar), "--train-subset", "48",
                     "--test-subset", "20", "--batch-size", "8", "--epochs", "3", "--warmup-epochs", "1.5",
                     "--log-interval", "0", "--wandb", "off", "--run-dir", str(run))
    assert result.returncode == 0, result.stderr
    return run, result


def test_every_line_fits_120_columns_and_the_header_has_no_placeholders(fast_recipe_run):
    run, result = fast_recipe_run
    assert not too_wide(result.stdout + result.stderr), [(len(line), line) for line in too_wide(result.stdout)]
    header = result.stdout.split("columns:")[0]
    assert "None" not in header and "=auto" not in header
    assert "config: recipe fast, with epochs=3 batch_size=8 warmup_epochs=1.5" in header
    assert f"(all settings: {run / 'config.json'})" in header.replace("\n    ", " ")
    assert f"plots in {run / 'plots'}: training_curves.png" in result.stdout


def test_the_md5_note_is_said_once_and_short(fast_recipe_run):
    _, result = fast_recipe_run
    both = result.stdout + result.stderr
    assert both.count("md5") == 1 and both.count("the official CIFAR-10") == 1
    (line,) = [line for line in both.replace("\n    ", " ").splitlines() if "md5" in line]
    assert line.startswith("warning: ") and line.endswith("so it is used")


def test_a_cpu_run_says_so_at_the_top_with_an_estimate_and_the_quick_check(fast_recipe_run):
    _, result = fast_recipe_run
    lines = result.stdout.splitlines()
    assert lines[1].startswith("warning: no GPU found: training on CPU") and "--fast-dev-run" in lines[1]
    (estimate,) = [line for line in lines if line.startswith("estimate ")]
    assert re.search(r"^estimate from 5 steps: [\d.]+ s/step; epoch ~[\d.]+ (s|min|h) \+ ~[\d.]+ (s|min|h) eval "
                     r"\(by FLOPs\); run ~[\d.]+ (s|min|h) \(3 epochs left\)$", estimate), estimate
    assert lines.index(estimate) < next(i for i, line in enumerate(lines) if line.startswith("epoch 0 "))


def test_off_a_terminal_progress_lines_say_step_loss_lr_speed_and_time_left(fast_recipe_run):
    run, result = fast_recipe_run
    progress = [line for line in result.stdout.splitlines() if line.startswith("  epoch ")]
    # --log-interval 0: a line at every step (the CPU has each loss at once), 6 steps in each of 3 epochs
    steps = [tuple(map(int, re.search(r"epoch (\d) step (\d)/6", line).groups())) for line in progress
             if " step " in line]
    assert steps == [(e, k) for e in range(3) for k in range(1, 7)]
    losses = [json.loads(x)["loss"] for x in (run / "steps.jsonl").read_text().splitlines()]
    shown = [float(re.search(r" loss ([\d.]+) ", line).group(1)) for line in progress if " step " in line]
    # the running mean of the epoch's step losses so far
    assert shown[:3] == [pytest.approx(sum(losses[:k]) / k, abs=2e-4) for k in (1, 2, 3)]
    assert re.search(r"epoch 0 step 3/6 loss [\d.]+ lr [\d.e-]+ \| [\d,]+ img/s \| epoch ends in ~.*, run in ~",
                     progress[2]), progress[2]


def test_epoch_lines_keep_their_columns_and_show_the_peak_lr_and_tta_to_two_decimals(fast_recipe_run):
    _, result = fast_recipe_run
    epochs = [line for line in result.stdout.splitlines() if re.match(r"epoch \d \[", line)]
    assert len(epochs) == 3
    for marker in (" loss ", " acc ", " lr ", " | ", " s ", " img/s", " GFLOP/s"):
        assert len({line.index(marker) for line in epochs}) == 1, (marker, epochs)
    assert re.search(r"acc +\d+\.\d\d/ *\d+\.\d\d/ *\d+\.\d\d%", epochs[0]), epochs[0]  # train/test/flip TTA
    # a warm-up of 1.5 epochs: epoch 0 rises to its end (start→end); epoch 1 peaks in its middle (start→peak→end)
    assert re.search(r"lr [\d.e-]+→[\d.e-]+ ", epochs[0]) and re.search(r"lr 0.16→0.2→0.16 ", epochs[1])


def test_the_bar_on_a_terminal_shows_the_running_loss(tmp_path):
    result = run_cli("train", *TINY_CLI, "--epochs", "1", "--progress", "on", "--no-report",
                     "--run-dir", str(tmp_path / "r"))
    assert result.returncode == 0, result.stderr
    assert re.search(r"img/s, loss \d\.\d{4}\]", result.stderr), result.stderr[-500:]


def test_one_step_is_said_in_the_singular_and_a_finished_run_leaves_no_lock(tmp_path):
    result = run_cli("train", *TINY_CLI, "--synthetic-size", "10", "--epochs", "1", "--progress", "off",
                     "--no-report", "--run-dir", str(tmp_path / "r"))
    assert result.returncode == 0, result.stderr
    assert "(1 step of 8;" in result.stdout
    assert not (tmp_path / "r" / ".lock").exists()
    assert (tmp_path / "r" / "summary.json").exists()


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="CUDA only: the asynchronous loss copy")
def test_progress_lines_add_no_host_sync_to_the_step_loop_on_cuda():
    import torch

    from fastcifar.config import build_config, resolve
    from fastcifar.data.cifar import load_dataset
    from fastcifar.distributed import DistInfo
    from fastcifar.progress import EpochProgress
    from fastcifar.train import build_session

    cfg = build_config(dataset="synthetic", synthetic_size=512, batch_size=32, epochs=1, wandb="off", monitor=False,
                       device="cuda", compile="off", cuda_graphs="off")
    ds = load_dataset(cfg.dataset, synthetic_size=cfg.synthetic_size, seed=cfg.seed)
    s = build_session(cfg, DistInfo(), ds, resolve(cfg), notice=lambda text: None)
    lines = []
    progress = EpochProgress(s, epoch=0, end_epoch=1, interval=0.0, write=lambda text, flush: lines.append(text))
    s.model.train()
    s.train_loader.set_epoch(0)
    s.step_index.zero_()
    for images, labels in s.train_loader:
        s.stepper(images, labels, False)
        torch.cuda.set_sync_debug_mode("error")  # any implicit sync inside update() raises
        try:
            progress.update(len(labels))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    progress.update(0)  # the last copy has landed: its line is written
    assert lines and all(re.match(r"  epoch 0 step \d+/16 loss \d\.\d{4} lr ", line) for line in lines), lines
