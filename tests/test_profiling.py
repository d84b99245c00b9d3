"""`fastcifar train --profile`: the trace and the table it writes, read back as a user would."""

import gzip
import json

import torch

from support import run_cli
from fastcifar.profiling import WAIT, WARMUP, StepProfiler


def test_profile_writes_a_trace_and_a_table_and_says_where(tmp_path):
    run = tmp_path / "run"
    result = run_cli("train", "--dataset", "synthetic", "--synthetic-size", "64", "--batch-size", "8", "--epochs", "1",
                     "--wandb", "off", "--no-report", "--progress", "off", "--no-monitor", "--profile", "3",
                     "--run-dir", str(run))
    assert result.returncode == 0, result.stderr
    folder = run / "profile"
    table = (folder / "profile.txt").read_text()
    numbers = json.loads((folder / "profile.json").read_text())
    (path,) = folder.glob("trace.pt.trace.json*")  # gzipped when large
    trace = json.loads((gzip.open if path.suffix == ".gz" else open)(path, "rt").read())
    assert numbers["trace"] == path.name and path.name in table
    assert numbers["steps"] == 3 and "3 training steps on cpu" in table
    for line in ("wall time per step", "host time per step", "device time per step", "device busy share",
                 "launches per step", "top ops by device time"):
        assert line in table, line
    assert 0 < numbers["device_busy_share"] <= 1 and numbers["launches_per_step"] > 100  # a ResNet-18 step
    assert 0 < numbers["host_ms_per_step"] <= numbers["wall_ms_per_step"] * 1.001
    top = numbers["top_kernels"]
    assert any("conv" in k["name"] for k in top[:5]) and top == sorted(top, key=lambda k: -k["ms_per_step"])
    assert f"{top[0]['ms_per_step']:9.3f}" in table and top[0]["name"][:60] in table
    steps = {e["name"] for e in trace["traceEvents"] if e.get("name", "").startswith("ProfilerStep#")}
    assert len(steps) == 3  # only the active steps are in the trace
    summary = json.loads((run / "summary.json").read_text())
    assert summary["profile"]["table"] == str(folder / "profile.txt") and summary["profile"]["steps"] == 3
    assert f"profile: 3 steps -> {folder / 'profile.txt'}" in result.stdout


def test_an_epoch_that_ends_early_writes_what_it_recorded_or_starts_again_next_epoch(tmp_path):
    notices = []
    profiler = StepProfiler(tmp_path / "p", 10, torch.device("cpu"), notice=notices.append)
    x = torch.randn(64, 64)
    for _ in range(WAIT + WARMUP - 1):  # the epoch ends during the profiler's warm-up: nothing written
        x = x @ x
        profiler.after_step(True)
    profiler.end_epoch()
    assert not profiler.done and not (tmp_path / "p").exists()
    profiler.after_step(False)  # not ready (compiling): not counted
    for _ in range(WAIT + WARMUP + 4):  # next epoch: 4 recorded steps, then the epoch ends
        x = (x @ x).tanh()
        profiler.after_step(True)
    profiler.end_epoch()
    assert profiler.done and profiler.files["steps"] == 4 and len(notices) == 1
    assert json.loads((tmp_path / "p" / "profile.json").read_text())["steps"] == 4
    profiler.after_step(True)  # once written, it does nothing more
    assert len(notices) == 1
