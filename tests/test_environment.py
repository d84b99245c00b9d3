"""A hostile environment through the command line: output that goes away, a hang-up, paths and files the system
refuses, values too large to mean anything; and messages that say the right thing (commands that paste, advice
that applies). Each is one clear line or no interruption at all, never a traceback.
"""

import json
import os
import shlex
import signal
import subprocess
import sys

import pytest
import torch

from support import REPO, tiny_config
from test_faults import TINY_FLAGS, inject, rows
from fastcifar import files, report, session, train
from fastcifar.cli import main
from fastcifar.config import MAX_EPOCHS
from fastcifar.train import fit


def fastcifar(*args, **popen):
    popen.setdefault("env", {**os.environ, "WANDB_MODE": "disabled"})
    return subprocess.run([sys.executable, "-m", "fastcifar", *args], cwd=REPO, text=True, timeout=300, **popen)


# --- output that goes away -------------------------------------------------------------------------------------
def test_closed_stdout_does_not_stop_training(tmp_path):
    """`fastcifar train ... >&-`: Python starts with sys.stdout None; the run trains to its end."""
    run = tmp_path / "r"
    result = fastcifar("train", *TINY_FLAGS, "--epochs", "1", "--run-dir", str(run), stderr=subprocess.PIPE,
                       preexec_fn=lambda: os.close(1))
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert json.loads((run / "summary.json").read_text())["epochs_done"] == 1


def test_a_broken_pipe_on_stdout_does_not_stop_training(tmp_path):
    """stdout piped into a reader that has gone (`| head -1` after its line): one note on stderr, and the run
    trains to its end; the run directory is its record."""
    run = tmp_path / "r"
    read_end, write_end = os.pipe()
    os.close(read_end)  # nobody reads: every write to stdout fails with EPIPE
    try:
        result = fastcifar("train", *TINY_FLAGS, "--epochs", "1", "--run-dir", str(run), stdout=write_end,
                           stderr=subprocess.PIPE)
    finally:
        os.close(write_end)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "note: stdout is gone (Broken pipe): nothing more is printed to it; a training run goes on" \
        in result.stderr
    assert "Traceback" not in result.stderr and "BrokenPipeError" not in result.stderr
    assert [r["epoch"] for r in rows(run)] == [0] and (run / "last.pt").exists()


def test_a_stream_written_after_surviving_output_ended_stays_silent(monkeypatch, capsys):
    """A logging handler made during a command keeps the wrapper; once the command is over and its stream is
    closed (pytest's capture, a finished subprocess pipe), a late write is dropped without a note on the other
    stream: the note is for the live command only."""
    import io
    import logging

    from fastcifar.console import surviving_output

    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    with surviving_output():
        handler = logging.StreamHandler()  # holds the wrapped sys.stderr, as such handlers do
    monkeypatch.undo()
    stream.close()
    handler.emit(logging.makeLogRecord({"msg": "late"}))
    handler.flush()
    assert capsys.readouterr() == ("", "")


def test_a_terminal_that_cannot_show_the_run_directory_name_does_not_stop_training(tmp_path):
    """An ASCII-only stdout and a run directory named in other letters: printed escaped, never a traceback."""
    run = tmp_path / "été"
    result = fastcifar("train", *TINY_FLAGS, "--epochs", "1", "--run-dir", str(run), capture_output=True,
                       env={**os.environ, "WANDB_MODE": "disabled", "PYTHONIOENCODING": "ascii"})
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "run directory " + str(tmp_path / "\\xe9t\\xe9") in result.stdout
    assert [r["epoch"] for r in rows(run)] == [0]


@pytest.mark.parametrize("ignored", [False, True], ids=["hangup", "nohup"])
def test_sighup_stops_like_sigterm_unless_nohup_ignored_it(tmp_path, ignored):
    run = tmp_path / "r"
    result = subprocess.run(
        [sys.executable, str(REPO / "tests" / "inject.py"), "train", *TINY_FLAGS, "--epochs", "2", "--run-dir",
         str(run)], capture_output=True, text=True, cwd=REPO, timeout=300,
        env={**os.environ, "FASTCIFAR_TEST_FAULT": "signal-at-step:SIGHUP:6", "WANDB_MODE": "disabled"},
        preexec_fn=(lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN)) if ignored else None)
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    if ignored:
        assert result.returncode == 0 and [r["epoch"] for r in rows(run)] == [0, 1]
    else:
        assert result.returncode == 129, result.stderr[-2000:]
        assert "stopped by SIGHUP" in result.stdout
        assert f"continue with: fastcifar train --resume {run}" in result.stdout
        assert [r["epoch"] for r in rows(run)] == [0]
        assert torch.load(run / "last.pt", weights_only=False)["epoch"] == 1


# --- the environment refuses ------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags, message", [
    (["--dataset", "cifar10", "--data-dir", str(REPO / "README.md")],
     f"--data-dir {REPO / 'README.md'}: {REPO / 'README.md'} is a file, not a folder"),
    (["--seed", "-1"], "--seed must be a whole number from 0 to"),
    (["--epochs", "1000000000"], f"--epochs 1,000,000,000 is more than the largest sensible value, {MAX_EPOCHS:,}"),
    (["--dataset", "cifar10", "--data-dir", "d" * 300], f"--data-dir {'d' * 300}: file name too long."),
    (["--init-from", "c" * 300], f"cannot read checkpoint {'c' * 300} (file name too long)."),
])
def test_environment_and_range_errors_are_one_line_before_the_run_directory_exists(tmp_path, capsys, flags, message):
    run = tmp_path / "r"
    assert main(["train", *TINY_FLAGS, "--epochs", "1", "--run-dir", str(run), *flags]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not run.exists()


def test_a_run_directory_name_longer_than_the_filesystem_allows_is_one_line(tmp_path, capsys):
    run = tmp_path / ("x" * 300)
    assert main(["train", *TINY_FLAGS, "--epochs", "1", "--run-dir", str(run)]) == 1
    err = capsys.readouterr().err
    assert "a name in it is longer than the filesystem allows (255 bytes): choose a shorter --run-dir" in err, err
    assert len(err.strip().splitlines()) == 1


def test_the_largest_sensible_epoch_count_starts(tmp_path, capsys):
    """The bound is usable: a run planned for MAX_EPOCHS trains its first epoch (nothing sized by the run)."""
    run = tmp_path / "r"
    assert main(["train", *TINY_FLAGS, "--epochs", str(MAX_EPOCHS), "--stop-after-epoch", "1",
                 "--run-dir", str(run)]) == 0
    assert [r["epoch"] for r in rows(run)] == [0]


def test_a_run_file_made_read_only_mid_run_is_one_line_and_the_checkpoint_stays(tmp_path, capsys, monkeypatch):
    """metrics.jsonl refuses its second epoch's row (chmod a-w; this also runs as root, which chmod does not stop,
    so the refusal is injected where the file is opened)."""
    run = tmp_path / "r"
    appends = []

    def refusing_open(path, mode="r", *args, **kwargs):
        if str(path).endswith("metrics.jsonl") and "a" in mode:
            appends.append(path)
            if len(appends) == 2:
                raise PermissionError(13, "Permission denied", str(path))
        return open(path, mode, *args, **kwargs)

    monkeypatch.setattr(files, "open", refusing_open, raising=False)
    assert main(["train", *TINY_FLAGS, "--epochs", "2", "--run-dir", str(run)]) == 1
    err = capsys.readouterr().err
    assert f"cannot write {run / 'metrics.jsonl'}: permission denied. The last good checkpoint is " \
           f"{run / 'last.pt'} (1 epoch(s) done), intact: make it (and its folder) writable again, then " \
           f"continue with: fastcifar train --resume {run}" in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert torch.load(run / "last.pt", weights_only=False)["epoch"] == 1
    monkeypatch.undo()
    assert main(["train", "--resume", str(run), "--progress", "off", "--no-report"]) == 0
    assert [r["epoch"] for r in rows(run)] == [0, 1]


def test_any_other_system_error_is_one_line_with_what_was_kept(tmp_path, capsys, monkeypatch):
    """An OSError no check foresaw (here: an I/O error in the second epoch's evaluation) still ends in one line
    naming the file, the checkpoint kept and the resume command; outside a run (here in `report`), one line too."""
    real_evaluate, calls = train.evaluate, []

    def failing_evaluate(s):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(5, "Input/output error", "/mnt/data/test_batch")
        return real_evaluate(s)

    monkeypatch.setattr(train, "evaluate", failing_evaluate)
    run = tmp_path / "r"
    assert main(["train", *TINY_FLAGS, "--epochs", "2", "--run-dir", str(run)]) == 1
    err = capsys.readouterr().err
    assert f"error: Input/output error: /mnt/data/test_batch. The last good checkpoint is {run / 'last.pt'} (1 " \
           f"epoch(s) done), intact: fix that, then continue with: fastcifar train --resume {run}" in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    monkeypatch.setattr(report, "make_report", lambda *a, **k: open(tmp_path / "missing" / "x.png", "wb"))
    assert main(["report", str(run)]) == 1
    err = capsys.readouterr().err
    assert f"fastcifar report: error: No such file or directory: {tmp_path / 'missing' / 'x.png'}" in err, err
    assert len(err.strip().splitlines()) == 1


def test_report_out_under_a_regular_file_is_one_line(tmp_path, capsys):
    run = tmp_path / "r"
    fit(tiny_config(run, epochs=1))
    (tmp_path / "file").write_text("not a folder")
    assert main(["report", str(run), "--out", str(tmp_path / "file" / "plots")]) == 1
    err = capsys.readouterr().err
    assert f"cannot write the plots to {tmp_path / 'file' / 'plots'} (not a directory)" in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


# --- messages that say the right thing --------------------------------------------------------------------------
def test_the_resume_command_pastes_for_a_run_directory_with_a_space_and_non_ascii(tmp_path):
    run = tmp_path / "my run été"
    result = inject("signal-at-step:SIGTERM:6", "train", *TINY_FLAGS, "--epochs", "2", "--run-dir", str(run))
    assert result.returncode == 143, result.stderr[-2000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("continue with: "))
    command = shlex.split(line.removeprefix("continue with: "))
    assert command[:3] == ["fastcifar", "train", "--resume"] and command[3:] == [str(run)]
    assert fastcifar(*command[1:], capture_output=True).returncode == 0  # pasted as printed, it resumes
    assert [r["epoch"] for r in rows(run)] == [0, 1]


@pytest.mark.parametrize("amp", ["off", "bf16"])
def test_divergence_advice_is_only_what_applies(tmp_path, capsys, monkeypatch, amp):
    """--amp off is suggested only to a run that trains in reduced precision; with no epoch saved, the advice is
    the same command (with the change), restarting in the same folder."""
    real_loss = session.F.cross_entropy
    monkeypatch.setattr(session, "F", type("NanFunctional", (), {"cross_entropy": staticmethod(
        lambda *args, **kwargs: real_loss(*args, **kwargs) * float("nan"))}))
    run = tmp_path / "r"
    assert main(["train", *TINY_FLAGS, "--epochs", "1", "--amp", amp, "--run-dir", str(run)]) == 1
    err = capsys.readouterr().err
    assert "non-finite training loss at epoch 0 step 0" in err and "Traceback" not in err, err
    assert ("--amp off (this run: bf16)" in err) == (amp == "bf16")
    assert "No epoch was saved yet, so nothing is lost: run the same command again with a lower --lr (this run: " \
           f"0.001){' or --amp off (this run: bf16)' if amp == 'bf16' else ''}: it restarts in {run}." in err, err
