"""The run directory (its files and its lock) and ONE metrics sink that writes them and mirrors them to W&B.

Files are the record; W&B is a mirror. A W&B failure prints one warning and turns W&B off for the rest of the
run: it never stops or slows training. With --wandb off the wandb package is never imported.

A run directory belongs to one run: a fresh run refuses a folder that holds a saved epoch (or a finished run's
record), and a run holds an exclusive lock (flock on RUN/.lock, naming its process) for its whole life, resume
included, and removes the file when it ends. The kernel drops the lock when the process dies, however it dies, so a stale lock never blocks anything.
A folder whose run saved no epoch (killed, stopped or out of disk before its first checkpoint) holds nothing to
lose: a fresh run restarts there, removing what the dead run left.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import json
import math
import os
import socket
import statistics
import sys
import tempfile
from datetime import datetime
from pathlib import Path

from fastcifar import FastCifarError
from fastcifar.files import append_lines, atomic_write, dumps, read_jsonl

RUN_MARKERS = ("config.json", "last.pt", "metrics.jsonl")  # any of these: the folder holds a run
SAVED_MARKERS = ("last.pt", "best.pt", "summary.json")  # any of these: it holds something a restart would lose
JSONL_FILES = ("metrics.jsonl", "steps.jsonl", "grad_flow.jsonl", "updates.jsonl")

# metrics.jsonl field -> W&B key: the one map from the record to the mirror (a new metric is one line here).
EPOCH_KEYS = {
    "train_loss": "train/loss", "train_acc": "train/acc", "test_loss": "test/loss", "test_acc": "test/acc",
    "test_loss_tta": "test/loss_tta", "test_acc_tta": "test/acc_tta", "lr": "lr",
    "val_loss": "val/loss", "val_acc": "val/acc", "val_loss_tta": "val/loss_tta", "val_acc_tta": "val/acc_tta",
    "epoch_time_s": "time/epoch_s", "train_time_s": "time/train_s", "eval_time_s": "time/eval_s",
    "compile_s": "time/compile_s", "elapsed_s": "time/elapsed_s", "elapsed_train_s": "time/elapsed_train_s",
    "train_images_per_s": "perf/images_per_s", "achieved_tflops": "perf/tflops", "achieved_gflops": "perf/gflops",
    "mfu": "perf/mfu",
}
SUMMARIES = {"test/acc": "max", "test/acc_tta": "max", "train/loss": "min", "test/loss": "min", "val/acc": "max",
             "val/acc_tta": "max"}


def default_run_dir(recipe: str) -> Path:
    return Path("runs") / f"{datetime.now().strftime('%Y%m%d-%H%M%S')}-{recipe}"


class RunDir:
    """One training run's folder. Nothing is created until `create()`."""

    def __init__(self, path: str | Path, notice=print):
        self.path = Path(path)
        self.notice = notice
        self._lock_fd: int | None = None

    def file(self, name: str) -> Path:
        return self.path / name

    def holds_run(self) -> list[str]:
        return [name for name in RUN_MARKERS if self.file(name).exists()]

    def saved(self) -> list[str]:
        """What a restart there would lose: a checkpoint, or the summary of a run that ended."""
        return [name for name in SAVED_MARKERS if self.file(name).exists()]

    def check_usable(self) -> None:
        """Before anything else: a path the filesystem refuses (a name too long, a link loop), then the lock: a
        live process there is named, whatever the folder holds. Reads only; takes no lock."""
        try:
            self.path.stat()
        except (FileNotFoundError, NotADirectoryError):
            pass  # create() makes it, or says why it cannot
        except OSError as exc:
            if exc.errno == errno.ENAMETOOLONG:
                raise FastCifarError(f"cannot use run directory {self.path}: a name in it is longer than the "
                                     f"filesystem allows ({_name_max(self.path)} bytes): choose a shorter "
                                     f"--run-dir.") from None
            raise FastCifarError(f"cannot use run directory {self.path} ({exc.strerror or exc}).") from None
        try:
            fd = os.open(self.file(".lock"), os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return  # no lock file (or one we cannot read, which lock() reports): nobody holds it
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # shared: a second checker does not block this one
        except BlockingIOError:
            raise FastCifarError(self._in_use(fd)) from None
        finally:
            os.close(fd)

    def _in_use(self, fd: int) -> str:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
        return f"run directory {self.path} is in use by {holder}: wait for it to finish, or use another --run-dir."

    def claim_new(self) -> None:
        """A default run directory: this name, else NAME-2, NAME-3, ...: mkdir is atomic, so two runs started in
        the same second each get a folder of their own."""
        base = self.path
        for n in itertools.count(1):
            candidate = base if n == 1 else base.with_name(f"{base.name}-{n}")
            try:
                candidate.parent.mkdir(parents=True, exist_ok=True)
                candidate.mkdir()
            except FileExistsError:
                continue
            except OSError:
                return  # create() says why
            self.path = candidate
            return

    def foreign(self) -> list[str]:
        """Files a restart would remove that no fastcifar run wrote: a config.json that is not a run's, or rows
        without a run's config.json (a dead run writes its config.json before any row)."""
        try:
            doc = json.loads(self.file("config.json").read_text())
            ours = isinstance(doc, dict) and "config" in doc and "resolved" in doc
        except (FileNotFoundError, NotADirectoryError):  # no config.json (or no folder yet: create() says why)
            ours = None
        except (OSError, ValueError):
            ours = False
        if ours is False:
            return ["config.json"]
        return [] if ours else [name for name in JSONL_FILES if self.file(name).exists()]

    def clear_unsaved(self) -> list[str]:
        """Restarting where a run saved no epoch: remove its config and rows (its temp files are removed with
        every run's). Returns the names removed."""
        removed = []
        for name in ("config.json", *JSONL_FILES):
            if self.file(name).exists():
                self.file(name).unlink()
                removed.append(name)
        return removed

    def create(self) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.path, prefix=".write-probe-"):  # unique: two processes may race
                pass
        except OSError as exc:
            raise FastCifarError(f"run directory {self.path} is not writable ({exc.strerror or exc}): "
                                 f"pass --run-dir with a folder you can write to.") from None

    def lock(self) -> None:
        """Hold RUN/.lock for the life of this process; a second process is told who holds it."""
        path = self.file(".lock")
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            except OSError as exc:
                raise FastCifarError(f"cannot lock run directory {self.path} ({exc.strerror or exc}).") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                message = self._in_use(fd)
                os.close(fd)
                raise FastCifarError(message) from None
            # The holder removes the file when it ends (unlock): a lock taken on the removed file is no lock.
            try:
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"fastcifar pid {os.getpid()} on {socket.gethostname()} since "
                      f"{datetime.now().isoformat(timespec='seconds')}\n".encode(), 0)
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            # removed while still held, so no stale .lock names a finished process; lock() retries on a removed file
            self.file(".lock").unlink(missing_ok=True)
            os.close(self._lock_fd)
            self._lock_fd = None

    def write_json(self, name: str, obj) -> None:
        atomic_write(self.file(name), (dumps(obj, indent=2) + "\n").encode())

    def read_json(self, name: str):
        try:
            return json.loads(self.file(name).read_text())
        except (OSError, ValueError) as exc:
            raise FastCifarError(f"{self.file(name)} is missing or unreadable ({exc}).") from None

    def append_jsonl(self, name: str, rows: dict | list[dict]) -> None:
        append_lines(self.file(name), [rows] if isinstance(rows, dict) else rows)

    def read_jsonl(self, name: str) -> list[dict]:
        return read_jsonl(self.file(name), self.notice)

    def truncate_jsonl(self, name: str, keep) -> None:
        """On resume: keep only the rows of epochs the checkpoint holds (a crash may have left more, or a torn
        line). Rewritten only when something is dropped."""
        path = self.file(name)
        if not path.exists():
            return
        rows = self.read_jsonl(name)
        kept = [r for r in rows if keep(r)]
        text = "".join(dumps(r) + "\n" for r in kept)
        if text.encode() != path.read_bytes():
            atomic_write(path, text.encode())


def _name_max(path: Path) -> int:
    """The longest file name the filesystem holding `path` (its nearest existing folder) allows."""
    folder = next((p for p in path.absolute().parents if p.is_dir()), Path("/"))
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


class MetricsSink:
    """Where a run's numbers go: rows to the JSONL files of the run directory, the same numbers to W&B."""

    def __init__(self, run: RunDir, tracker: WandbTracker):
        self.run, self.tracker = run, tracker
        self._layer_history: dict[str, dict[int, list[float]]] = {}

    def epoch(self, row: dict) -> None:
        self.run.append_jsonl("metrics.jsonl", row)
        self.tracker.log({"epoch": row["epoch"], **{key: row[field] for field, key in EPOCH_KEYS.items()
                                                     if isinstance(row.get(field), (int, float))}})

    def steps(self, rows: list[dict]) -> None:
        self.run.append_jsonl("steps.jsonl", rows)

    def layer_sample(self, grad_rows: list[dict], update_rows: list[dict]) -> None:
        """One monitor sample: per-layer rows to the files; to W&B, a few run-level scalars only."""
        self.run.append_jsonl("grad_flow.jsonl", grad_rows)
        self.run.append_jsonl("updates.jsonl", update_rows)
        rms = [r["rms"] for r in grad_rows if _finite(r["rms"])]
        ratios = [r["ratio"] for r in update_rows if _finite(r["ratio"])]
        global_norm = math.sqrt(sum(r["norm"] ** 2 for r in grad_rows)) if all(_finite(r["norm"]) for r in grad_rows) \
            else math.nan
        self.tracker.log({"step": grad_rows[0]["step"], "grad/global_norm": global_norm,
                          "grad/layer_rms_min": min(rms, default=math.nan),
                          "grad/layer_rms_max": max(rms, default=math.nan),
                          "update/step_ratio_median": statistics.median(ratios) if ratios else math.nan})

    def layer_epoch(self, epoch: int, update_rows: list[dict], grad_rms: list[float] | None) -> None:
        """Per-layer statistics of a finished epoch: rows to the files; to W&B one line chart per statistic,
        a line per epoch across the layers (Figure 2 and 3 live), instead of a chart per layer."""
        self.run.append_jsonl("updates.jsonl", update_rows)
        series = {"layers/update_ratio_epoch": [r["ratio"] for r in update_rows]}
        if grad_rms is not None:
            series["layers/grad_rms"] = grad_rms
        for key, values in series.items():
            self._layer_history.setdefault(key, {})[epoch] = values
            self.tracker.line_series(key, self._layer_history[key], [r["layer"] for r in update_rows])

    def summary(self, summary: dict) -> None:
        self.run.write_json("summary.json", summary)
        self.tracker.set_summary({k: v for k, v in _flat(summary).items() if isinstance(v, (int, float, str))})


def _flat(d: dict, prefix: str = "") -> dict:
    """{"time_to_acc": {"94%": {"epoch": 12}}} -> {"time_to_acc/94%/epoch": 12}: W&B summaries are flat."""
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


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

    def __init__(self, mode: str, project: str, run_dir: Path, config: dict, name: str, resume_id: str | None = None,
                 group: str | None = None):
        """`group`: the W&B group of a `--seeds` run's seeds, so the W&B UI draws their mean and band."""
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
        elif mode == "online" and not _wandb_has_api_key():
            # offline rather than off: the run's data is kept and can reach W&B later with `wandb sync`
            print("note: --wandb online, but no W&B API key (WANDB_API_KEY or `wandb login`): logging offline; the "
                  "end of the run prints the `wandb sync` command that uploads it.", file=sys.stderr)
            mode = "offline"
        self.mode, self.run_dir = mode, Path(run_dir)
        self._wandb = wandb

        def init(mode):
            # quiet: no end-of-run history dump burying fastcifar's own results table
            self.run = wandb.init(project=project, name=name, config=config, dir=str(run_dir), mode=mode, group=group,
                                  id=resume_id, resume="allow" if resume_id else None,
                                  settings=wandb.Settings(quiet=True))
            self._define_metrics()

        try:
            init(mode)
        except Exception as exc:
            if mode != "online":
                return self._fail(exc)
            print(f"note: W&B online failed ({type(exc).__name__}: {exc}); logging offline instead.", file=sys.stderr)
            self.mode = "offline"
            try:
                init("offline")
            except Exception as exc:
                self._fail(exc)

    @property
    def run_id(self) -> str | None:
        return getattr(self.run, "id", None)

    def _define_metrics(self):
        # Per-epoch charts against epoch; per-sample statistics against the global step.
        self.run.define_metric("epoch")
        self.run.define_metric("step")
        for key in EPOCH_KEYS.values():
            summary = {"summary": SUMMARIES[key]} if key in SUMMARIES else {}
            self.run.define_metric(key, step_metric="epoch", **summary)
        self.run.define_metric("time/checkpoint_s", step_metric="epoch")
        for prefix in ("grad/*", "update/*"):
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

    def line_series(self, key: str, by_epoch: dict[int, list[float]], layers: list[str]) -> None:
        if self.run is None:
            return
        try:
            epochs = sorted(by_epoch)
            chart = self._wandb.plot.line_series(
                xs=list(range(len(layers))), ys=[by_epoch[e] for e in epochs], keys=[f"epoch {e}" for e in epochs],
                title=f"{key.split('/')[-1]} per layer (x: layer index in forward order, 0 = {layers[0]})",
                xname="layer index")
            self.run.log({key: chart})
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
        files = getattr(self.run, "dir", None)  # RUN/wandb/offline-run-<time>-<id>/files
        try:
            self.run.finish(exit_code=exit_code)
        except Exception as exc:
            self._fail(exc)
        self.run = None
        if self.mode == "offline":
            where = Path(files).parent if files else self.run_dir / "wandb" / "offline-run-*"
            print(f"W&B: logged offline; upload with: wandb sync {where}")
