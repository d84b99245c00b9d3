"""Gradient-flow and weight-update statistics against plain per-parameter arithmetic; schedule; NaN stops."""

import json
import math

import pytest
import torch
import torch.nn as nn

from support import tiny_config
from fastcifar.monitor import LayerMonitor, default_grad_epochs
from fastcifar.train import TrainingDiverged, fit


def _toy():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    model(torch.randn(8, 3, 8, 8)).pow(2).mean().backward()
    return model


def test_layers_are_parameterised_modules_in_forward_order():
    monitor = LayerMonitor(_toy(), steps_per_epoch=10, epochs=3)
    assert monitor.layer_names == ["0", "1", "4"]


def test_grad_stats_match_a_plain_per_parameter_computation():
    model = _toy()
    stats = LayerMonitor(model, steps_per_epoch=10, epochs=3).grad_stats()
    for i, module in enumerate([model[0], model[1], model[4]]):
        grads = [p.grad.double().flatten() for p in module.parameters()]
        flat = torch.cat(grads)
        assert stats["mean_abs"][i] == pytest.approx(flat.abs().mean().item(), rel=1e-6)
        assert stats["max_abs"][i] == pytest.approx(flat.abs().max().item(), rel=1e-6)
        assert stats["norm"][i] == pytest.approx(flat.norm().item(), rel=1e-6)


def test_update_ratio_matches_a_plain_computation():
    model = _toy()
    monitor = LayerMonitor(model, steps_per_epoch=10, epochs=3)
    before = [p.detach().clone() for p in model.parameters()]
    monitor.before_optimizer_step()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    ratio = monitor.after_optimizer_step()
    params = list(model.parameters())
    groups = [[0, 1], [2, 3], [4, 5]]  # conv w,b; bn w,b; linear w,b
    for i, group in enumerate(groups):
        delta = math.sqrt(sum((params[j].detach() - before[j]).double().pow(2).sum().item() for j in group))
        norm = math.sqrt(sum(before[j].double().pow(2).sum().item() for j in group))
        assert ratio[i] == pytest.approx(delta / norm, rel=1e-6)


def test_sampling_schedule():
    assert default_grad_epochs(25) == [0, 5, 10, 15, 20, 24]
    assert default_grad_epochs(3) == [0, 2]
    monitor = LayerMonitor(_toy(), steps_per_epoch=390, epochs=25)
    sampled = [s for s in range(390) if monitor.should_sample(1, s)]
    assert sampled == [0, 97, 194, 291, 388]  # every 390 // 4 steps
    sparse = LayerMonitor(_toy(), steps_per_epoch=100, epochs=25, grad_every=1000)
    assert [s for s in range(100) if sparse.should_sample(3, s)] == [0]  # only the global cadence
    assert [s for s in range(100) if sparse.should_sample(5, s)] == [0, 25, 50, 75]  # a report epoch: always 4


def test_health_flags_name_the_layers():
    monitor = LayerMonitor(_toy(), steps_per_epoch=10, epochs=3, grad_low=1e-3, grad_high=10)
    assert monitor.flag_layers([1e-5, 1.0, float("nan")]) == {"vanishing": ["0"], "exploding": [], "nonfinite": ["4"]}
    assert monitor.flag_layers([1.0, 50.0, 1.0])["exploding"] == ["1"]


def test_zero_init_residual_blocks_are_not_flagged_at_the_first_step(tmp_path):
    """At step 0 a zero-initialised block's last BatchNorm is 0, so its branch gets exactly no gradient: by design,
    not vanishing. Later a zero norm is flagged as usual."""
    monitor = LayerMonitor(_toy(), steps_per_epoch=10, epochs=3)
    assert monitor.flag_layers([0.0, 1.0, 1.0], zero_by_design=True)["vanishing"] == []
    assert monitor.flag_layers([0.0, 1.0, 1.0])["vanishing"] == ["0"]
    fit(tiny_config(tmp_path / "r", epochs=1, zero_init_residual=True))
    grads = [json.loads(x) for x in (tmp_path / "r" / "grad_flow.jsonl").read_text().splitlines()]
    assert any(r["step"] == 0 and r["norm"] == 0.0 for r in grads)  # the zero gradients are recorded...
    (row,) = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert row["flags"]["vanishing"] == []  # ...and not flagged


def test_monitor_rows_are_written_in_a_tidy_format(tmp_path):
    fit(tiny_config(tmp_path / "r"))
    rows = [json.loads(x) for x in (tmp_path / "r" / "grad_flow.jsonl").read_text().splitlines()]
    assert {tuple(sorted(r)) for r in rows} == {("epoch", "index", "kind", "layer", "max_abs", "mean_abs", "norm",
                                                 "numel", "rms", "step")}
    assert all(r["rms"] == pytest.approx(r["norm"] / math.sqrt(r["numel"])) for r in rows)
    assert {r["kind"] for r in rows} == {"conv", "norm", "linear"}
    layers = sorted({(r["index"], r["layer"]) for r in rows})
    assert len(layers) == 62 - 21 and layers[0] == (0, "conv1") and layers[-1] == (40, "fc")
    assert {r["epoch"] for r in rows} == {0, 1}
    updates = [json.loads(x) for x in (tmp_path / "r" / "updates.jsonl").read_text().splitlines()]
    assert {r["scope"] for r in updates} == {"step", "epoch"}
    assert all(r["ratio"] > 0 for r in updates)
    metrics = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert all(set(m["flags"]) == {"vanishing", "exploding"} for m in metrics)


def test_a_flagged_layer_is_named_in_the_epoch_line(tmp_path, capsys):
    fit(tiny_config(tmp_path / "r", epochs=1, grad_high=1e-30, grad_low=0.0))
    out = capsys.readouterr().out
    assert "FLAGGED exploding: conv1, bn1, layer1.0.conv1, layer1.0.bn1 (+37 more)" in out  # forward order


def test_planted_nan_stops_the_run_naming_epoch_and_step(tmp_path):
    calls = {"n": 0}

    def poisoned(logits, labels):  # the training loss, injected: called once per training step
        calls["n"] += 1
        loss = torch.nn.functional.cross_entropy(logits, labels)
        return loss * float("nan") if calls["n"] == 7 else loss  # epoch 1 (0-based), step 2 at 4 steps an epoch

    with pytest.raises(TrainingDiverged, match=r"non-finite training loss at epoch 1 step 2 \(global step 6\)") as info:
        fit(tiny_config(tmp_path / "r"), loss_fn=poisoned)
    assert f"The last good checkpoint is {tmp_path / 'r' / 'last.pt'} (1 epoch(s) done)" in str(info.value)
    state = torch.load(tmp_path / "r" / "last.pt", weights_only=False)
    assert state["epoch"] == 1  # the last good epoch's checkpoint is kept
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert len((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()) == 1
