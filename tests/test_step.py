"""The training step that a CUDA graph captures (train.train_step), run eagerly here: the same weights as the
plain PyTorch step it replaced; the device-side LR schedule; monitoring that changes nothing; capture failures.
CUDA-only checks (captured vs uncaptured) are skipped without a GPU and run by benchmarks/gpu_evidence.sh."""

import contextlib
import functools
import math
import types

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from fastcifar.config import build_config, resolve
from fastcifar.cuda_graphs import GraphedStep
from fastcifar.data.cifar import load_dataset
from fastcifar.distributed import DistInfo
from fastcifar.model import resnet18_cifar
from fastcifar.optim import LRSchedule, param_groups
from fastcifar.train import build_session

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run by benchmarks/gpu_evidence.sh)")


def session(device="cpu", **overrides):
    cfg = build_config(**{"dataset": "synthetic", "synthetic_size": 48, "batch_size": 8, "epochs": 2,
                          "wandb": "off", "device": device, **overrides})
    ds = load_dataset(cfg.dataset, synthetic_size=cfg.synthetic_size, seed=cfg.seed)
    return build_session(cfg, DistInfo(), ds, resolve(cfg), notice=lambda text: None)


def batches(s, n):
    s.train_loader.set_epoch(0)
    return [(x.clone(), y.clone()) for x, y in list(s.train_loader)[:n]]


def run_steps(s, data, monitored=False):
    s.model.train()
    for images, labels in data:
        s.stepper(images, labels, monitored)


def reference_weights(cfg, data, optimizer_factory, lr_lambda):
    """The step as it was written before the CUDA-graph work: host LR (LambdaLR), zero_grad, backward, step."""
    torch.manual_seed(cfg.seed)
    model = resnet18_cifar(10, zero_init_residual=cfg.zero_init_residual).to(memory_format=torch.channels_last)
    optimizer = optimizer_factory(model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    model.train()
    for images, labels in data:
        loss = F.cross_entropy(model(images), labels, label_smoothing=cfg.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    return model.state_dict()


def assert_same_weights(a: dict, b: dict, rel: float = 0.0):
    for key in a:
        if rel == 0.0:
            assert torch.equal(a[key], b[key]), key
        else:
            scale = b[key].double().norm().clamp_min(1e-12)
            assert ((a[key].double() - b[key].double()).norm() / scale).item() <= rel, key


def test_worksheet_step_equals_the_plain_pytorch_step_bit_for_bit():
    """Adam + cosine LambdaLR. On the CPU the LR tensor is float64 and Adam's single-tensor update reads it as a
    Python number, and the schedule does the same float64 arithmetic in the same order: identical bits."""
    s = session()
    data = batches(s, 4)
    run_steps(s, data)
    total = s.cfg.epochs * len(s.train_loader)
    cosine = lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))  # noqa: E731
    want = reference_weights(s.cfg, data, lambda m: torch.optim.Adam(m.parameters(), lr=s.cfg.lr), cosine)
    assert_same_weights(s.model.state_dict(), want)


def test_fast_recipe_step_equals_sgd_with_parameter_groups_and_warmup():
    """Nesterov SGD, weight decay on conv/linear weights only, warm-up then linear decay, label smoothing.
    The warm-up/linear factor is float64 tensor arithmetic here and Python floats in LambdaLR: equal to ~1 ulp,
    so the weights agree to 1e-6 relative rather than bit for bit."""
    s = session(recipe="fast", batch_size=8, epochs=3, warmup_epochs=1.0, augment="crop,flip,cutout=8")
    data = batches(s, 6)
    run_steps(s, data)
    steps, warm = s.cfg.epochs * len(s.train_loader), len(s.train_loader)

    def factor(step):
        return (step + 1) / warm if step < warm else 1.0 - min(step - warm, steps - warm) / (steps - warm)

    def sgd(model):
        return torch.optim.SGD(param_groups(model, s.cfg.weight_decay, False), lr=s.cfg.lr, momentum=0.9, nesterov=True)

    want = reference_weights(s.cfg, data, sgd, factor)
    assert_same_weights(s.model.state_dict(), want, rel=1e-6)


def test_no_weight_decay_on_batchnorm_and_biases():
    model = resnet18_cifar(10)
    decayed, free = param_groups(model, 5e-4, decay_norm_and_bias=False)
    assert decayed["weight_decay"] == 5e-4 and free["weight_decay"] == 0.0
    assert all(p.ndim == 4 for p in decayed["params"][:-1]) and decayed["params"][-1] is model.fc.weight
    assert any(p is model.bn1.weight for p in free["params"]) and any(p is model.fc.bias for p in free["params"])
    assert len(param_groups(model, 5e-4, decay_norm_and_bias=True)) == 1
    assert len(param_groups(model, 0.0, decay_norm_and_bias=False)) == 1  # nothing to decay: one group


def test_monitored_steps_change_no_weight_and_record_the_same_statistics():
    plain, monitored = session(), session()
    data = batches(plain, 3)
    run_steps(plain, data)
    run_steps(monitored, data[:2])
    before = [p.detach().clone() for p in monitored.monitor.params]
    run_steps(monitored, data[2:], monitored=True)
    assert_same_weights(monitored.model.state_dict(), plain.model.state_dict())
    sample = monitored.monitor.read_sample()
    grads = [p.grad.double() for p in monitored.model.conv1.parameters()]
    assert sample["norm"][0] == pytest.approx(torch.cat([g.flatten() for g in grads]).norm().item(), rel=1e-6)
    after = [p.detach() for p in monitored.monitor.params]
    delta = math.sqrt(sum((a.double() - b.double()).pow(2).sum().item() for a, b in zip(after[:1], before[:1])))
    assert sample["ratio"][0] == pytest.approx(delta / before[0].double().norm().item(), rel=1e-6)


def test_the_step_records_loss_and_accuracy_on_the_device_and_an_injected_loss_is_used():
    calls = []

    def loss_fn(logits, labels):
        calls.append(len(labels))
        return F.cross_entropy(logits, labels) * 2.0

    s = session()
    s.loss_fn = loss_fn
    data = batches(s, 3)
    s.step_index.zero_()
    run_steps(s, data)
    assert calls == [8, 8, 8] and s.step_index.item() == 3
    assert (s.step_losses[:3] > 0).all() and (s.step_losses[3:] == 0).all()
    assert 0 <= s.step_correct[:3].sum().item() <= 24


def expected_lr(kind, warmup, total, peak, step):
    if warmup and step < warmup:
        return peak * (step + 1) / warmup
    progress = min(max(step - warmup, 0), total - warmup) / (total - warmup)
    return peak * {"cosine": 0.5 * (1 + math.cos(math.pi * progress)), "linear": 1 - progress, "constant": 1.0}[kind]


@pytest.mark.parametrize("kind,warmup", [("cosine", 0), ("cosine", 10), ("linear", 10), ("constant", 0)])
def test_lr_schedule_follows_its_formula_and_reaches_zero(kind, warmup):
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([{"params": [param], "lr": torch.tensor(0.4, dtype=torch.float64)}], lr=0.4)
    schedule = LRSchedule(optimizer, kind, total_steps=100, warmup_steps=warmup)
    lrs = [optimizer.param_groups[0]["lr"].item()]
    for _ in range(99):
        schedule.advance()  # device tensor arithmetic, as inside a CUDA graph
        lrs.append(optimizer.param_groups[0]["lr"].item())
    want = [expected_lr(kind, warmup, 100, 0.4, step) for step in range(101)]
    assert lrs == pytest.approx(want[:100], rel=1e-12, abs=1e-15)
    assert schedule.lr_at(range(101)) == pytest.approx(want, rel=1e-12, abs=1e-15)  # the host copy of the formula
    assert want[100] == (0.4 if kind == "constant" else pytest.approx(0.0, abs=1e-15))
    state = schedule.state_dict()
    extended = LRSchedule(optimizer, kind, total_steps=200, warmup_steps=warmup)  # --resume with more epochs
    extended.load_state_dict(state)
    assert state["step"] == 99
    assert optimizer.param_groups[0]["lr"].item() == pytest.approx(expected_lr(kind, warmup, 200, 0.4, 99))


def test_lr_schedule_holds_nothing_that_grows_with_the_run():
    """The LR is computed from the step counter, not looked up in a per-step table: --epochs 10^9 used to be a
    MemoryError. A schedule of 10^15 steps is as small as one of 100 and still follows the formula."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([{"params": [param], "lr": torch.tensor(0.4, dtype=torch.float64)}], lr=0.4)
    small = LRSchedule(optimizer, "cosine", total_steps=100, warmup_steps=10)
    held = [v for v in vars(small).values() if isinstance(v, torch.Tensor)]
    assert held and all(t.numel() <= 1 for t in held), [t.shape for t in held]
    huge = LRSchedule(optimizer, "linear", total_steps=10**15, warmup_steps=10**6)
    huge.load_state_dict({"step": 10**15 // 2})
    assert optimizer.param_groups[0]["lr"].item() == pytest.approx(expected_lr("linear", 10**6, 10**15, 0.4,
                                                                               10**15 // 2), rel=1e-12)


class HostReads(TorchDispatchMode):
    """Counts the ops that read a tensor's value on the host (`.item()`, `bool(t)`, indexing with a tensor):
    on CUDA each is a sync, which a CUDA graph cannot capture."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("recipe", ["worksheet", "fast"])
def test_the_captured_step_reads_nothing_on_the_host(recipe, monkeypatch):
    """What GraphedStep captures, checked on the CPU: forward, loss, backward, statistics, LR schedule, EMA and
    bookkeeping never read a device value on the host. The CPU optimizer is left out: it reads its LR as a
    number, where the CUDA one (fused, capturable) reads the tensor."""
    s = session(**({"recipe": "fast", "batch_size": 8, "epochs": 3, "ema": 0.9} if recipe == "fast" else {}))
    data = batches(s, 3)
    run_steps(s, data[:1])
    monkeypatch.setattr(s.optimizer, "step", lambda *a, **k: None)
    for monitored, (images, labels) in zip((False, True), data[1:]):
        with HostReads() as reads:
            s.stepper(images, labels, monitored)
        assert reads.count == 0, monitored
    with HostReads() as reads:  # and the check itself can fail
        float(s.step_losses[0])
    assert reads.count == 1


class FakeCuda:
    """Just enough of torch.cuda for GraphedStep on the CPU: streams with a "current" one, and graphs whose capture
    records what ran under it (replay does nothing). `fail_in_step` makes the step raise under the N-th capture, as
    an op that cannot be captured does; capture_end then raises too, as CUDA does after any error in a capture."""

    def __init__(self, monkeypatch, fail_in_capture: int | None = None):
        self.current, self.events, self.captures, self.fail_in_capture = "default", [], 0, fail_in_capture
        self.capturing = False
        fake = self

        class Stream:
            def __init__(self):
                self.name = "side"

            def wait_stream(self, other):
                pass

        class Graph:
            def capture_begin(self, capture_error_mode="global"):
                fake.captures += 1
                fake.capturing, self.failing = True, fake.captures == fake.fail_in_capture
                fake.events.append(("capture_begin", capture_error_mode))

            def capture_end(self):
                fake.capturing = False
                if self.failing:
                    raise RuntimeError("operation failed due to a previous error during capture")

            def replay(self):
                fake.events.append("replay")

        @contextlib.contextmanager
        def stream(s):
            before, fake.current = fake.current, s.name
            try:
                yield
            finally:
                fake.current = before

        for name, value in {"Stream": Stream, "CUDAGraph": Graph, "stream": stream, "synchronize": lambda *a: None,
                            "empty_cache": lambda: None,
                            "current_stream": lambda *a: types.SimpleNamespace(name=fake.current,
                                                                               wait_stream=lambda other: None)}.items():
            monkeypatch.setattr(torch.cuda, name, value)

    def stepper(self, s, variants, notices, warmup_steps=0):
        step = functools.partial(s.stepper.step.func, s)

        def recorded(images, labels, monitored):
            self.events.append(("step", monitored, "captured" if self.capturing else "eager", self.current))
            if self.capturing and self.captures == self.fail_in_capture:
                raise RuntimeError("CUDA error: operation not permitted when stream is capturing (the root cause)")
            step(images, labels, monitored)

        s.stepper = GraphedStep(recorded, functools.partial(s.optimizer.zero_grad, set_to_none=True), variants,
                                notices.append, warmup_steps=warmup_steps)
        return s.stepper


def test_every_variant_runs_eagerly_before_any_capture(monkeypatch):
    """A benchmark that asks for unmonitored steps only must still not capture the monitored variant on its
    kernels' first launch: the last warm-up step runs it."""
    fake, notices = FakeCuda(monkeypatch), []
    s, reference = session(), session()
    stepper = fake.stepper(s, (False, True), notices, warmup_steps=3)
    data = batches(s, 5)
    run_steps(s, data)
    run_steps(reference, data[:3] + [data[3]] * 2)  # the fake capture runs the step on the static batch
    eager = [e[1] for e in fake.events if e[0] == "step" and e[2] == "eager"]
    assert eager == [False, False, True] and stepper.captured and not notices
    assert [e for e in fake.events if e[0] == "step" and e[2] == "captured"] == [
        ("step", False, "captured", "side"), ("step", True, "captured", "side")]
    assert fake.events.count("replay") == 2 and fake.current == "default"
    # the substituted monitored warm-up step trained like the unmonitored one asked for
    assert_same_weights(s.model.state_dict(), reference.model.state_dict())


def test_a_run_whose_every_step_is_monitored_is_still_captured(monkeypatch):
    """--grad-every 1, or an epoch of fewer than 8 steps, asks for the monitored variant at every step: the plain
    variant's kernels are a subset of it, so capture happens after the warm-up instead of never."""
    fake, notices = FakeCuda(monkeypatch), []
    s = session()
    stepper = fake.stepper(s, (False, True), notices, warmup_steps=3)
    run_steps(s, batches(s, 5), monitored=True)
    assert stepper.captured and not notices
    assert [e[1] for e in fake.events if e[0] == "step" and e[2] == "eager"] == [True, True, True]


def test_a_failed_capture_restores_the_stream_names_the_root_cause_and_trains_uncaptured(monkeypatch):
    """The step raises under capture (an op that cannot be captured) and capture_end then raises its consequence:
    the caller's stream is current again, the one notice names the step's error, and training goes on uncaptured
    with the same weights as a plain run."""
    fake, notices = FakeCuda(monkeypatch, fail_in_capture=1), []
    s, reference = session(), session()
    stepper = fake.stepper(s, (False,), notices)
    data = batches(s, 3)
    run_steps(s, data)
    run_steps(reference, data)
    assert fake.current == "default" and not fake.capturing
    assert len(notices) == 1 and "the root cause" in notices[0] and "previous error" not in notices[0]
    assert "uncaptured" in notices[0] and stepper.ready and not stepper.captured
    assert ("capture_begin", "thread_local") in fake.events  # loader threads may call CUDA during a capture
    assert_same_weights(s.model.state_dict(), reference.model.state_dict())


def test_a_capture_failing_after_the_first_graph_drops_both_and_trains_uncaptured(monkeypatch):
    """The monitored graph fails after the plain one was captured: neither is kept, one notice."""
    fake, notices = FakeCuda(monkeypatch, fail_in_capture=2), []
    s = session()
    stepper = fake.stepper(s, (False, True), notices)
    run_steps(s, batches(s, 4))
    assert fake.captures == 2 and len(notices) == 1 and not stepper.graphs and not stepper.captured
    assert stepper.ready and stepper.static_images is None and fake.current == "default"
    assert "replay" not in fake.events


@cuda
def test_captured_step_matches_the_uncaptured_one_after_50_steps(monkeypatch):
    """bf16 + compile + the whole step in one CUDA graph (the monitored variant on each chunk's first step),
    against the same session uncaptured. cuDNN autotuning is off and its algorithms deterministic for the
    comparison, so both sessions run the same kernels; bf16 tolerance remains for atomics in backward.
    The batch (FASTCIFAR_GPU_TEST_BATCH, default 128, the worksheet recipe's) is the one the evidence run trains
    at next, so the compilation here fills the compile cache that run then hits."""
    import os

    batch = int(os.environ.get("FASTCIFAR_GPU_TEST_BATCH", "128"))
    common = dict(device="cuda", synthetic_size=batch * 16, batch_size=batch, epochs=4, compile="on", amp="bf16")
    captured, plain = session(cuda_graphs="on", **common), session(cuda_graphs="off", **common)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)  # build_session turned it on
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    data = batches(plain, 16)
    losses = {}
    for s in (captured, plain):
        s.model.train()
        for chunk in (16, 16, 16, 2):  # 50 steps; step_index is per epoch, as in train_one_epoch
            s.step_index.zero_()
            for k, (images, labels) in enumerate(data[:chunk]):
                s.stepper(images, labels, k == 0)
        losses[id(s)] = s.step_losses[:2].float().cpu()
    torch.cuda.synchronize()
    assert captured.stepper.captured, captured.stepper.failed
    assert_same_weights(captured.model.state_dict(), plain.model.state_dict(), rel=2e-2)
    assert torch.allclose(losses[id(captured)], losses[id(plain)], rtol=5e-2, atol=5e-2)
