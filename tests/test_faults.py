"""Faults and bad input through the CLI: a run directory nothing can corrupt, every failure one clear message.

Each test asserts the exit code, the message and that nothing finished was lost. Kills and signals run in a
subprocess (tests/inject.py injects the fault); the rest through `main()`.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from support import REPO, tiny_config, without_timings
from fastcifar import FastCifarError, files
from fastcifar.checkpoint import restore, save_checkpoint
from fastcifar.config import resolve
from fastcifar.data.cifar import load_dataset
from fastcifar.distributed import DistInfo
from fastcifar.cli import main
from fastcifar.tracking import RunDir
from fastcifar.train import build_session, fit

TINY_FLAGS = ["--dataset", "synthetic", "--synthetic-size", "32", "--batch-size", "8", "--wandb", "off",
              "--progress", "off", "--no-report"]


def inject(fault: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tests" / "inject.py"), *args], capture_output=True, text=True,
                          cwd=REPO, timeout=timeout,
                          env={**os.environ, "FASTCIFAR_TEST_FAULT": fault, "WANDB_MODE": "disabled"})


def rows(run, name="metrics.jsonl"):
    path = run / name
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def weights(path):
    return torch.load(path, weights_only=False)["model"]


def snapshot(folder):
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns, p.stat().st_mode, p.read_bytes() if p.is_file() and
                     p.stat().st_size < 1e6 else None) for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted 3-epoch run: what every interrupted-and-resumed run must equal, bit for bit."""
    run = tmp_path_factory.mktemp("straight") / "run"
    fit(tiny_config(run, epochs=3))
    return run



def test_kill_9_at_any_moment_then_resume_equals_the_straight_run(straight, tmp_path):
    """SIGKILL during the best.pt write, mid-epoch, right after an epoch line and during the last.pt write; each
    time `--resume` continues, and the final weights equal the uninterrupted run's bit for bit on the CPU."""
    run = tmp_path / "run"
    resume = ["train", "--resume", str(run), "--progress", "off"]
    stages = [("kill-in-write:best.pt:1", ["train", *TINY_FLAGS, "--epochs", "3", "--run-dir", str(run)]),  # epoch 0
              ("kill-at-step:3", resume),  # mid-epoch 1
              ("kill-at-step:5", resume),  # just after epoch 1's line: the first step of epoch 2
              ("kill-in-write:last.pt:1", resume)]  # during epoch 2's save
    for fault, args in stages:
        result = inject(fault, *args)
        assert result.returncode == -9, (fault, result.returncode, result.stderr[-2000:])
    assert list(run.glob(".*.tmp"))  # the last kill's half-written checkpoint is still there
    result = inject("", "train", "--resume", str(run), "--progress", "off")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "removed .last.pt." in result.stdout
    assert not list(run.glob(".*.tmp"))  # temp files of killed saves are removed on resume
    a, b = weights(straight / "last.pt"), weights(run / "last.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert without_timings(rows(straight)) == without_timings(rows(run))
    assert (straight / "grad_flow.jsonl").read_text() == (run / "grad_flow.jsonl").read_text()
    best = torch.load(run / "best.pt", weights_only=False)
    assert best["epoch"] == torch.load(run / "last.pt", weights_only=False)["best"]["epoch"]


def test_a_run_directory_belongs_to_one_run(straight, tmp_path, capsys):
    before = snapshot(straight)
    rc = main(["train", *TINY_FLAGS, "--epochs", "1", "--run-dir", str(straight)])
    err = capsys.readouterr().err
    assert rc == 1 and "already holds a run" in err and f"--resume {straight}" in err and "Traceback" not in err
    assert snapshot(straight) == before  # last.pt, best.pt, config.json, metrics.jsonl untouched


def test_a_locked_run_directory_names_its_holder(tmp_path, capsys):
    fit(tiny_config(tmp_path / "r", epochs=2), stop_after_epoch=1)
    holder = RunDir(tmp_path / "r")
    holder.lock()  # as a live process holds it
    try:
        assert main(["train", "--resume", str(tmp_path / "r"), "--progress", "off"]) == 1
        err = capsys.readouterr().err
        assert "is in use by fastcifar pid" in err and str(os.getpid()) in err
    finally:
        holder.unlock()
    assert main(["train", "--resume", str(tmp_path / "r"), "--progress", "off", "--no-report"]) == 0  # freed


def test_two_processes_on_one_directory_one_wins(tmp_path):
    args = [sys.executable, "-m", "fastcifar", "train", *TINY_FLAGS, "--epochs", "2", "--run-dir", str(tmp_path / "r")]
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 1], results
    loser = next(err for code, err in results if code == 1)
    assert "is in use by" in loser or "already holds a run" in loser
    assert [r["epoch"] for r in rows(tmp_path / "r")] == [0, 1]
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["epochs_done"] == 2


@pytest.mark.parametrize("signals, code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_stops_at_a_step_boundary_keeping_finished_epochs(tmp_path, signals, code):
    run = tmp_path / "r"
    result = inject(f"signal-at-step:{signals}:6", "train", *TINY_FLAGS, "--epochs", "2", "--run-dir", str(run))
    assert result.returncode == code, result.stderr[-2000:]
    assert f"stopped by {signals}" in result.stdout and f"fastcifar train --resume {run}" in result.stdout
    assert "Traceback" not in result.stderr
    assert [r["epoch"] for r in rows(run)] == [0]  # the unfinished epoch 1 was abandoned
    assert torch.load(run / "last.pt", weights_only=False)["epoch"] == 1


def test_a_signal_finishes_the_epoch_when_finished_epochs_are_not_saved_yet(tmp_path):
    run = tmp_path / "r"  # with --save-every 2, epoch 0 is finished but not saved when the signal comes
    result = inject("signal-at-step:SIGTERM:6", "train", *TINY_FLAGS, "--epochs", "4", "--save-every", "2",
                    "--run-dir", str(run))
    assert result.returncode == 143, result.stderr[-2000:]
    assert [r["epoch"] for r in rows(run)] == [0, 1]
    assert torch.load(run / "last.pt", weights_only=False)["epoch"] == 2


def test_a_second_signal_exits_at_once_with_the_resume_command(tmp_path):
    run = tmp_path / "r"
    result = inject("signal-at-step:SIGINT,SIGINT:6", "train", *TINY_FLAGS, "--epochs", "2", "--run-dir", str(run))
    assert result.returncode == 130, result.stderr[-2000:]
    assert "interrupted by SIGINT" in result.stderr and f"fastcifar train --resume {run}" in result.stderr
    assert "Traceback" not in result.stderr and "RUN_DIR" not in result.stderr
    assert torch.load(run / "last.pt", weights_only=False)["epoch"] == 1


def test_a_torn_last_line_is_dropped_on_resume(tmp_path, capsys):
    run = tmp_path / "r"
    fit(tiny_config(run, epochs=2), stop_after_epoch=1)
    for name in ("metrics.jsonl", "grad_flow.jsonl", "updates.jsonl"):
        with open(run / name, "a") as f:
            f.write('{"epoch": 1, "train_lo')  # a crash or a full disk mid-append
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--progress", "off", "--no-report"]) == 0
    out = capsys.readouterr().out
    assert "dropped its last line" in out and "metrics.jsonl" in out
    assert [r["epoch"] for r in rows(run)] == [0, 1]


def test_an_unreadable_line_elsewhere_is_one_clear_error(tmp_path, capsys):
    run = tmp_path / "r"
    fit(tiny_config(run, epochs=2), stop_after_epoch=1)
    text = (run / "metrics.jsonl").read_text()
    (run / "metrics.jsonl").write_bytes(b"\x00\xff garbage\n" + text.encode())
    assert main(["train", "--resume", str(run), "--progress", "off"]) == 1
    err = capsys.readouterr().err
    assert f"{run / 'metrics.jsonl'} is damaged: line 1 is not UTF-8 text" in err and "Traceback" not in err
    assert main(["report", str(run)]) == 1
    assert "is damaged: line 1" in capsys.readouterr().err


class _FullDisk:
    """os.fdopen's file, writing into a disk that fills up half-way through one named file."""

    def __init__(self, real, name):
        self.real, self.name = real, name

    def fdopen(self, fd, *args, **kwargs):
        f = self.real.fdopen(fd, *args, **kwargs)
        if self.name not in os.readlink(f"/proc/self/fd/{fd}"):
            return f
        write = f.write

        def full(data):
            write(data[: len(data) // 2])
            raise OSError(28, "No space left on device")

        f.write = full
        return f

    def __getattr__(self, attr):
        return getattr(self.real, attr)


def test_a_full_disk_is_one_line_and_the_previous_checkpoint_stays(tmp_path, capsys, monkeypatch):
    run = tmp_path / "r"
    fit(tiny_config(run), stop_after_epoch=1)
    monkeypatch.setattr(files, "os", _FullDisk(os, ".last.pt."))
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--progress", "off", "--no-report"]) == 1
    err = capsys.readouterr().err
    assert f"cannot write {run / 'last.pt'}: no space left on device (it needs 134" in err, err
    assert "MB free)" in err and "intact" in err and f"continue with: fastcifar train --resume {run}" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not list(run.glob(".*.tmp"))  # the temp file is removed
    assert torch.load(run / "last.pt", weights_only=False)["epoch"] == 1  # the previous checkpoint, whole
    monkeypatch.undo()
    assert main(["train", "--resume", str(run), "--progress", "off", "--no-report"]) == 0


def test_a_corrupt_checkpoint_is_caught_by_its_checksum(tmp_path, capsys):
    run = tmp_path / "r"
    fit(tiny_config(run, epochs=2), stop_after_epoch=1)
    data = bytearray((run / "last.pt").read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = b"\x00" * 64  # bytes overwritten in the middle
    (run / "last.pt").write_bytes(bytes(data))
    assert main(["train", "--resume", str(run), "--progress", "off"]) == 1
    err = capsys.readouterr().err
    assert f"checkpoint {run / 'last.pt'} is corrupt" in err and "CRC-32" in err
    assert f"--init-from {run / 'best.pt'}" in err  # the previous good state
    assert "Traceback" not in err


def test_a_checkpoint_of_another_model_says_what_differs(tmp_path, capsys):
    run = tmp_path / "r"
    fit(tiny_config(run, epochs=1))
    state = torch.load(run / "best.pt", weights_only=False)
    state["model"]["fc.weight"] = torch.zeros(100, 512)
    state["model"]["fc.bias"] = torch.zeros(100)
    torch.save(state, tmp_path / "hundred.pt")
    del state["model"]["layer4.1.conv2.weight"]
    torch.save(state, tmp_path / "other.pt")
    for name, message in [("hundred.pt", "holds a model with 100 classes (fc.weight (100, 512)); this run's has 10"),
                          ("other.pt", "holds a different model than this run's CIFAR ResNet-18: 1 weights missing")]:
        rc = main(["train", *TINY_FLAGS, "--epochs", "1", "--init-from", str(tmp_path / name),
                   "--run-dir", str(tmp_path / f"new-{name}")])
        err = capsys.readouterr().err
        assert rc == 1 and message in err and "Traceback" not in err, err
        assert not (tmp_path / f"new-{name}").exists()  # checked before anything was created


def test_a_checkpoint_of_another_batch_layout_is_not_resumed(tmp_path, capsys):
    """A run resumed with another number of processes (or data) would land elsewhere in its LR schedule."""
    run = tmp_path / "r"
    fit(tiny_config(run, epochs=2), stop_after_epoch=1)
    state = torch.load(run / "last.pt", weights_only=False)
    state["world_size"], state["steps_per_epoch"] = 2, 2  # as if saved by `torchrun --nproc_per_node 2`
    torch.save(state, run / "last.pt")
    before = snapshot(run)
    assert main(["train", "--resume", str(run), "--progress", "off"]) == 1
    err = capsys.readouterr().err
    assert "was trained with 2 process(es) and 2 steps per epoch; this run has 1 and 4" in err, err
    unchanged = lambda snap: {k: v for k, v in snap.items() if k != ".lock"}  # noqa: E731
    assert unchanged(snapshot(run)) == unchanged(before)


def test_resume_removes_stale_temp_files_and_repairs_best_pt(tmp_path, capsys):
    run = tmp_path / "r"
    fit(tiny_config(run, epochs=3), stop_after_epoch=2)
    best_epoch = torch.load(run / "last.pt", weights_only=False)["best"]["epoch"]
    (run / ".last.pt.a1b2c3d4.tmp").write_bytes(b"x" * 1000)  # a killed save's leftover
    stale = torch.load(run / "best.pt", weights_only=False)
    stale["epoch"] = best_epoch - 1  # as if the kill came during the copy of a newer best
    torch.save(stale, run / "best.pt")
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--progress", "off", "--no-report"]) == 0
    out = capsys.readouterr().out
    assert "removed .last.pt.a1b2c3d4.tmp" in out and "repaired best.pt" in out
    assert not (run / ".last.pt.a1b2c3d4.tmp").exists()


def test_resuming_a_finished_run_changes_nothing_on_disk(straight, capsys):
    before = snapshot(straight)
    assert main(["train", "--resume", str(straight), "--progress", "off"]) == 1
    assert "already finished all 3 epochs" in capsys.readouterr().err
    assert snapshot(straight) == before


@pytest.mark.parametrize("flags, message", [
    (["--train-subset", "3"], "fewer than one batch of 8"),
    (["--batch-size", "100000"], "fewer than one batch of 100000"),
    (["--train-subset", "100000"], "--train-subset 100000 is larger than the set it takes from (32 images"),
    (["--test-subset", "17"], "--test-subset 17 is larger than the set it takes from (16 images"),
    (["--lr", "inf"], "--lr must be a finite number, got inf"),
    (["--weight-decay", "nan"], "--weight-decay must be a finite number, got nan"),
    (["--augment", "crop,rotate"], "cannot read 'rotate'"),
])
def test_every_check_runs_before_the_run_directory_exists(tmp_path, capsys, flags, message):
    rc = main(["train", *TINY_FLAGS, "--epochs", "1", "--run-dir", str(tmp_path / "r"), *flags])
    err = capsys.readouterr().err
    assert rc == 1 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "r").exists()


def test_divergence_mentions_last_pt_only_when_there_is_one(tmp_path, capsys):
    from fastcifar import TrainingDiverged

    def nan_loss(logits, labels):
        return torch.nn.functional.cross_entropy(logits, labels) * float("nan")

    with pytest.raises(TrainingDiverged) as info:
        fit(tiny_config(tmp_path / "r"), loss_fn=nan_loss)
    assert "non-finite training loss at epoch 0 step 0" in str(info.value)
    assert "No epoch was saved yet" in str(info.value) and "last.pt" not in str(info.value)


def test_an_unreadable_data_file_says_permission_denied(cifar_copy, monkeypatch):
    from fastcifar.data import cifar

    real_open = open

    def guarded(path, *args, **kwargs):
        if str(path).endswith("data_batch_2"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(cifar, "open", guarded, raising=False)
    with pytest.raises(FastCifarError, match=r"cannot read CIFAR-10 file .*data_batch_2 \(permission denied\)"):
        cifar.load_cifar10(cifar_copy, download=False)


def test_files_are_written_with_the_users_umask(tmp_path):
    old = os.umask(0o022)
    try:
        fit(tiny_config(tmp_path / "r", epochs=1))
    finally:
        os.umask(old)
    for name in ("config.json", "summary.json", "last.pt", "best.pt", "metrics.jsonl"):
        assert (tmp_path / "r" / name).stat().st_mode & 0o777 == 0o644, name




def test_a_run_saved_by_the_first_checkpoint_format_resumes_without_losing_its_best_weights(tmp_path, capsys):
    """Format 1 (before best weights travelled in last.pt): when the best epoch was an earlier one, best.pt held
    the only copy of its weights. Resuming must keep them, carry them on, and never write a best.pt without them."""
    run = tmp_path / "run"
    fit(tiny_config(run, epochs=2))
    last = torch.load(run / "last.pt", weights_only=False)
    best = torch.load(run / "best.pt", weights_only=False)
    marker = {k: v + 1 if v.is_floating_point() else v for k, v in best["model"].items()}  # tell them apart
    save_checkpoint(run / "best.pt", {**best, "epoch": 0, "model": marker})
    old = {k: v for k, v in last.items() if k not in ("best", "format")}
    save_checkpoint(run / "last.pt", {**old, "format": 1, "best_epoch": 0, "best_acc": 1.0})  # 1.0: stays best
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--epochs", "3"]) == 0
    kept = torch.load(run / "best.pt", weights_only=False)
    assert kept["epoch"] == 0 and all(torch.equal(kept["model"][k], v) for k, v in marker.items())
    carried = torch.load(run / "last.pt", weights_only=False)["best"]
    assert carried["epoch"] == 0 and all(torch.equal(carried["model"][k], v) for k, v in marker.items())
    assert main(["eval", str(run / "best.pt")]) == 0


def test_a_run_saved_without_loss_scaling_resumes_where_auto_precision_now_needs_it(tmp_path):
    """--amp auto is bf16 on most GPUs and fp16 + GradScaler on those without bf16: a run moved between them must
    resume (the scaler starting fresh), not fail on the empty scaler state it was saved with."""
    run = tmp_path / "r"
    fit(tiny_config(run, epochs=2, monitor=False))
    state = torch.load(run / "last.pt", weights_only=False)
    assert state["scaler"] == {}
    cfg = tiny_config(tmp_path / "other", epochs=2, monitor=False)
    s = build_session(cfg, DistInfo(), load_dataset("synthetic", synthetic_size=32), resolve(cfg),
                      notice=lambda text: None)
    s.scaler = torch.amp.GradScaler("cpu", enabled=True)
    done, _, _ = restore(s, state, run / "last.pt", world_size=1)
    assert done == 2 and s.scaler.is_enabled() and s.scaler.get_scale() == 2.0 ** 16
