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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fastcifar import FastCifarError
from fastcifar.data.augment import CIFAR_MEAN, CIFAR_STD, SIZE
from fastcifar.files import atomic_write
from fastcifar.optim import load_optimizer_state


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
    try:
        found = path.is_file()
    except OSError as exc:  # e.g. a name longer than the filesystem allows
        raise FastCifarError(f"cannot read checkpoint {path} ({(exc.strerror or str(exc)).lower()}).") from None
    if not found:
        raise FastCifarError(f"no checkpoint at {path}.")
    verify_checkpoint(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:
        raise FastCifarError(f"checkpoint {path} cannot be read ({type(exc).__name__}: {exc}).") from None
    if not isinstance(state, dict) or state.get("model") is None:
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


def input_spec(mean=CIFAR_MEAN, std=CIFAR_STD) -> dict:
    """What the model takes, stored in best.pt and last.pt beside the class names, so that a checkpoint alone is
    enough to classify an image (fastcifar predict, the README's snippet); mean/std: the dataset's (CIFAR-100 has
    its own)."""
    return {"size": SIZE, "channels": "RGB", "range": "pixels / 255, in [0, 1], then (x - mean) / std per channel",
            "mean": list(mean), "std": list(std)}


# --- the resume state of a training session --------------------------------------------------------------------
CHECKPOINT_FORMAT = 2


@dataclass
class Best:
    """The best epoch so far and a copy of its weights (the epoch may not be saved yet), kept on the host: best.pt
    then loads on any machine, a GPU-less one included, and the copy takes no GPU memory."""

    epoch: int = -1
    acc: float = -1.0  # what chose it: the validation accuracy under --val-split, else the test accuracy
    model: dict | None = None
    ema: dict | None = None
    test_acc: float | None = None  # the epoch's headline test accuracy

    @classmethod
    def of(cls, session, epoch: int, acc: float, test_acc: float | None = None) -> Best:
        def clone(state):
            return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}

        return cls(epoch, acc, clone(session.model.state_dict()),
                   clone(session.ema.model.state_dict()) if session.ema else None, acc if test_acc is None else test_acc)


@dataclass
class Timing:
    """Cumulative over the run's processes, stored in every last.pt. checkpoint_s and checkpoints count the saves
    completed before the one that stores them; that one is counted on resume (`count_the_last_save`)."""

    wall_s: float = 0.0  # before this process
    train_s: float = 0.0
    compile_s: float = 0.0
    checkpoint_s: float = 0.0
    checkpoints: int = 0
    save_started_at: float = 0.0  # time.time() when the save that wrote this last.pt began

    def count_the_last_save(self, written: list[Path]) -> None:
        """On resume: the save that wrote last.pt took from save_started_at to the newest of the files it wrote."""
        if not self.save_started_at:
            return  # a checkpoint older than this field: that save stays uncounted
        ends = [p.stat().st_mtime for p in written if p.exists() and p.stat().st_mtime >= self.save_started_at]
        self.checkpoint_s += max(ends) - self.save_started_at if ends else 0.0
        self.checkpoints += 1
        self.save_started_at = 0.0


def resume_state(session, *, epoch: int, best: Best, timing: Timing, config: dict, classes: list[str],
                 world_size: int) -> dict:
    """last.pt after `epoch` (0-based) is done. Self-contained: it carries the best epoch's weights when they are
    not its own, so best.pt can always be rebuilt from it."""
    best_doc = {"epoch": best.epoch, "acc": best.acc, "test_acc": best.test_acc}
    if best.epoch != epoch:
        best_doc.update(model=best.model, ema=best.ema)
    return {"format": CHECKPOINT_FORMAT, "epoch": epoch + 1, "model": session.model.state_dict(),
            "optimizer": session.optimizer.state_dict(), "schedule": session.schedule.state_dict(),
            "scaler": session.scaler.state_dict(), "ema": session.ema.state_dict() if session.ema else None,
            "rng": rng_state(), "config": config, "classes": classes, "best": best_doc,
            "input": input_spec(session.dataset.mean, session.dataset.std) if session.dataset else input_spec(),
            "best_acc": best.acc, "best_epoch": best.epoch, "timing": vars(timing),
            "steps_per_epoch": len(session.train_loader), "world_size": world_size}


def best_weights(best: Best, *, headline: str, config: dict, classes: list[str], on_validation: bool = False,
                 input: dict | None = None) -> dict:
    """best.pt: the weights of the best epoch (and their EMA), what they scored, and the config: what `fastcifar
    eval`, `--init-from` and the README's three lines load. Under --val-split the epoch was chosen on validation."""
    return {"format": CHECKPOINT_FORMAT, "kind": "best weights", "epoch": best.epoch, "test_acc": best.test_acc,
            "chosen_on": "validation" if on_validation else "test",
            "val_acc": best.acc if on_validation else None,
            "headline": headline, "model": best.model, "ema": best.ema, "config": config, "classes": classes,
            "input": input or input_spec()}


def restore(session, state: dict, path: Path, world_size: int) -> tuple[int, Best, Timing]:
    """Load last.pt's state into `session`; returns (epochs done, best, timing). Refuses a checkpoint of another
    model, or one whose steps do not line up with this run's (another number of processes or batch size): its LR
    schedule position and data order would silently mean something else."""
    check_compatible(session.model.state_dict(), state["model"], path)
    steps, saved_steps = len(session.train_loader), state.get("steps_per_epoch", len(session.train_loader))
    saved_world = state.get("world_size", world_size)
    if (steps, world_size) != (saved_steps, saved_world):
        raise FastCifarError(f"{path} was trained with {saved_world} process(es) and {saved_steps} steps per epoch; "
                             f"this run has {world_size} and {steps}: resume it as it was started (same number of "
                             f"processes, same data), or start a new run from its weights with --init-from.")
    session.model.load_state_dict(state["model"])
    load_optimizer_state(session.optimizer, state["optimizer"])
    session.schedule.load_state_dict(state.get("schedule") or {"step": state["scheduler"]["last_epoch"]})  # fmt 1
    if state.get("scaler"):  # empty when saved without loss scaling (CPU, bf16): a scaler needed now starts fresh
        session.scaler.load_state_dict(state["scaler"])
    if session.ema is not None:
        session.ema.load_state_dict(state.get("ema") or state["model"])
    set_rng_state(state["rng"])
    done = state["epoch"]
    best = state.get("best") or {"epoch": state.get("best_epoch", -1), "acc": state["best_acc"]}  # format 1
    own = best["epoch"] == done - 1  # the best epoch is the saved one: its weights are the checkpoint's
    return done, Best(best["epoch"], best["acc"], best.get("model") or (state["model"] if own else None),
                      best.get("ema") or ((state.get("ema") or {}).get("model") if own else None),
                      best.get("test_acc", best["acc"])), \
        Timing(**state.get("timing", {}))
