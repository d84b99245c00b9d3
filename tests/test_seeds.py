"""`fastcifar train --seeds`: one process, one session reset between seeds, each seed equal to its own run bit for bit,
no recompilation, the group's summary.json and table, interruption and `--resume GROUP`, W&B group, the group report."""

import functools
import json
import math
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

import fastcifar.session as session
import fastcifar.train as train
from support import REPO, without_timings
from fastcifar.cli import main

FLAGS = ["--dataset", "synthetic", "--synthetic-size", "32", "--batch-size", "8", "--epochs", "2", "--progress", "off",
         "--no-report", "--optimizer", "sgd", "--lr", "0.05", "--ema", "0.9", "--tta", "flip"]


def rows(run, name="metrics.jsonl"):
    return [json.loads(line) for line in (run / name).read_text().splitlines()]


def weights(path):
    return torch.load(path, weights_only=False)["model"]


class _FakeWandbRun:
    id = "fake"

    def __init__(self, **init):
        self.init = init

    def __getattr__(self, name):  # define_metric, log, summary updates, finish ...
        return lambda *a, **k: None


@pytest.fixture(scope="module")
def group(tmp_path_factory):
    """Three seeds through the command line (in process), with W&B mirrored to a fake module, counting the
    sessions built."""
    path = tmp_path_factory.mktemp("group") / "g"
    fake = types.ModuleType("wandb")
    fake.runs = []
    fake.init = lambda **kw: fake.runs.append(_FakeWandbRun(**kw)) or fake.runs[-1]
    fake.Settings = lambda **kw: kw
    builds, real_build = [], session.build_session
    saved = sys.modules.get("wandb")
    sys.modules["wandb"] = fake
    session.build_session = lambda *a, **k: builds.append(1) or real_build(*a, **k)
    try:
        assert main(["train", *FLAGS, "--wandb", "offline", "--seeds", "3", "--run-dir", str(path)]) == 0
    finally:
        session.build_session = real_build
        if saved is None:
            del sys.modules["wandb"]
        else:
            sys.modules["wandb"] = saved
    return types.SimpleNamespace(path=path, builds=len(builds), wandb=fake.runs)


def test_each_seed_equals_its_own_run_bit_for_bit_from_one_session(group, tmp_path):
    assert group.builds == 1  # seeds 1 and 2 reuse seed 0's session: reset, not rebuilt
    alone = tmp_path / "alone"
    assert main(["train", *FLAGS, "--wandb", "off", "--seed", "2", "--run-dir", str(alone)]) == 0
    seed2 = group.path / "seed-2"
    assert without_timings(rows(seed2)) == without_timings(rows(alone))
    assert rows(seed2, "steps.jsonl") == rows(alone, "steps.jsonl")  # every step's loss
    for name in ("last.pt", "best.pt"):
        a, b = weights(seed2 / name), weights(alone / name)
        assert all(torch.equal(a[k], b[k]) for k in a)
    ema_a = torch.load(seed2 / "last.pt", weights_only=False)["ema"]["model"]
    ema_b = torch.load(alone / "last.pt", weights_only=False)["ema"]["model"]
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    # and the seeds did differ: the reset took each seed's own initial weights and data order
    accs = {json.dumps(without_timings(rows(group.path / f"seed-{k}"))) for k in range(3)}
    assert len(accs) == 3


def test_a_second_seed_does_not_recompile(tmp_path, monkeypatch):
    """--compile on with dynamo's eager backend (the same tracing and guards as inductor, without its C++ build):
    the graphs traced while seed 0 ran are all there are after seed 1."""
    from torch._dynamo.utils import counters

    import fastcifar.run as run
    from fastcifar.seeds import fit_group, start_group
    from support import tiny_config

    torch._dynamo.reset()
    counters.clear()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    graphs_at_close = []
    real_close = run.TrainingRun.close
    def close(self, s):
        graphs_at_close.append(counters["stats"]["unique_graphs"])
        return real_close(self, s)

    monkeypatch.setattr(run.TrainingRun, "close", close)
    cfg = tiny_config(tmp_path / "g", compile="on", monitor=False, epochs=1)
    doc = fit_group(start_group(cfg, [0, 1], tmp_path / "g"))
    assert len(doc["runs"]) == 2
    assert graphs_at_close[0] >= 2  # the training step's and the evaluation's
    assert graphs_at_close == [graphs_at_close[0]] * 2


def test_group_summary_has_each_run_and_the_statistics(group, capsys):
    from scipy import stats

    doc = json.loads((group.path / "summary.json").read_text())
    assert set(doc) == {"seeds", "runs", "stats"} and doc["seeds"] == [0, 1, 2]
    assert [r["seed"] for r in doc["runs"]] == [0, 1, 2]
    for r in doc["runs"]:
        assert r["summary"] == json.loads((group.path / f"seed-{r['seed']}" / "summary.json").read_text())
    best = [r["summary"]["best_test_acc"] for r in doc["runs"]]
    s = doc["stats"]["best_test_acc"]
    assert set(s) == {"n", "mean", "std", "min", "max", "ci95"}
    assert s["n"] == 3 and math.isclose(s["mean"], np.mean(best)) and math.isclose(s["std"], np.std(best, ddof=1))
    assert (s["min"], s["max"]) == (min(best), max(best))
    lo, hi = stats.t.interval(0.95, 2, loc=np.mean(best), scale=np.std(best, ddof=1) / math.sqrt(3))
    assert np.allclose(s["ci95"], [lo, hi])
    final_tta = [r["summary"]["final_test_acc_tta"] for r in doc["runs"]]
    assert math.isclose(doc["stats"]["final_test_acc_tta"]["mean"], np.mean(final_tta))
    epoch_times = [r["summary"]["mean_epoch_time_s"] for r in doc["runs"]]
    assert math.isclose(doc["stats"]["mean_epoch_time_s"]["mean"], np.mean(epoch_times))
    assert {"best_test_acc_no_tta", "final_test_acc"} <= set(doc["stats"])


def test_the_table_prints_mean_std_n_and_ci(group, capsys):
    from fastcifar.seeds import group_table

    doc = json.loads((group.path / "summary.json").read_text())
    table = group_table(doc, "flip TTA")
    s = doc["stats"]["best_test_acc"]
    expected = (f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f} % (n=3, 95 % CI {100 * s['ci95'][0]:.2f}–"
                f"{100 * s['ci95'][1]:.2f})")
    assert f"Best test accuracy (flip TTA) | {expected}" in table.replace("  ", " ").replace(" |", " |")


def test_wandb_groups_the_seeds(group):
    assert [r.init["name"] for r in group.wandb] == ["seed-0", "seed-1", "seed-2"]
    assert {r.init["group"] for r in group.wandb} == {"g"}


def test_report_of_a_group_draws_every_seed_with_mean_and_band(group):
    from fastcifar.report import build_figures

    fig = build_figures(group.path)["group_curves.png"]
    lines = {line.get_gid(): line for ax in fig.axes for line in ax.lines}
    assert {f"seed-{k}-test_acc_tta" for k in range(3)} | {"mean-test_acc_tta", "mean-train_loss"} <= set(lines)
    per_seed = [[100 * r["test_acc_tta"] for r in rows(group.path / f"seed-{k}")] for k in range(3)]
    assert np.allclose(lines["mean-test_acc_tta"].get_ydata(), np.mean(per_seed, axis=0))
    assert main(["report", str(group.path)]) == 0
    assert (group.path / "plots" / "group_curves.png").stat().st_size > 10_000


def interrupted_group(path, seeds: int, at_step: int) -> subprocess.CompletedProcess:
    """`fastcifar train --seeds N` in a subprocess that sends itself SIGINT when its at_step-th step starts (counted
    over the whole process: 4 steps an epoch, 8 a seed)."""
    return subprocess.run([sys.executable, str(REPO / "tests" / "inject.py"), "train", *FLAGS, "--wandb", "off",
                           "--seeds", str(seeds), "--run-dir", str(path)], capture_output=True, text=True, cwd=REPO,
                          timeout=300, env={**os.environ, "FASTCIFAR_TEST_FAULT": f"signal-at-step:SIGINT:{at_step}",
                                            "WANDB_MODE": "disabled"})


def test_interrupted_group_keeps_finished_seeds_and_resumes_the_rest(group, tmp_path):
    """SIGINT during seed 1's second epoch (4 steps an epoch: seed 0 is steps 1-8): seed 0 stays finished, seed 1
    keeps its first epoch, `--resume GROUP` continues seed 1 and trains seed 2; every seed then equals the
    uninterrupted group's."""
    path = tmp_path / "g"
    result = interrupted_group(path, seeds=3, at_step=14)
    assert result.returncode == 130, result.stderr[-2000:]
    assert f"continue with: fastcifar train --resume {path}" in result.stdout
    doc = json.loads((path / "summary.json").read_text())
    assert [r["seed"] for r in doc["runs"]] == [0]
    assert torch.load(path / "seed-1" / "last.pt", weights_only=False)["epoch"] == 1
    assert not (path / "seed-2").exists()
    assert main(["train", "--resume", str(path), "--progress", "off"]) == 0
    doc = json.loads((path / "summary.json").read_text())
    assert [r["seed"] for r in doc["runs"]] == [0, 1, 2]
    for k in range(3):
        assert without_timings(rows(path / f"seed-{k}")) == without_timings(rows(group.path / f"seed-{k}"))
    straight = json.loads((group.path / "summary.json").read_text())["stats"]["best_test_acc"]
    assert doc["stats"]["best_test_acc"] == straight
    assert main(["train", "--resume", str(path)]) == 0  # all finished: nothing to train, the table again


def test_seed_lists():
    from fastcifar.seeds import parse_seeds

    assert parse_seeds("5") == [0, 1, 2, 3, 4] and parse_seeds("0,4,7") == [0, 4, 7] and parse_seeds("7,") == [7]


@pytest.mark.parametrize("args, message", [
    (["--seeds", "x"], "--seeds takes a count like 3"),
    (["--seeds", "0,0"], "lists a seed twice"),
    (["--seeds", "3", "--seed", "1"], "--seed does not go with --seeds"),
    (["--seeds", "3", "--stop-after-epoch", "1"], "--stop-after-epoch does not go with --seeds"),
    (["--seeds", "3", "--resume-if-exists"], "--resume-if-exists does not go with --seeds"),
    (["--seeds", "3", "--profile"], "--profile does not go with --seeds"),
    (["--seeds", "3", "WORLD_SIZE=2"], "under torchrun, start one job per seed"),
])
def test_bad_seed_flags_are_one_clear_error(args, message, tmp_path, capsys, monkeypatch):
    if args[-1].startswith("WORLD_SIZE="):  # as torchrun sets it for each of its processes
        monkeypatch.setenv("WORLD_SIZE", args.pop().split("=")[1])
    assert main(["train", *FLAGS, "--wandb", "off", *args, "--run-dir", str(tmp_path / "g")]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "g").exists()


def test_resume_of_a_group_refuses_a_changed_recipe_flag(group, capsys):
    assert main(["train", "--resume", str(group.path), "--lr", "0.1"]) == 1
    assert "cannot change: --lr" in capsys.readouterr().err


def test_a_used_directory_is_refused(group, capsys):
    assert main(["train", *FLAGS, "--wandb", "off", "--seeds", "2", "--run-dir", str(group.path)]) == 1
    assert "already holds a run or a group" in capsys.readouterr().err


def test_reset_to_a_seed_with_its_own_subset_equals_a_fresh_session(tmp_path):
    """--train-subset is drawn with the seed, so the reset session gets loaders over the new subset: one epoch
    of it gives exactly the step losses and weights of a session built for that seed."""
    from fastcifar.config import resolve
    from fastcifar.data.cifar import load_dataset
    from fastcifar.distributed import DistInfo
    from support import tiny_config

    def setup(seed):
        cfg = tiny_config(tmp_path, seed=seed, train_subset=24, optimizer="adam", ema=0.9)
        return cfg, load_dataset(cfg.dataset, synthetic_size=32, train_subset=24, seed=seed)

    cfg0, ds0 = setup(0)
    s = train.build_session(cfg0, DistInfo(), ds0, resolve(cfg0))
    train.train_one_epoch(s, 0)
    cfg1, ds1 = setup(1)
    assert not np.array_equal(ds0.train_labels, ds1.train_labels) or not np.array_equal(ds0.train_images,
                                                                                         ds1.train_images)
    train.reset_session(s, cfg1, ds1)
    fresh = train.build_session(cfg1, DistInfo(), ds1, resolve(cfg1))
    a, b = train.train_one_epoch(s, 0), train.train_one_epoch(fresh, 0)
    assert a["step_losses"] == b["step_losses"]
    assert all(torch.equal(x, y) for x, y in zip(s.model.state_dict().values(), fresh.model.state_dict().values()))
    assert all(torch.equal(x, y) for x, y in zip(s.ema.model.state_dict().values(),
                                                 fresh.ema.model.state_dict().values()))


def test_a_seed_stopped_by_target_acc_counts_as_done(tmp_path):
    path = tmp_path / "g"
    assert main(["train", *FLAGS, "--wandb", "off", "--seeds", "2", "--target-acc", "0.05",
                 "--run-dir", str(path)]) == 0
    doc = json.loads((path / "summary.json").read_text())
    assert [(r["seed"], r["summary"]["epochs_done"]) for r in doc["runs"]] == [(0, 1), (1, 1)]
    assert main(["train", "--resume", str(path)]) == 0  # done: nothing trains further
    assert len(rows(path / "seed-0")) == 1


def test_reset_under_limit_steps_takes_the_new_seeds_data_order(tmp_path):
    """--seeds with --limit-steps (or --fast-dev-run): the loader the session holds is the limiting wrapper; the reset
    must reach the loader under it, so the next seed trains in its own order, as its separate run does."""
    from fastcifar.config import resolve
    from fastcifar.data.cifar import load_dataset
    from fastcifar.distributed import DistInfo
    from support import tiny_config

    cfg0, cfg1 = (tiny_config(tmp_path, seed=seed, limit_steps=2) for seed in (0, 1))
    ds = load_dataset(cfg0.dataset, synthetic_size=32, seed=0)
    s = session.build_session(cfg0, DistInfo(), ds, resolve(cfg0))
    session.reset_session(s, cfg1, ds)
    fresh = session.build_session(cfg1, DistInfo(), ds, resolve(cfg1))
    for loader in (s.train_loader, fresh.train_loader):
        loader.set_epoch(0)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(s.train_loader, fresh.train_loader))
    assert s.train_loader.seed == 1


def test_under_val_split_the_group_headline_is_the_test_accuracy_of_the_epoch_chosen_on_validation():
    """A group (and `fastcifar compare`) must not report the test set's maximum as the headline when the epoch
    was chosen on validation: that maximum is kept apart, named as such."""
    from fastcifar.seeds import run_metrics

    summary = {"best_test_acc": 0.62, "best_test_acc_no_tta": 0.62, "final_test_acc": 0.55, "mean_epoch_time_s": 1.0,
               "mean_train_time_s": 0.9, "chosen_on": "validation", "test_acc_at_best": 0.58}
    metrics = run_metrics(summary, [], "off")
    assert metrics["best_test_acc"] == 0.58 and metrics["max_test_acc"] == 0.62
    assert run_metrics({**summary, "chosen_on": "test"}, [], "off")["best_test_acc"] == 0.62


def test_a_seed_stopped_before_its_first_save_points_at_the_group(tmp_path):
    """SIGINT in seed 1's first epoch (steps 9-12): nothing of seed 1 was saved, so the message sends the user to
    `--resume GROUP` (rerunning the --seeds command would be refused: the group exists), and that finishes it."""
    path = tmp_path / "g"
    result = interrupted_group(path, seeds=2, at_step=10)
    assert result.returncode == 130, result.stderr[-2000:]
    said = result.stdout + result.stderr
    assert f"continue the group with `fastcifar train --resume {path}`" in said, said[-1500:]
    assert "run the same command again" not in said
    assert main(["train", "--resume", str(path), "--progress", "off"]) == 0
    assert [r["seed"] for r in json.loads((path / "summary.json").read_text())["runs"]] == [0, 1]
