"""The trainer through its real command line: learning, files, resume equivalence, flags, faults."""

import json
import os

import pytest
import torch

from support import run_cli, tiny_config, without_timings
from fastcifar.cli import main
from fastcifar.train import fit


@pytest.fixture(scope="session")
def synthetic_run(tmp_path_factory):
    """One 2-epoch synthetic run through `python -m fastcifar train` with the recipe's defaults but a smaller set and
    batch (4 steps an epoch, as the default 512 images at 128 give: half the CPU time), shared by several tests."""
    run_dir = tmp_path_factory.mktemp("runs") / "synthetic"
    result = run_cli("train", "--dataset", "synthetic", "--synthetic-size", "256", "--batch-size", "64", "--epochs",
                     "2", "--run-dir", str(run_dir), "--wandb", "off")
    assert result.returncode == 0, result.stderr
    return run_dir, result


def test_two_epoch_synthetic_run_learns_and_records_everything(synthetic_run):
    run_dir, result = synthetic_run
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["finished"] and summary["epochs_done"] == 2
    assert summary["final_test_acc"] >= 0.5, summary  # chance is 0.1
    assert "SYNTHETIC" in summary["dataset"] and "SYNTHETIC" in result.stdout
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1]
    for key in ("train_loss", "train_acc", "test_loss", "test_acc", "epoch_time_s", "train_time_s",
                "train_images_per_s", "lr", "achieved_gflops"):
        assert all(r[key] is not None for r in rows), key
    assert rows[1]["lr"] < rows[0]["lr"]  # cosine
    config = json.loads((run_dir / "config.json").read_text())
    assert config["config"]["optimizer"] == "adam" and config["config"]["lr"] == 1e-3  # the worksheet recipe's
    assert config["resolved"]["compile"] is False and config["resolved"]["amp"] == "off"  # CPU auto
    for name in ("last.pt", "best.pt"):
        assert (run_dir / name).stat().st_size > 40e6  # 11.2 M fp32 parameters
    # Printed: the resolved config, one line per epoch naming what is active, and the results table.
    assert "resolved: device=cpu compile=False channels_last=True" in result.stdout
    assert result.stdout.count("epoch ") >= 2 and "cpu channels_last fp32 torch" in result.stdout
    assert "Best test accuracy" in result.stdout and "Average epoch time" in result.stdout
    assert not list(run_dir.glob(".*.tmp"))  # atomic writes leave no temp files


def _weights(run_dir):
    return torch.load(run_dir / "last.pt", weights_only=False)["model"]



def test_resume_equals_straight_run_to_the_last_digit(tmp_path):
    straight = fit(tiny_config(tmp_path / "a"))
    assert straight["finished"]
    fit(tiny_config(tmp_path / "b"), stop_after_epoch=1)
    rows_b = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert len(rows_b) == 1
    rc = main(["train", "--resume", str(tmp_path / "b"), "--progress", "off"])
    assert rc == 0
    wa, wb = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    ra = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    rb = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert without_timings(ra) == without_timings(rb)  # appended to the same metrics.jsonl, identical numbers
    ga = (tmp_path / "a" / "grad_flow.jsonl").read_text()
    assert ga == (tmp_path / "b" / "grad_flow.jsonl").read_text()


def test_same_seed_same_metrics_other_seed_differs(tmp_path):
    a = fit(tiny_config(tmp_path / "a", epochs=1, monitor=False))
    b = fit(tiny_config(tmp_path / "b", epochs=1, monitor=False))
    c = fit(tiny_config(tmp_path / "c", epochs=1, monitor=False, seed=1))
    assert a["final_train_loss"] == b["final_train_loss"] and a["final_test_loss"] == b["final_test_loss"]
    assert a["final_train_loss"] != c["final_train_loss"]


def test_resume_refuses_changed_recipe_and_finished_runs(tmp_path, capsys):
    fit(tiny_config(tmp_path / "r", epochs=1, monitor=False))
    assert main(["train", "--resume", str(tmp_path / "r"), "--lr", "0.5"]) == 1
    assert "cannot change: --lr" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path / "r")]) == 1
    assert "already finished all 1 epochs" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path / "missing")]) == 1
    assert "cannot resume" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path / "r"), "--recipe", "fast"]) == 1
    assert "cannot change: --recipe" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--batch-size", "0"], "--batch-size must be a positive whole number, got 0"),
    (["--batch-size", "-4"], "--batch-size must be a positive whole number, got -4"),
    (["--epochs", "0"], "--epochs must be a positive whole number, got 0"),
    (["--lr", "0"], "--lr must be positive, got 0.0"),
    (["--lr=-1e-3"], "--lr must be positive"),
    (["--weight-decay", "-1"], "--weight-decay must be zero or positive"),
    (["--train-subset", "0"], "--train-subset must be positive"),
    (["--stop-after-epoch", "0"], "--stop-after-epoch must be a positive whole number"),
])
def test_bad_numbers_are_refused_with_a_clear_message(flags, message, capsys, tmp_path):
    assert main(["train", "--dataset", "synthetic", "--run-dir", str(tmp_path / "r"), *flags]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()  # refused before anything was written


@pytest.mark.parametrize("flags, message", [
    (["--optimizer", "lion"], "invalid choice: 'lion'"),
    (["--amp", "fp8"], "invalid choice: 'fp8'"),
    (["--recipe", "nope"], "invalid choice: 'nope'"),
    (["--epochs", "two"], "invalid int value: 'two'"),
])
def test_unknown_choices_exit_2_with_usage(flags, message, capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", *flags])
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_batch_larger_than_the_data_is_explained(tmp_path, capsys):
    rc = main(["train", "--dataset", "synthetic", "--synthetic-size", "64", "--batch-size", "128", "--wandb", "off",
               "--run-dir", str(tmp_path / "r")])
    assert rc == 1 and "fewer than one batch of 128" in capsys.readouterr().err


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere: permissions cannot be tested")
def test_unwritable_run_dir_is_refused(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert main(["train", "--dataset", "synthetic", "--run-dir", str(locked / "run"), "--wandb", "off"]) == 1
    assert "is not writable" in capsys.readouterr().err


def test_run_dir_that_is_a_file_is_refused(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main(["train", "--dataset", "synthetic", "--run-dir", str(blocker / "run"), "--wandb", "off"]) == 1
    err = capsys.readouterr().err
    assert "is not writable" in err and "Traceback" not in err


def test_module_entry_point_and_help():
    result = run_cli("train", "--help")
    assert result.returncode == 0
    for flag in ("--epochs", "--batch-size", "--lr", "--optimizer", "--weight-decay", "--scheduler", "--compile",
                 "--channels-last", "--amp", "--device", "--loader", "--wandb", "--resume", "--train-subset"):
        assert flag in result.stdout


def test_plots_are_drawn_at_the_end_and_by_fastcifar_report(synthetic_run, tmp_path, capsys):
    from PIL import Image

    run_dir, result = synthetic_run
    assert "\r" not in result.stderr  # not a terminal: plain lines, no progress bar
    for name in ("training_curves", "gradient_flow", "weight_updates"):
        png = run_dir / "plots" / f"{name}.png"
        assert png.stat().st_size > 20_000
        width, height = Image.open(png).size
        assert width >= 1000 and height >= 400
    assert main(["report", str(run_dir), "--out", str(tmp_path / "again")]) == 0
    printed = capsys.readouterr().out.split()
    assert sorted(printed) == sorted(str(tmp_path / "again" / f"{n}.png")
                                     for n in ("gradient_flow", "training_curves", "weight_updates"))
    assert main(["report", str(tmp_path / "not-a-run")]) == 1
    assert "not a fastcifar run directory" in capsys.readouterr().err


def test_compile_builds_one_graph_for_training_and_one_for_evaluation(tmp_path):
    """Static shapes: one graph for training and one for evaluation, even with an eval batch that differs from the
    training batch (dynamic=False: no dynamic-shape graph), none for the padded last eval batch or later epochs
    (CPU; ~1 min to compile)."""
    from torch._dynamo.utils import counters

    counters.clear()
    # 40 training images at batch 8; 20 test images at eval batch 12 = one full eval batch + one padded
    fit(tiny_config(tmp_path / "r", synthetic_size=40, eval_batch_size=12, compile="on"))
    assert counters["stats"]["unique_graphs"] == 2
    assert not counters["graph_break"]


def test_checkpoint_count_and_time_stay_cumulative_across_a_resume(tmp_path):
    """last.pt cannot hold the duration of the save that writes it: a resume counts that save from the files."""
    run = tmp_path / "r"
    first = fit(tiny_config(run, epochs=2, monitor=False))
    assert first["checkpoints"] == 2
    assert main(["train", "--resume", str(run), "--epochs", "3"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["checkpoints"] == 3 and summary["checkpoint_time_s"] > first["checkpoint_time_s"]
