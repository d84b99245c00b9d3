"""torchrun with two CPU processes (gloo): each rank trains its shard, metrics are all-reduced, rank 0 writes."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from support import REPO, tiny_config, without_timings


TORCHRUN = shutil.which("torchrun", path=os.path.dirname(sys.executable))
needs_torchrun = pytest.mark.skipif(TORCHRUN is None, reason="torchrun not found beside this Python")
RESTART_FLAGS = ["--dataset", "synthetic", "--synthetic-size", "64", "--batch-size", "8", "--epochs", "2",
                 "--wandb", "off", "--no-report", "--progress", "off", "--resume-if-exists"]


def torchrun(*args: str, restarts: int = 0, fault: str = "", fault_rank: str = "1", private: Path | None = None):
    """`torchrun --standalone --nproc_per_node 2 tests/inject.py ARGS` (inject.py is `fastcifar` with a fault)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO),
           "FASTCIFAR_TEST_FAULT": fault, "FASTCIFAR_TEST_FAULT_RANK": fault_rank,
           "FASTCIFAR_TEST_PRIVATE_DIR": str(private or "")}
    return subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node", "2", "--max-restarts", str(restarts),
                           str(REPO / "tests" / "inject.py"), *args], capture_output=True, text=True, cwd=REPO,
                          timeout=600, env=env)


def model_weights(run: Path) -> dict:
    return torch.load(run / "last.pt", weights_only=False)["model"]


def jsonl(run: Path, name: str = "metrics.jsonl") -> list[dict]:
    return [json.loads(line) for line in (run / name).read_text().splitlines()]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted 2-process job of RESTART_FLAGS: the run a restarted job must equal."""
    run = tmp_path_factory.mktemp("straight") / "run"
    result = torchrun("train", *RESTART_FLAGS, "--run-dir", str(run))
    assert result.returncode == 0, result.stderr[-3000:]
    return run, result


@needs_torchrun
def test_two_process_ddp_run_on_cpu(straight):
    run, result = straight
    assert result.stdout.count("epoch 0 [1/2]") == 1  # rank 0 alone prints
    config = json.loads((run / "config.json").read_text())["resolved"]
    assert config["world_size"] == 2 and config["global_batch_size"] == 16 and config["steps_per_epoch"] == 4
    rows = jsonl(run)
    assert [row["train_images"] for row in rows] == [64, 64]  # 2 ranks x 4 steps x 8 images: every image once
    assert "ddp x2" in rows[0]["active"]



def test_restarted_processes_agree_on_a_store_generation_that_no_earlier_start_used():
    """A restarted rank 1 that reads the counter before the restarted rank 0 draws a new generation still joins
    rank 0's, not the dead round's (whose keys would hold the dead processes' addresses)."""
    import datetime
    import threading

    import torch.distributed as dist

    from fastcifar.distributed import join_generation

    store = dist.HashStore()
    store.set_timeout(datetime.timedelta(seconds=20))

    def start(first_rank, wait_s=0.0):
        got = {}
        threads = [threading.Thread(target=lambda r=r: got.__setitem__(r, join_generation(store, r, 3, 20)))
                   for r in (first_rank, *(r for r in range(3) if r != first_rank))]
        threads[0].start()
        threading.Event().wait(wait_s)
        for thread in threads[1:]:
            thread.start()
        for thread in threads:
            thread.join()
        return got

    assert start(0) == {0: 1, 1: 1, 2: 1}
    assert start(1, wait_s=0.3) == {0: 2, 1: 2, 2: 2}  # rank 1 said hello to generation 1 first
    assert start(2, wait_s=0.3) == {0: 3, 1: 3, 2: 3}


@pytest.mark.parametrize("device, backend", [("cpu", "gloo"), ("auto", "nccl"), ("cuda", "nccl")])
def test_the_process_group_backend_follows_the_training_device(device, backend, monkeypatch):
    """--device cpu under torchrun on a GPU machine: gloo (NCCL has no CPU tensors); otherwise NCCL on a GPU."""
    import torch

    from fastcifar import distributed

    chosen, devices = [], []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine
    monkeypatch.setattr(torch.cuda, "set_device", devices.append)
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "rendezvous", lambda url, timeout: iter([("store", 0, 2)]))
    monkeypatch.setattr(distributed, "join_generation", lambda store, rank, size, timeout_s: 1)
    monkeypatch.setattr(distributed.dist, "PrefixStore", lambda prefix, store: store)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda backend, **kwargs: chosen.append(backend))
    info = distributed.setup(device)
    assert (info.rank, info.world_size, info.local_rank) == (0, 2, 1)
    assert chosen == [backend] and devices == ([1] if backend == "nccl" else [])


@needs_torchrun
def test_a_rank_killed_mid_epoch_is_restarted_by_torchrun_and_the_job_ends_as_if_uninterrupted(straight, tmp_path):
    """The same command under `torchrun --max-restarts 1`: rank 1 is SIGKILLed in epoch 1; torchrun restarts both
    ranks, which continue from last.pt; weights and metrics equal an uninterrupted job's bit for bit. Rank 1 can
    reach nothing in the run directory (as on a node with its own disk): rank 0 reads last.pt and sends it."""
    straight, restarted = straight[0], tmp_path / "restarted"
    result = torchrun("train", *RESTART_FLAGS, "--run-dir", str(restarted), restarts=1, fault="kill-at-step:6",
                      private=restarted)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming at epoch 1" in result.stdout  # the restarted job continued; it did not start over
    assert "exitcode: -9" in result.stderr  # torchrun saw rank 1 die of SIGKILL
    a, b = model_weights(straight), model_weights(restarted)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert without_timings(jsonl(straight)) == without_timings(jsonl(restarted))
    assert jsonl(straight, "steps.jsonl") == jsonl(restarted, "steps.jsonl")


def test_resume_if_exists_refuses_a_run_of_another_configuration_naming_the_flags(tmp_path, capsys):
    from fastcifar.cli import main
    from fastcifar.train import fit

    run = tmp_path / "run"
    fit(tiny_config(run, epochs=1, monitor=False))
    flags = ["train", "--dataset", "synthetic", "--synthetic-size", "32", "--batch-size", "8", "--wandb", "off",
             "--no-report", "--progress", "off", "--no-monitor", "--run-dir", str(run), "--resume-if-exists"]
    capsys.readouterr()
    assert main([*flags, "--lr", "0.01", "--seed", "3", "--epochs", "2"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "these flags differ from its config.json: --lr, --seed." in err  # not --epochs
    assert main([*flags, "--epochs", "2"]) == 0  # the same command continues (and extends) it
    assert "resuming at epoch 1" in capsys.readouterr().out


def test_resume_if_exists_keeps_a_recipes_warm_up_when_epochs_change(tmp_path, capsys):
    """The fast recipe's warm-up is a share of --epochs: restarted with another --epochs, the same command must
    continue its run with the run's own warm-up (as --resume does), not be refused for --warmup-epochs."""
    from fastcifar.cli import main

    run = tmp_path / "run"
    flags = ["train", "--recipe", "fast", "--dataset", "synthetic", "--synthetic-size", "32", "--batch-size", "8",
             "--wandb", "off", "--no-report", "--progress", "off", "--no-monitor", "--run-dir", str(run),
             "--resume-if-exists"]
    assert main([*flags, "--epochs", "3", "--stop-after-epoch", "1"]) == 0
    warmup = json.loads((run / "config.json").read_text())["config"]["warmup_epochs"]
    assert warmup == pytest.approx(2 * 3 / 15)
    capsys.readouterr()
    assert main([*flags, "--epochs", "4", "--stop-after-epoch", "2"]) == 0, capsys.readouterr().err
    assert "resuming at epoch 1" in capsys.readouterr().out
    config = json.loads((run / "config.json").read_text())["config"]
    assert config["epochs"] == 4 and config["warmup_epochs"] == warmup  # not 2 * 4 / 15
    assert main([*flags, "--epochs", "4"]) == 0, capsys.readouterr().err  # restarted again: still the same run
    assert "resuming at epoch 2" in capsys.readouterr().out
    assert json.loads((run / "config.json").read_text())["config"]["warmup_epochs"] == warmup
    assert main([*flags, "--epochs", "4", "--warmup-epochs", "1"]) == 1  # a warm-up given is a change: refused
    assert "these flags differ from its config.json: --warmup-epochs." in capsys.readouterr().err


@needs_torchrun
def test_a_hung_rank_is_noticed_after_dist_timeout_by_a_message_naming_the_rank_and_what_it_was_doing(tmp_path):
    result = torchrun("train", *RESTART_FLAGS, "--dist-timeout", "3", "--run-dir", str(tmp_path / "run"),
                      fault="hang-at-step:2")
    assert result.returncode != 0
    assert ("error: rank 0 of 2 on " in result.stderr and "waited longer than --dist-timeout 3 s for the other "
            "processes while training epoch 0: another process died or hangs" in result.stderr), result.stderr[-3000:]
    assert "[rank0]: Traceback" not in result.stderr  # one message (the Traceback left is torchrun's own)


def test_two_ranks_of_64_take_the_images_of_one_process_of_128_each_step():
    """The plan's strided shards: at every step the union of the ranks' batches is the one process's batch, each
    image with the same crop and flip."""
    import numpy as np

    from fastcifar.data.augment import parse_augment
    from fastcifar.data.plan import draw_epoch_plan

    spec = parse_augment("crop,flip,cutout=8")
    for epoch in (0, 3):
        one = draw_epoch_plan(384, spec, 0, epoch)
        ranks = [draw_epoch_plan(384, spec, 0, epoch, rank, 2) for rank in (0, 1)]
        for step in range(3):
            def images(plan, size):
                part = slice(step * size, (step + 1) * size)
                return sorted(zip(plan.order[part], plan.offset_y[part], plan.offset_x[part], plan.flip[part],
                                  map(tuple, plan.boxes[part])))
            assert images(one, 128) == sorted(images(ranks[0], 64) + images(ranks[1], 64))
        assert not np.array_equal(ranks[0].order, ranks[1].order)


SYNC_FLAGS = ["--dataset", "synthetic", "--synthetic-size", "192", "--epochs", "1", "--optimizer", "sgd", "--lr",
              "0.05", "--no-monitor", "--channels-last", "off", "--wandb", "off", "--no-report", "--progress", "off",
              "--target-acc", "0.05"]


@needs_torchrun
def test_sync_bn_two_ranks_of_32_train_like_one_process_of_64(tmp_path):
    """3 steps of 2 ranks x 32 with --sync-bn and of 1 process x 64: the same weights, metrics, evaluation and
    checkpoints. Tolerance: 0.05 of the weight update (|dw_2 - dw_1| / |dw_1|), for float32 rounding (the summation
    orders differ; in float64 the gradients agree to 1e-10: the test below). Measured on the 2-core VM (the runs are
    deterministic): 0.005 with --sync-bn, 0.107 without it (per-rank statistics), whose test loss is also 31 % off."""
    from fastcifar.cli import main
    from fastcifar.evaluation import evaluate_checkpoint
    from fastcifar.model import resnet18_cifar

    one, two = tmp_path / "one", tmp_path / "two"
    result = torchrun("train", *SYNC_FLAGS, "--batch-size", "32", "--sync-bn", "--run-dir", str(two))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sync-bn" in result.stdout  # the header's active line
    assert main(["train", *SYNC_FLAGS, "--batch-size", "64", "--run-dir", str(one)]) == 0

    torch.manual_seed(0)
    start = resnet18_cifar().state_dict()
    a, b = model_weights(one), model_weights(two)
    assert a.keys() == b.keys()
    update = {k: (a[k] - start[k]).double() for k in a if a[k].is_floating_point()}
    apart = sum(((a[k] - b[k]).double() ** 2).sum() for k in update) ** 0.5
    assert apart <= 0.05 * sum((u ** 2).sum() for u in update.values()) ** 0.5

    config = [json.loads((run / "config.json").read_text())["resolved"] for run in (one, two)]
    assert [(c["global_batch_size"], c["steps_per_epoch"], c["trained_images_per_epoch"]) for c in config] == \
        [(64, 3, 192)] * 2
    (row_1,), (row_2,) = jsonl(one), jsonl(two)
    assert row_1.keys() == row_2.keys() and row_1["train_images"] == row_2["train_images"] == 192
    for key in ("train_loss", "test_loss"):
        assert row_2[key] == pytest.approx(row_1[key], rel=0.03), key
    for key in ("train_acc", "test_acc"):
        assert row_2[key] == pytest.approx(row_1[key], abs=0.03), key
    steps_1, steps_2 = jsonl(one, "steps.jsonl"), jsonl(two, "steps.jsonl")
    assert [r["step"] for r in steps_1] == [r["step"] for r in steps_2] == [0, 1, 2]
    assert steps_2[0]["loss"] == pytest.approx(steps_1[0]["loss"], rel=1e-4)  # the same weights, the same batch
    # the sharded evaluation of 2 ranks (96 test images, 48 each, padded batches) equals one process's
    alone = evaluate_checkpoint(two / "last.pt", device="cpu")
    assert alone["test_acc"] == row_2["test_acc"] and alone["test_loss"] == pytest.approx(row_2["test_loss"], 1e-5)
    summaries = [json.loads((run / "summary.json").read_text()) for run in (one, two)]
    assert summaries[0].keys() == summaries[1].keys()
    assert summaries[0]["time_to_acc"].keys() == summaries[1]["time_to_acc"].keys()
    assert [(s["epochs_done"], s["target_reached_epoch"]) for s in summaries] == [(1, 0), (1, 0)]
    assert [s["time_to_acc"] for s in summaries] == [{k: None for k in summaries[0]["time_to_acc"]}] * 2
    checkpoints = [torch.load(run / "last.pt", weights_only=False) for run in (one, two)]
    assert checkpoints[0].keys() == checkpoints[1].keys()
    assert [c["world_size"] for c in checkpoints] == [1, 2]


def test_resume_if_exists_starts_afresh_where_its_run_saved_no_epoch(tmp_path, capsys):
    """Restarted before its first save (killed in epoch 0): the same command begins again in its directory."""
    from fastcifar.cli import main

    run = tmp_path / "run"
    flags = ["train", "--dataset", "synthetic", "--synthetic-size", "32", "--batch-size", "8", "--epochs", "1",
             "--wandb", "off", "--no-report", "--progress", "off", "--no-monitor", "--run-dir", str(run),
             "--resume-if-exists"]
    assert main(flags) == 0
    first = jsonl(run)
    for name in ("last.pt", "best.pt", "summary.json"):  # as if killed after the epoch's row, before its save
        (run / name).unlink()
    capsys.readouterr()
    assert main(flags) == 0
    assert "resuming" not in capsys.readouterr().out
    assert without_timings(jsonl(run)) == without_timings(first)  # one epoch-0 row, not two


def test_cpu_sync_batchnorm_gives_the_global_batch_gradients_in_float64(monkeypatch):
    """Two ranks (threads, with collectives over a barrier) of 8 images each, gradients averaged as DDP does, equal
    one process of 16 in float64 to 1e-10: forward statistics, running statistics and every gradient."""
    import threading
    from types import SimpleNamespace

    from fastcifar import sync_bn
    from fastcifar.model import resnet18_cifar

    barrier, slots = threading.Barrier(2), {}

    def exchange(rank, tensor):
        slots[rank] = tensor.clone()
        barrier.wait()
        both = [slots[0], slots[1]]
        barrier.wait()
        return both

    local = threading.local()
    monkeypatch.setattr(sync_bn, "dist", SimpleNamespace(
        is_initialized=lambda: True, get_world_size=lambda: 2,
        all_gather=lambda out, t: [o.copy_(x) for o, x in zip(out, exchange(local.rank, t))],
        all_reduce=lambda t: t.copy_(sum(exchange(local.rank, t)))))
    torch.manual_seed(0)
    images, labels = torch.randn(16, 3, 32, 32, dtype=torch.float64), torch.randint(0, 10, (16,))
    reference = resnet18_cifar().double()
    models = [sync_bn.convert_sync_batchnorm(resnet18_cifar().double(), torch.device("cpu")) for _ in range(2)]
    for model in models:
        model.load_state_dict(reference.state_dict())
    torch.nn.functional.cross_entropy(reference(images), labels).backward()

    def rank_step(rank):
        local.rank = rank
        torch.nn.functional.cross_entropy(models[rank](images[rank::2]), labels[rank::2]).backward()

    threads = [threading.Thread(target=rank_step, args=(rank,)) for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(isinstance(m, sync_bn.CPUSyncBatchNorm) for m in models[0].modules()) == 20
    for (name, ref), p0, p1 in zip(reference.named_parameters(), models[0].parameters(), models[1].parameters()):
        assert torch.allclose((p0.grad + p1.grad) / 2, ref.grad, rtol=1e-10, atol=1e-12), name
    for key, value in reference.state_dict().items():
        assert torch.allclose(models[0].state_dict()[key].double(), value.double(), rtol=1e-10), key
