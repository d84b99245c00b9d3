"""The run directory (config.json, metrics.jsonl, summary.json, monitor rows) and the W&B adapter.

Files are the record; W&B is a mirror. A W&B failure prints one warning and turns W&B off for the rest of the
run: it never stops or slows training. With --wandb off the wandb package is never imported.
"""

from __future__ import annotations

import json
import math
import os
import sys
from datetime import datetime
from pathlib import Path

from fastcifar import FastCifarError
from fastcifar.checkpoint import atomic_write_bytes


def _json_default(obj):
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


def _clean(value):
    """JSON has no NaN/Inf: store them as null so every row stays valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def dumps(obj) -> str:
    return json.dumps(_clean(obj), default=_json_default, allow_nan=False)


def default_run_dir(recipe: str) -> Path:
    return Path("runs") / f"{datetime.now().strftime('%Y%m%d-%H%M%S')}-{recipe}"


class RunDir:
    """One training run's folder. JSONL files get one object per line, flushed and fsynced as written."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / ".write-probe"
            probe.write_text("ok")
            probe.unlink()
        except OSError as exc:
            raise FastCifarError(f"run directory {self.path} is not writable ({exc.strerror or exc}): "
                                 f"pass --run-dir with a folder you can write to.") from None

    def file(self, name: str) -> Path:
        return self.path / name

    def write_json(self, name: str, obj) -> None:
        text = json.dumps(_clean(obj), default=_json_default, indent=2, allow_nan=False) + "\n"
        atomic_write_bytes(self.file(name), lambda f: f.write(text.encode()))

    def read_json(self, name: str):
        return json.loads(self.file(name).read_text())

    def append_jsonl(self, name: str, row: dict) -> None:
        with open(self.file(name), "a") as f:
            f.write(dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read_jsonl(self, name: str) -> list[dict]:
        path = self.file(name)
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def truncate_jsonl(self, name: str, keep) -> None:
        """On resume: keep only the rows of epochs the checkpoint holds (a crash may have left one more)."""
        rows = [r for r in self.read_jsonl(name) if keep(r)]
        text = "".join(dumps(r) + "\n" for r in rows)
        atomic_write_bytes(self.file(name), lambda f: f.write(text.encode()))


def _wandb_has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


class WandbTracker:
    """Mirror of the run in Weights & Biases. Every call is guarded: the first failure disables it."""

    def __init__(self, mode: str, project: str, run_dir: Path, config: dict, name: str, resume_id: str | None = None):
        self.run = None
        self.mode = mode
        if mode == "off":
            return
        try:
            import wandb
        except ImportError:
            print("note: wandb is not installed: W&B tracking is off (the run directory still records "
                  "everything; pip install wandb to mirror runs).", file=sys.stderr)
            self.mode = "off"
            return
        if mode == "auto":
            mode = "online" if _wandb_has_api_key() else "offline"
        self.mode = mode
        self._wandb = wandb
        try:
            self.run = wandb.init(project=project, name=name, config=config, dir=str(run_dir), mode=mode,
                                  id=resume_id, resume="allow" if resume_id else None)
            self._define_metrics()
        except Exception as exc:
            self._fail(exc)

    @property
    def run_id(self) -> str | None:
        return getattr(self.run, "id", None)

    def _define_metrics(self):
        # Per-epoch charts against epoch; per-sample layer statistics against the global step.
        self.run.define_metric("epoch")
        for prefix in ("train/*", "test/*", "time/*", "perf/*", "lr", "update_epoch/*"):
            self.run.define_metric(prefix, step_metric="epoch")
        self.run.define_metric("step")
        for prefix in ("grad_mean/*", "grad_max/*", "grad_norm/*", "update_step/*"):
            self.run.define_metric(prefix, step_metric="step")

    def _fail(self, exc: Exception):
        print(f"warning: W&B failed ({type(exc).__name__}: {exc}); W&B logging is off for the rest of this run, "
              f"training continues.", file=sys.stderr)
        self.run = None

    def log(self, data: dict) -> None:
        if self.run is None:
            return
        try:
            self.run.log(data)
        except Exception as exc:
            self._fail(exc)

    def log_images(self, paths: list[Path]) -> None:
        if self.run is None or not paths:
            return
        try:
            self.run.log({f"plots/{Path(p).stem}": self._wandb.Image(str(p)) for p in paths})
        except Exception as exc:
            self._fail(exc)

    def set_summary(self, data: dict) -> None:
        if self.run is None:
            return
        try:
            for key, value in data.items():
                self.run.summary[key] = value
        except Exception as exc:
            self._fail(exc)

    def finish(self, exit_code: int = 0) -> None:
        if self.run is None:
            return
        try:
            self.run.finish(exit_code=exit_code)
        except Exception as exc:
            self._fail(exc)
        self.run = None
