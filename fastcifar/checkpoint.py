"""Checkpoints that cannot be half-written or silently corrupt, and the RNG part of the resume state.

Writing: the payload is serialised in memory first (so its size is known), written to a temp file beside the
target with the user's umask, fsynced, renamed over the old file, and the folder fsynced: a crash at any moment
leaves the previous file whole. A full disk is one clear error naming what was needed; the temp file is removed.

Reading: torch.save's format is a zip archive that stores a CRC-32 of every record; `load_checkpoint` checks them
all (zipfile.testzip, ~0.1 s for 134 MB) before unpickling, so bytes changed on disk are one clear error naming
the file and the record, instead of a model that loads and later "diverges".
"""

from __future__ import annotations

import io
import random
import zipfile
from pathlib import Path

import numpy as np
import torch

from fastcifar import FastCifarError
from fastcifar.files import atomic_write


def save_checkpoint(path: Path, state: dict) -> int:
    """Serialise `state` and write it atomically; returns its size in bytes."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    atomic_write(Path(path), data)
    return len(data)


def verify_checkpoint(path: Path) -> None:
    """Every record's CRC-32, as stored by torch.save's zip format. Raises FastCifarError naming the damage."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except PermissionError:
        raise FastCifarError(f"cannot read checkpoint {path} (permission denied).") from None
    except (zipfile.BadZipFile, EOFError, OSError) as exc:
        raise FastCifarError(f"checkpoint {path} is damaged or not a checkpoint ({exc}).") from None
    if bad is not None:
        raise FastCifarError(f"checkpoint {path} is corrupt: its record {bad!r} fails its CRC-32 check "
                             f"(its bytes changed after it was written).")


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    """A verified checkpoint, or one FastCifarError that says what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise FastCifarError(f"no checkpoint at {path}.")
    verify_checkpoint(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:
        raise FastCifarError(f"checkpoint {path} cannot be read ({type(exc).__name__}: {exc}).") from None
    if not isinstance(state, dict) or "model" not in state:
        raise FastCifarError(f"{path} is not a fastcifar checkpoint (no model weights in it).")
    return state


def check_compatible(expected: dict, found: dict, source: Path) -> None:
    """One line saying how a checkpoint's model differs from this run's (class count, or architecture)."""
    if "fc.weight" in found and "fc.weight" in expected and set(found) == set(expected):
        theirs, ours = tuple(found["fc.weight"].shape), tuple(expected["fc.weight"].shape)
        if theirs != ours:
            raise FastCifarError(f"{source} holds a model with {theirs[0]} classes (fc.weight {theirs}); this run's "
                                 f"has {ours[0]} (fc.weight {ours}).")
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    shapes = [k for k in expected if k in found and tuple(found[k].shape) != tuple(expected[k].shape)]
    if missing or extra or shapes:
        detail = [f"{len(missing)} weights missing (e.g. {missing[0]})" if missing else "",
                  f"{len(extra)} unexpected (e.g. {extra[0]})" if extra else "",
                  f"{len(shapes)} of other shape (e.g. {shapes[0]}: {tuple(found[shapes[0]].shape)} vs "
                  f"{tuple(expected[shapes[0]].shape)})" if shapes else ""]
        raise FastCifarError(f"{source} holds a different model than this run's CIFAR ResNet-18: "
                             f"{'; '.join(d for d in detail if d)}.")


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
