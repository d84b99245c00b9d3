"""Run `fastcifar` with one fault injected, for the fault tests: `python tests/inject.py ARGS...` is
`fastcifar ARGS...` with the fault that FASTCIFAR_TEST_FAULT names.

  kill-at-step:N              SIGKILL when this process's N-th training step (counted from 1) starts
  kill-in-write:NAME:K        this process's K-th atomic write of NAME (last.pt, best.pt, ...) dies half-way: half
                              the bytes are in its temp file, fsynced, then SIGKILL
  signal-at-step:SIG[,SIG]:N  send these signals (SIGTERM, SIGINT, SIGHUP) to itself when step N starts
  hang-at-step:N              sleep for an hour when step N starts (a hung DDP rank)

Under torchrun: FASTCIFAR_TEST_FAULT_RANK=R injects the fault on rank R only, and only in the job's first start
(a restarted process runs clean); FASTCIFAR_TEST_PRIVATE_DIR=PATH makes PATH unreachable for every rank but 0, as
a run directory on node 0's local disk is for the other nodes.
"""

import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import fastcifar.checkpoint as checkpoint
import fastcifar.session as session
from fastcifar.cli import main

rank = os.environ.get("RANK", "0")
private = os.environ.get("FASTCIFAR_TEST_PRIVATE_DIR")
if private and rank != "0":
    private = os.path.abspath(private)

    def forbidden(path) -> bool:
        try:
            return os.path.abspath(os.fsdecode(path)).startswith(private)  # abspath: no stat, no recursion
        except TypeError:  # a file descriptor
            return False

    def no_access(event, args):
        if event in ("open", "os.mkdir", "os.rename", "os.replace", "os.remove", "os.listdir", "os.scandir",
                     "os.truncate", "os.chmod", "os.rmdir") and args and forbidden(args[0]):
            raise PermissionError(f"rank {rank} touched {args[0]}: that folder exists only on rank 0's node")

    def guarded(real):
        def stat(path, *args, **kwargs):
            no_access("open", (path,))
            return real(path, *args, **kwargs)
        return stat

    sys.addaudithook(no_access)
    os.stat, os.lstat = guarded(os.stat), guarded(os.lstat)

kind, _, arg = os.environ.get("FASTCIFAR_TEST_FAULT", "").partition(":")
restarted = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0"
if os.environ.get("FASTCIFAR_TEST_FAULT_RANK", rank) != rank or restarted:
    kind = ""
if kind in ("kill-at-step", "signal-at-step", "hang-at-step"):
    *names, at = arg.split(":")
    signals = [getattr(signal, n) for n in names[0].split(",")] if names else [signal.SIGKILL]
    real_step, steps = session.train_step, [0]

    def train_step(*args, **kwargs):
        steps[0] += 1
        if steps[0] == int(at):
            if kind == "hang-at-step":
                signal.signal(signal.SIGTERM, signal.SIG_DFL)  # torchrun's SIGTERM ends it at once
                time.sleep(3600)
            for sig in signals:
                os.kill(os.getpid(), sig)
        return real_step(*args, **kwargs)

    session.train_step = train_step  # build_session binds the step from session.py
elif kind == "kill-in-write":
    name, at = arg.split(":")
    real_write, writes = checkpoint.atomic_write, [0]

    def atomic_write(path, data):
        path = Path(path)
        if path.name == name:
            writes[0] += 1
            if writes[0] == int(at):
                fd, _ = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
                os.write(fd, data[: len(data) // 2])
                os.fsync(fd)
                os.kill(os.getpid(), signal.SIGKILL)
        return real_write(path, data)

    checkpoint.atomic_write = atomic_write
elif kind:
    raise SystemExit(f"unknown fault {kind!r}")

raise SystemExit(main(sys.argv[1:]))
