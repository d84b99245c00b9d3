"""Run `fastcifar` with one fault injected, for the fault tests: `python tests/inject.py ARGS...` is
`fastcifar ARGS...` with the fault that FASTCIFAR_TEST_FAULT names.

  kill-at-step:N              SIGKILL when this process's N-th training step (counted from 1) starts
  kill-in-write:NAME:K        this process's K-th atomic write of NAME (last.pt, best.pt, ...) dies half-way: half
                              the bytes are in its temp file, fsynced, then SIGKILL
  signal-at-step:SIG[,SIG]:N  send these signals (SIGTERM, SIGINT, SIGHUP) to itself when step N starts
"""

import os
import signal
import sys
import tempfile
from pathlib import Path

import fastcifar.checkpoint as checkpoint
import fastcifar.train as train
from fastcifar.cli import main

kind, _, arg = os.environ.get("FASTCIFAR_TEST_FAULT", "").partition(":")
if kind in ("kill-at-step", "signal-at-step"):
    *names, at = arg.split(":")
    signals = [getattr(signal, n) for n in names[0].split(",")] if names else [signal.SIGKILL]
    real_step, steps = train.train_step, [0]

    def train_step(*args, **kwargs):
        steps[0] += 1
        if steps[0] == int(at):
            for sig in signals:
                os.kill(os.getpid(), sig)
        return real_step(*args, **kwargs)

    train.train_step = train_step
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
