"""torchrun / DDP set-up. One process per GPU; each rank trains on its shard of every epoch's permutation
with --batch-size images per step (the global batch is batch_size x world_size); rank 0 does the writing.

A collective that waits longer than --dist-timeout for another process (dead, hung, or stuck on a full disk)
fails instead of hanging, and `collective_failure` turns it into one message naming this rank and what it was
doing (`DistInfo.doing`, set at phase boundaries, never per step)."""

from __future__ import annotations

import datetime
import os
import socket
import time
import uuid
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fastcifar import FastCifarError

DEFAULT_TIMEOUT_S = 600.0  # long enough for rank 0 to download CIFAR-10 or write a checkpoint while others wait


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    timeout_s: float = DEFAULT_TIMEOUT_S
    doing: str = "starting"  # what this process is doing now: named when a collective fails

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S) -> DistInfo:
    """Reads torchrun's environment; a plain `fastcifar train` is world size 1 and touches nothing. The backend
    follows the device the run trains on (--device cpu on a GPU machine: gloo, as NCCL has no CPU tensors)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")), timeout_s,
                    "joining the other processes")
    if not dist.is_initialized():
        backend = "nccl" if device != "cpu" and torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(info.local_rank)
        timeout = datetime.timedelta(seconds=timeout_s)
        try:
            store, rank, size = next(dist.rendezvous("env://", timeout=timeout))
            generation = join_generation(store, rank, size, timeout_s)
            dist.init_process_group(backend, store=dist.PrefixStore(f"fastcifar/{generation}/pg", store),
                                    rank=rank, world_size=size, timeout=timeout)
        except (RuntimeError, dist.DistError) as exc:
            raise collective_failure(exc, info) from None
    return info


def join_generation(store, rank: int, world_size: int, timeout_s: float) -> int:
    """A number shared by this start of the job's processes and by no earlier one.

    torchrun's agent keeps one store for all restarts of a job, and a restarted process group that used the
    same keys would read the dead round's addresses (gloo fails in connectFullMesh, NCCL reads an old unique
    id). TORCHELASTIC_RESTART_COUNT cannot separate the rounds: each node's agent counts only its own failures.
    So rank 0 draws a fresh generation from a counter, every other rank says hello with a token of its own
    under the generation it reads, and rank 0 answers each token of its generation; a rank that said hello to
    an older one (read before rank 0 drew) hears nothing there and says hello again once the counter moves.
    """
    counter = "fastcifar/generation"
    if rank == 0:
        generation = store.add(counter, 1)
        for peer in range(1, world_size):
            token = store.get(f"fastcifar/{generation}/hello/{peer}").decode()  # waits, up to the store timeout
            store.set(f"fastcifar/welcome/{token}", str(generation))
        return generation
    token, greeted = uuid.uuid4().hex, 0
    welcome = f"fastcifar/welcome/{token}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        generation = store.add(counter, 0)
        if generation > greeted:
            store.set(f"fastcifar/{generation}/hello/{rank}", token)
            greeted = generation
        if store.check([welcome]):
            return int(store.get(welcome))
        time.sleep(0.02)
    raise RuntimeError(f"Timed out after {timeout_s:g} s waiting for rank 0 to start")


def collective_failure(exc: BaseException, info: DistInfo) -> FastCifarError | None:
    """One message for a collective that timed out or lost a peer; None when `exc` is something else."""
    text = str(exc)
    if not info.enabled or not (isinstance(exc, dist.DistError) or any(
            word in text for word in ("gloo", "NCCL", "Timed out", "timed out", "Connection", "connection"))):
        return None
    what = (f"waited longer than --dist-timeout {info.timeout_s:g} s for the other processes"
            if "imed out" in text or "imeout" in text else "lost the connection to another process")
    detail = text.strip().splitlines()[0][:160] if text.strip() else type(exc).__name__
    return FastCifarError(f"rank {info.rank} of {info.world_size} on {socket.gethostname()} {what} while "
                          f"{info.doing}: another process died or hangs; its own output says why ({detail}).")


def all_reduce_sum(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_rank(flag: bool, info: DistInfo, device) -> bool:
    """True on every rank when `flag` is true on any (e.g. a signal that reached one process)."""
    if not info.enabled:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def broadcast_object(obj, info: DistInfo):
    if not info.enabled:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
