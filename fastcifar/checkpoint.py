"""Atomic checkpoints and the full resume state (model, optimizer, scheduler, scaler, RNG, epoch).

A checkpoint is written to a temporary file in the same folder, fsynced, then renamed over the old one:
a crash mid-write leaves the previous checkpoint whole, so a finished epoch is never lost.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from fastcifar import FastCifarError


def atomic_write_bytes(path: Path, write) -> None:
    """Call write(file) on a temp file beside `path`, fsync it, rename it over `path`, fsync the folder."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, *, model, optimizer, scheduler, scaler, epoch: int, best_acc: float,
                    config: dict, extra: dict | None = None) -> None:
    """`epoch` is the number of finished epochs: a resumed run starts at that index."""
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "epoch": epoch,
        "best_acc": best_acc,
        "rng": rng_state(),
        "config": config,
        **(extra or {}),
    }
    atomic_write_bytes(Path(path), lambda f: torch.save(state, f))


def copy_checkpoint(source: Path, target: Path) -> None:
    """Atomically copy a finished checkpoint (best.pt from last.pt) without serialising the state again."""
    with open(source, "rb") as src:
        atomic_write_bytes(Path(target), lambda f: shutil.copyfileobj(src, f, 1 << 20))


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise FastCifarError(f"no checkpoint at {path}: --resume needs a run directory that holds last.pt "
                             f"(written after each finished epoch).")
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:
        raise FastCifarError(f"checkpoint {path} cannot be read ({type(exc).__name__}: {exc}).") from None
