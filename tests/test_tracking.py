"""Run directory files and the W&B adapter: what is logged, offline mode, failures, and --wandb off without wandb."""

import json
import subprocess
import sys
import types

import pytest

from support import REPO, tiny_config
from fastcifar.tracking import RunDir, WandbTracker
from fastcifar.train import fit


class FakeRun:
    def __init__(self, **init):
        self.init, self.logged, self.summary, self.defined, self.finished, self.id = init, [], {}, [], None, "fake123"

    def define_metric(self, name, **kw):
        self.defined.append((name, kw))

    def log(self, data):
        self.logged.append(dict(data))

    def finish(self, exit_code=0):
        self.finished = exit_code


@pytest.fixture
def fake_wandb(monkeypatch):
    module = types.ModuleType("wandb")
    module.runs = []

    def init(**kw):
        run = FakeRun(**kw)
        module.runs.append(run)
        return run

    module.init = init
    module.Image = lambda path: ("image", path)
    module.Settings = lambda **kw: kw
    module.plot = types.SimpleNamespace(line_series=lambda **kw: ("line_series", kw))
    monkeypatch.setitem(sys.modules, "wandb", module)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", "/nonexistent")
    return module


def test_training_logs_config_epochs_layers_plots_and_flops(tmp_path, fake_wandb):
    fit(tiny_config(tmp_path / "r", wandb="auto", report=True))
    (run,) = fake_wandb.runs
    assert run.init["mode"] == "offline"  # auto without an API key
    assert run.init["settings"] == {"quiet": True}  # no end-of-run history dump under the results table
    # Flat config: every flag filterable by its own name in the runs table; what auto became under "resolved".
    assert run.init["config"]["batch_size"] == 8 and run.init["config"]["resolved"]["device"] == "cpu"
    epochs = [d for d in run.logged if "train/loss" in d]
    assert [d["epoch"] for d in epochs] == [0, 1]
    assert {"test/acc", "lr", "time/epoch_s", "perf/images_per_s", "time/elapsed_s"} <= set(epochs[0])
    samples = [d for d in run.logged if "grad/global_norm" in d]
    run_level = {"step", "grad/layer_rms_min", "grad/layer_rms_max", "update/step_ratio_median"}
    assert samples and run_level <= set(samples[0])
    # Per-layer statistics: one line chart per statistic (a line per epoch across the 41 layers), not 200 scalars.
    charts = {k: v for d in run.logged for k, v in d.items() if isinstance(v, tuple) and v[0] == "line_series"}
    assert set(charts) == {"layers/grad_rms", "layers/update_ratio_epoch"}
    rms_chart = charts["layers/grad_rms"][1]
    assert len(rms_chart["xs"]) == 41 and rms_chart["keys"] == ["epoch 0", "epoch 1"]
    scalar_keys = {k for d in run.logged for k in d if not isinstance(d[k], tuple)}
    assert len(scalar_keys) < 30 and not any("conv1" in k for k in scalar_keys), sorted(scalar_keys)
    plots = [d for d in run.logged if any(k.startswith("plots/") for k in d)]
    assert plots and "plots/gradient_flow" in plots[0]
    assert run.summary["flops/train_per_image"] > 1e9 and "best_test_acc" in run.summary
    assert ("test/acc", {"step_metric": "epoch", "summary": "max"}) in run.defined
    assert ("train/loss", {"step_metric": "epoch", "summary": "min"}) in run.defined
    assert ("grad/*", {"step_metric": "step"}) in run.defined
    assert run.finished == 0
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert config["wandb_run_id"] == "fake123"


def test_a_wandb_failure_warns_once_and_training_goes_on(tmp_path, fake_wandb, capsys):
    def broken_log(self, data):
        raise RuntimeError("wandb service died")

    FakeRun.log, original = broken_log, FakeRun.log
    try:
        summary = fit(tiny_config(tmp_path / "r", epochs=1, wandb="offline"))
    finally:
        FakeRun.log = original
    assert summary["finished"]
    err = capsys.readouterr().err
    assert err.count("W&B failed") == 1 and "training continues" in err


def test_api_key_means_online(monkeypatch, fake_wandb, tmp_path):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    tracker = WandbTracker("auto", "p", tmp_path, {}, "name")
    assert tracker.mode == "online" and fake_wandb.runs[0].init["mode"] == "online"


def test_wandb_off_runs_without_the_package(tmp_path):
    """Some GPU machines lack wandb: with --wandb off it is never imported."""
    code = ("import sys; sys.modules['wandb'] = None\n"  # any import of wandb now raises ImportError
            "from fastcifar.cli import main\n"
            f"raise SystemExit(main(['train', '--dataset', 'synthetic', '--synthetic-size', '32', '--batch-size', '16',"
            f" '--epochs', '1', '--wandb', 'off', '--no-report', '--run-dir', {str(tmp_path / 'r')!r}]))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "r" / "summary.json").exists()


def test_online_without_an_api_key_logs_offline_for_real_and_prints_the_sync_command(tmp_path):
    """No WANDB_API_KEY and no netrc (HOME is empty): the data is kept offline, not dropped, with the upload command."""
    pytest.importorskip("wandb")
    code = ("from fastcifar.cli import main\n"
            f"raise SystemExit(main(['train', '--dataset', 'synthetic', '--synthetic-size', '32', '--batch-size', '16',"
            f" '--epochs', '1', '--wandb', 'online', '--no-report', '--run-dir', {str(tmp_path / 'r')!r}]))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300,
                            env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "WANDB_SILENT": "true",
                                 "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
    assert "no W&B API key" in result.stderr and "logging offline" in result.stderr
    offline = list((tmp_path / "r" / "wandb").glob("offline-run-*"))
    assert offline and list(offline[0].glob("*.wandb"))
    assert f"W&B: logged offline; upload with: wandb sync {offline[0]}" in result.stdout


def test_every_offline_run_ends_with_the_sync_command(tmp_path, fake_wandb, capsys):
    fit(tiny_config(tmp_path / "r", epochs=1, wandb="offline"))
    assert f"wandb sync {tmp_path / 'r' / 'wandb' / 'offline-run-*'}" in capsys.readouterr().out
    fake_wandb.runs.clear()
    fit(tiny_config(tmp_path / "o", epochs=1, wandb="online"))  # the fake has no key either: offline, said so
    out, err = capsys.readouterr()
    assert fake_wandb.runs[0].init["mode"] == "offline" and "no W&B API key" in err and "wandb sync" in out


def test_online_that_fails_falls_back_to_offline(tmp_path, fake_wandb, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    init = fake_wandb.init

    def unreachable(**kw):
        if kw["mode"] == "online":
            raise ConnectionError("api.wandb.ai unreachable")
        return init(**kw)

    fake_wandb.init = unreachable
    tracker = WandbTracker("online", "p", tmp_path, {}, "name")
    assert tracker.mode == "offline" and tracker.run is not None
    assert "logging offline instead" in capsys.readouterr().err


def test_jsonl_rows_store_nan_as_null(tmp_path):
    run = RunDir(tmp_path)
    run.append_jsonl("m.jsonl", {"a": float("nan"), "b": 1.5})
    assert run.read_jsonl("m.jsonl") == [{"a": None, "b": 1.5}]
