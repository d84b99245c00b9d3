"""A run directory never becomes a dead end: where no epoch was saved, nothing is lost and the same command
restarts there (cleaning what the dead run left); where something was saved, every message says the same thing
about it; a live process there is named before anything else is said; default run directories never collide.

Kills and signals run in a subprocess (tests/inject.py); the rest through `main()`.
"""

import json
import os
from datetime import datetime

import pytest
import torch

from support import tiny_config, without_timings
from test_faults import TINY_FLAGS, _FullDisk, inject, rows, snapshot
from fastcifar import files, tracking
from fastcifar.cli import main
from fastcifar.tracking import RunDir
from fastcifar.train import fit


def unlocked(snap):
    return {k: v for k, v in snap.items() if k != ".lock"}


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory):
    """An uninterrupted 1-epoch run: what a restarted run must record, row for row."""
    run = tmp_path_factory.mktemp("straight") / "run"
    fit(tiny_config(run, epochs=1))
    return run


@pytest.mark.parametrize("fault, code", [("kill-in-write:last.pt:1", -9), ("signal-at-step:SIGINT:2", 130)])
def test_a_run_that_saved_no_epoch_restarts_with_the_same_command(one_epoch, tmp_path, capsys, fault, code):
    """Killed during its first checkpoint (a row of epoch 0 written, a half-written temp file left) or stopped by
    Ctrl-C in its first epoch: --resume says there is nothing to continue and how to restart; the same command
    restarts there, and the restarted run records exactly what an uninterrupted one does."""
    run = tmp_path / "run"
    command = ["train", *TINY_FLAGS, "--epochs", "1", "--run-dir", str(run)]
    result = inject(fault, *command)
    assert result.returncode == code, result.stderr[-2000:]
    assert (run / "config.json").exists() and not (run / "last.pt").exists()
    if code == 130:
        assert "nothing was saved, so nothing is lost; run the same command again: it restarts in" in result.stderr
    else:
        assert rows(run) and list(run.glob(".*.tmp"))  # the dead run's row of epoch 0 and its temp file
    before = snapshot(run)
    assert main(["train", "--resume", str(run), "--progress", "off"]) == 1
    err = capsys.readouterr().err
    assert "no epoch was saved there" in err and "it restarts there" in err and "Traceback" not in err, err
    assert unlocked(snapshot(run)) == unlocked(before)  # saying so changed nothing
    assert main(command) == 0
    out = capsys.readouterr().out
    assert f"restarting in {run}: the run started there saved no epoch" in out and "config.json" in out
    assert not list(run.glob(".*.tmp"))
    assert without_timings(rows(run)) == without_timings(rows(one_epoch))  # no row of the dead run left


def test_a_full_disk_at_the_first_save_says_nothing_is_lost_and_the_same_command_restarts(tmp_path, capsys,
                                                                                           monkeypatch):
    run = tmp_path / "r"
    command = ["train", *TINY_FLAGS, "--epochs", "1", "--run-dir", str(run)]
    monkeypatch.setattr(files, "os", _FullDisk(os, ".last.pt."))
    assert main(command) == 1
    err = capsys.readouterr().err
    assert "no space left on device" in err and "No epoch was saved yet, so nothing is lost: free some space, " \
        f"then run the same command again: it restarts in {run}." in err, err
    assert "intact" not in err and "--resume" not in err and len(err.strip().splitlines()) == 1
    monkeypatch.undo()
    assert main(command) == 0
    assert "restarting in" in capsys.readouterr().out
    assert [r["epoch"] for r in rows(run)] == [0]


def test_a_run_without_last_pt_says_what_is_missing_and_what_survives(tmp_path, capsys):
    """last.pt deleted while metrics.jsonl records finished epochs: neither --resume nor a fresh run there says
    "nothing was finished"; both name what is missing and point at best.pt; nothing changes on disk."""
    run = tmp_path / "r"
    fit(tiny_config(run, epochs=1))
    (run / "last.pt").unlink()
    best = torch.load(run / "best.pt", weights_only=False)["epoch"]
    before = snapshot(run)
    assert main(["train", "--resume", str(run), "--progress", "off"]) == 1
    err = capsys.readouterr().err
    assert "its last.pt (the resume state, saved after finished epochs) is missing, though its metrics.jsonl " \
           "records 1 finished epoch(s)" in err, err
    assert f"Its best.pt (epoch {best}) is intact: `fastcifar train --init-from {run / 'best.pt'}`" in err
    assert main(["train", *TINY_FLAGS, "--epochs", "1", "--run-dir", str(run)]) == 1
    err = capsys.readouterr().err
    assert "but no last.pt: it cannot be resumed" in err and f"--init-from {run / 'best.pt'}" in err, err
    assert "nothing was finished" not in err and unlocked(snapshot(run)) == unlocked(before)


def test_a_live_run_that_has_not_saved_yet_is_named_before_anything_else(tmp_path, capsys):
    """Another process holds the folder and has written config.json (or not even that): --resume and a fresh run
    there say who holds it, not "no last.pt" / "holds a run"."""
    run = tmp_path / "r"
    holder = RunDir(run)
    holder.create()
    holder.lock()  # as a live process does from its start
    try:
        assert main(["train", "--resume", str(run), "--progress", "off"]) == 1  # before its config.json exists
        assert f"is in use by fastcifar pid {os.getpid()}" in capsys.readouterr().err
        (run / "config.json").write_text(json.dumps({"config": tiny_config(run).to_dict()}))
        for command in (["train", "--resume", str(run), "--progress", "off"],
                        ["train", *TINY_FLAGS, "--epochs", "1", "--run-dir", str(run)]):
            assert main(command) == 1
            err = capsys.readouterr().err
            assert f"is in use by fastcifar pid {os.getpid()} on" in err and " since " in err, (command, err)
    finally:
        holder.unlock()


def test_two_runs_started_in_the_same_second_get_a_folder_each(tmp_path, capsys, monkeypatch):
    class Frozen(datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2030, 1, 2, 3, 4, 5)

    monkeypatch.setattr(tracking, "datetime", Frozen)
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        assert main(["train", *TINY_FLAGS, "--epochs", "1"]) == 0, capsys.readouterr().err
    folders = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert folders == ["20300102-030405-worksheet", "20300102-030405-worksheet-2"]
    assert all((tmp_path / "runs" / name / "last.pt").exists() for name in folders)


@pytest.mark.parametrize("left", [{"config.json": '{"name": "my own project"}'},
                                  {"metrics.jsonl": '{"epoch": 0, "loss": 1.0}\n'}])
def test_files_no_fastcifar_run_wrote_are_never_removed_by_a_restart(tmp_path, capsys, left):
    """A folder holding another program's config.json, or rows without a run's config.json, is not a dead run:
    a fresh run there is refused in one line and the files stay as they were."""
    run = tmp_path / "project"
    run.mkdir()
    for name, text in left.items():
        (run / name).write_text(text)
    assert main(["train", *TINY_FLAGS, "--epochs", "1", "--run-dir", str(run)]) == 1
    err = capsys.readouterr().err
    assert "that no fastcifar run wrote" in err and err.count("\n") == 1, err
    assert {p.name: p.read_text() for p in run.iterdir() if p.name != ".lock"} == left
