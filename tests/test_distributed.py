"""torchrun with two CPU processes (gloo): each rank trains its shard, metrics are all-reduced, rank 0 writes."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from support import REPO


@pytest.mark.skipif(shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None,
                    reason="torchrun not found beside this Python")
def test_two_process_ddp_run_on_cpu(tmp_path):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    result = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "fastcifar", "train", "--dataset", "synthetic",
         "--synthetic-size", "64", "--batch-size", "8", "--epochs", "1", "--wandb", "off", "--no-report",
         "--progress", "off", "--run-dir", str(tmp_path / "run")],
        capture_output=True, text=True, cwd=REPO, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("epoch 0 [1/1]") == 1  # rank 0 alone prints
    config = json.loads((tmp_path / "run" / "config.json").read_text())["resolved"]
    assert config["world_size"] == 2 and config["global_batch_size"] == 16 and config["steps_per_epoch"] == 4
    (row,) = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert row["train_images"] == 64  # 2 ranks x 4 steps x 8 images: every image once per epoch
    assert "ddp x2" in row["active"]


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
