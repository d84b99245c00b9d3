"""The fast recipe and what it is built from: recipe defaults, flip TTA, the EMA of the weights, time-to-accuracy
and --target-acc. (The step's arithmetic is in test_step.py, the augmentation in test_loaders.py; the 94 % claim
itself needs a GPU: benchmarks/gpu_sweep.sh.)"""

import importlib.util
import json
import subprocess

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from support import REPO, TINY, tiny_config
from fastcifar import TrainingDiverged
from fastcifar import run as run_module
from fastcifar.cli import main as cli_main
from fastcifar.config import RECIPES, build_config, resolve
from fastcifar.data.cifar import load_dataset
from fastcifar.distributed import DistInfo
from fastcifar.train import build_session, evaluate, fit


def test_the_fast_recipe_sets_its_defaults_and_every_flag_overrides_them():
    cfg = build_config("fast")
    assert (cfg.optimizer, cfg.batch_size, cfg.epochs, cfg.scheduler, cfg.tta) == ("sgd", 512, 15, "linear", "flip")
    assert cfg.nesterov and cfg.weight_decay == 5e-4 and cfg.label_smoothing == 0.1 and "cutout=8" in cfg.augment
    cfg = build_config("fast", lr=0.1, augment="crop,flip", tta="off")
    assert (cfg.lr, cfg.augment, cfg.tta, cfg.optimizer) == (0.1, "crop,flip", "off", "sgd")
    assert build_config("worksheet") == build_config()  # the report's table stays the default
    ws = build_config()
    assert (ws.optimizer, ws.lr, ws.batch_size, ws.epochs, ws.scheduler, ws.augment, ws.weight_decay) == \
        ("adam", 1e-3, 128, 25, "cosine", "crop,flip", 0)
    assert set(RECIPES["fast"]) <= set(build_config().to_dict())


def test_every_recipe_switch_can_be_turned_off_from_the_command_line(monkeypatch):
    seen = {}
    monkeypatch.setattr("fastcifar.train.fit", lambda cfg, **kw: seen.setdefault("cfg", cfg) and {})
    assert cli_main(["train", "--recipe", "fast", "--no-zero-init-residual", "--no-nesterov", "--tta", "off",
                     "--decay-norm-and-bias", "--augment", "crop,flip", "--run-dir", "unused"]) == 0
    cfg = seen["cfg"]
    assert (cfg.zero_init_residual, cfg.nesterov, cfg.tta, cfg.decay_norm_and_bias) == (False, False, "off", True)
    assert (cfg.augment, cfg.optimizer, cfg.lr) == ("crop,flip", "sgd", RECIPES["fast"]["lr"])


def test_the_fast_recipe_learns(tmp_path):
    """Its own choices (SGD 0.2 after warm-up, zero-init residual branches, cutout, smoothing, flip TTA) at a batch
    the synthetic set allows: a recipe that cannot learn (a branch that never wakes, an LR that explodes) fails."""
    summary = fit(build_config("fast", **dict(TINY, synthetic_size=128, batch_size=16, epochs=3, monitor=False),
                               run_dir=str(tmp_path / "run")))
    assert summary["headline"] == "flip TTA" and summary["best_test_acc"] >= 0.5, summary  # chance is 0.1


def session(**overrides):
    cfg = build_config(**{"dataset": "synthetic", "synthetic_size": 32, "batch_size": 8, "epochs": 2, "wandb": "off",
                          **overrides})
    ds = load_dataset(cfg.dataset, synthetic_size=cfg.synthetic_size, seed=cfg.seed)
    return build_session(cfg, DistInfo(), ds, resolve(cfg), notice=lambda text: None), ds


def test_flip_tta_averages_the_logits_of_each_image_and_its_mirror():
    s, ds = session(tta="flip")
    result = evaluate(s)
    images = torch.from_numpy(ds.test_images).permute(0, 3, 1, 2).float()
    mean = torch.tensor((0.4914, 0.4822, 0.4465)).view(1, 3, 1, 1)
    std = torch.tensor((0.2023, 0.1994, 0.2010)).view(1, 3, 1, 1)
    x = ((images / 255 - mean) / std).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        s.model.eval()
        plain, mirrored = s.model(x), s.model(x.flip(3).contiguous(memory_format=torch.channels_last))
    labels = torch.from_numpy(ds.test_labels)
    assert result["test_acc"] == pytest.approx((plain.argmax(1) == labels).float().mean().item())
    assert result["test_acc_tta"] == pytest.approx((((plain + mirrored) / 2).argmax(1) == labels).float().mean().item())
    averaged = torch.nn.functional.cross_entropy((plain + mirrored) / 2, labels).item()
    assert result["test_loss_tta"] == pytest.approx(averaged, rel=1e-4)


def test_the_ema_follows_its_recurrence_with_a_warm_up_and_is_what_evaluation_uses():
    """decay_t = min(DECAY, (1 + t) / (10 + t)): early steps follow the weights closely, so the average does not
    keep the random initialisation for long."""
    s, _ = session(ema=0.2)
    assert s.eval_model is s.ema.model  # evaluation sees the averaged weights
    expected = {k: v.clone() for k, v in s.model.state_dict().items()}
    s.train_loader.set_epoch(0)
    s.model.train()
    for t, (images, labels) in enumerate(list(s.train_loader)[:3]):
        s.stepper(images, labels, False)
        decay = min(0.2, (1 + t) / (10 + t))  # 0.1, 0.1818..., then capped at 0.2
        for k, v in s.model.state_dict().items():
            expected[k] = decay * expected[k] + (1 - decay) * v if v.is_floating_point() else v.clone()
    for k, v in s.ema.model.state_dict().items():
        assert torch.allclose(v, expected[k], rtol=1e-5, atol=1e-7), k


class ForeachCalls(TorchDispatchMode):
    """Every foreach op dispatched, with its arguments."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.startswith("_foreach"):
            self.calls.append((func, args))
        return func(*args, **(kwargs or {}))


def test_the_cuda_ema_update_is_a_few_fused_foreach_ops_with_a_tensor_scalar():
    """A foreach op runs as one fused CUDA kernel only when each of its tensor lists matches the first one's
    shapes; a list of 0-dim scalars does not, and CUDA falls back to one kernel per tensor. The decay must be a
    single device tensor (capturable, no host read), never a Python number or a list of 0-dim tensors. The CUDA
    form is checked here on CPU tensors (the ops and arguments are the same), and gives the CPU form's average."""
    s, _ = session(ema=0.9)
    for p in s.model.parameters():  # live weights away from the average's, so the update moves it
        p.data.add_(torch.randn_like(p))
    before = {k: v.clone() for k, v in s.ema.model.state_dict().items()}
    live = s.model.state_dict()
    s.ema.fused = True  # what a CUDA model gets
    with ForeachCalls() as seen:
        s.ema.update()
    decay = 0.1  # min(0.9, (1 + 0) / (10 + 0)) at the first update
    for k, v in s.ema.model.state_dict().items():
        if v.is_floating_point():
            assert torch.allclose(v, decay * before[k] + (1 - decay) * live[k], rtol=1e-5, atol=1e-6), k
    assert 2 <= len(seen.calls) <= 4  # independent of the number of parameters
    for func, args in seen.calls:
        shapes = [t.shape for t in args[0]]
        for arg in args[1:]:
            if isinstance(arg, (list, tuple)):
                assert [t.shape for t in arg] == shapes, func  # same shapes: the fused path
            elif func.__name__.split(".")[0] in ("_foreach_mul_", "_foreach_mul"):
                assert isinstance(arg, torch.Tensor) and arg.dim() == 0, func  # the decay: a device tensor


@pytest.fixture(scope="module")
def tta_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("tta") / "run"
    summary = fit(tiny_config(run, epochs=3, tta="flip", monitor=False))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return run, summary, rows


def test_summary_shows_accuracy_with_and_without_tta_and_says_which_is_the_headline(tta_run):
    run, summary, rows = tta_run
    assert summary["headline"] == "flip TTA"
    assert summary["best_test_acc"] == max(r["test_acc_tta"] for r in rows)
    assert summary["best_test_acc_no_tta"] == max(r["test_acc"] for r in rows)
    assert summary["final_test_acc_tta"] == rows[-1]["test_acc_tta"]
    best = torch.load(run / "best.pt", weights_only=False)
    assert best["headline"] == "flip TTA" and best["test_acc"] == summary["best_test_acc"]


def test_time_to_accuracy_is_recorded_in_rows_summary_and_table(tta_run, tmp_path, monkeypatch, capsys):
    _, _, rows = tta_run
    accs = [r["test_acc_tta"] for r in rows]
    milestones = (min(accs), max(accs), 1.5)  # reached at once, reached at the best epoch, never
    monkeypatch.setattr(run_module, "ACCURACY_MILESTONES", milestones)
    summary = fit(tiny_config(tmp_path / "r", epochs=3, tta="flip", monitor=False))
    out = capsys.readouterr().out
    again = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    first = {m: next(r["epoch"] for r in again if r["test_acc_tta"] >= m) for m in milestones[:2]}
    for r in again:
        assert r["first_reached"] == [m for m in milestones[:2] if first[m] == r["epoch"]]
        assert r["elapsed_s"] >= r["elapsed_train_s"] > 0
    time_to = summary["time_to_acc"]
    for m in milestones[:2]:
        entry = time_to[f"{100 * m:g}%"]
        assert entry["epoch"] == first[m] and entry["wall_s"] == again[first[m]]["elapsed_s"]
    assert time_to["150%"] is None and "not reached" in out
    assert f"Time to {100 * milestones[0]:g}% test accuracy" in out
    assert summary["total_wall_s"] >= summary["train_wall_s"] > 0 and "compile_s" in summary


def test_target_accuracy_stops_the_run_after_that_epochs_checkpoint(tta_run, tmp_path, capsys):
    _, _, rows = tta_run
    target = rows[1]["test_acc_tta"]
    reached = next(r["epoch"] for r in rows if r["test_acc_tta"] >= target)
    summary = fit(tiny_config(tmp_path / "r", epochs=3, tta="flip", monitor=False, target_acc=target))
    assert summary["target_reached_epoch"] == reached and summary["epochs_done"] == reached + 1
    assert not summary["finished"]
    assert torch.load(tmp_path / "r" / "last.pt", weights_only=False)["epoch"] == reached + 1
    assert f"target test accuracy {100 * target:g}% reached at epoch {reached}: stopped" in capsys.readouterr().out


def test_gpu_sweep_runs_its_grid_and_writes_one_json(tmp_path):
    """The GPU sweep's plumbing at tiny synthetic sizes on the CPU (the real grid needs a GPU: 8 minutes there)."""
    result = subprocess.run(["bash", "benchmarks/gpu_sweep.sh", str(tmp_path)], cwd=REPO, capture_output=True,
                            text=True, timeout=600, env={**__import__("os").environ, "GPU_SWEEP_SMOKE": "1",
                                                         "GPU_SWEEP_SEEDS": "2", "GPU_SWEEP_VARIANTS": "fast,ema0.999",
                                                         "PYTHON": __import__("sys").executable})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    # the recipe's seeds first (its claim is a mean over seeds), then each variant's
    assert [(r["variant"], r["seed"]) for r in sweep["runs"]] == [("fast", 0), ("fast", 1), ("ema0.999", 0),
                                                                    ("ema0.999", 1)]
    accs = [r["best_test_acc"] for r in sweep["runs"] if r["variant"] == "fast"]
    stats = sweep["variants"]["fast"]["best_test_acc"]
    assert stats["n"] == 2 and stats["mean"] == pytest.approx(np.mean(accs))
    assert stats["spread"] == pytest.approx(max(accs) - min(accs))
    assert sweep["variants"]["ema0.999"]["overrides"] == {"ema": 0.999}
    assert not list(tmp_path.glob("runs/*/*.pt"))  # checkpoints dropped: the sweep keeps numbers


def test_a_diverging_variant_is_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("gpu_sweep", REPO / "benchmarks" / "gpu_sweep.py")
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)

    def fake_fit(cfg):
        if cfg.lr == 0.4:
            raise TrainingDiverged("non-finite loss at epoch 0 step 3: training stopped.")
        return {"best_test_acc": 0.5 + cfg.seed / 100, "time_to_acc": {"94%": None}}

    monkeypatch.setattr("fastcifar.train.fit", fake_fit)
    assert sweep.main([str(tmp_path), "--smoke", "--seeds", "2", "--variants", "fast,lr0.4,cosine"]) == 0
    result = json.loads((tmp_path / "sweep.json").read_text())
    assert [(r["variant"], r["seed"]) for r in result["runs"]] == [
        ("fast", 0), ("fast", 1), ("lr0.4", 0), ("cosine", 0), ("lr0.4", 1), ("cosine", 1)]
    assert [r["error"] for r in result["runs"] if r["variant"] == "lr0.4"] == [
        "non-finite loss at epoch 0 step 3: training stopped."] * 2
    assert result["variants"]["lr0.4"]["failed"] == [0, 1] and result["variants"]["lr0.4"]["best_test_acc"] is None
    assert result["variants"]["cosine"]["best_test_acc"]["mean"] == pytest.approx(0.505)
    assert "lr0.4 seed 0: failed: non-finite loss" in capsys.readouterr().out
