"""A training run's life around the epoch loop of train.fit():

  open   checks and data, nothing written: config resolved, resume checkpoint verified, sizes checked
  start  the run directory and its lock, the restored state, the header, W&B
  epoch  the record of a finished epoch: its row, monitor rows, checkpoint (when due), the epoch line
  close  summary.json, the results table, the plots

and what ends a run early: SIGINT/SIGTERM (stop at a step boundary, or finish the epoch when finished epochs are
not all saved yet; a second signal exits at once), --target-acc, --stop-after-epoch, divergence, a full disk.
Whatever ends it, every finished epoch that was saved stays, and the message says how to continue.
"""

from __future__ import annotations

import math
import signal
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fastcifar import FastCifarError, TrainingDiverged, __version__
from fastcifar import distributed as dist
from fastcifar import flops
from fastcifar.checkpoint import check_compatible, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from fastcifar.config import TrainConfig, resolve
from fastcifar.console import epoch_line, legend, make_progress, summary_table, wrapped
from fastcifar.data.cifar import load_dataset
from fastcifar.files import NoSpace, remove_stale_temp_files
from fastcifar.optim import load_optimizer_state
from fastcifar.signals import GracefulStop, RunInterrupted
from fastcifar.summary import ACCURACY_MILESTONES, headline, newly_reached, summarise
from fastcifar.tracking import JSONL_FILES, MetricsSink, RunDir, WandbTracker, default_run_dir

if TYPE_CHECKING:
    from fastcifar.train import Session

CHECKPOINT_FORMAT = 2
SAVE_SHARE = 0.05  # --save-every auto on CUDA: saving may cost at most this share of the training time
DROP_WARNING = 0.10  # warn when the last partial batch drops more than this share of the training set


class EpochClock:
    """Wall time of an epoch's parts; synchronises CUDA at each lap so queued GPU work is counted where it ran."""

    def __init__(self, sync):
        self._sync = sync
        sync()
        self._last = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        self._sync()
        now = time.perf_counter()
        self.laps[name], self._last = now - self._last, now


@dataclass
class Best:
    epoch: int = -1
    acc: float = -1.0
    model: dict | None = None  # a device copy of the weights of the best epoch
    ema: dict | None = None


@dataclass
class Timing:
    """Cumulative over the run's processes (stored in every checkpoint)."""

    wall_s: float = 0.0  # before this process
    train_s: float = 0.0
    compile_s: float = 0.0
    checkpoint_s: float = 0.0  # of the saves completed before the latest
    checkpoints: int = 0


def _clone(state: dict) -> dict:
    return {k: v.detach().clone() for k, v in state.items()}


class TrainingRun:
    def __init__(self, cfg: TrainConfig, info: dist.DistInfo, path: Path, stop_after_epoch: int | None):
        self.cfg, self.info = cfg, info
        self.dir = RunDir(path, self.notice)
        self.stop_after_epoch = stop_after_epoch
        self.resume_state: dict | None = None
        self.init_state: dict | None = None
        self.start_epoch, self.best, self.timing = 0, Best(), Timing()
        self.saved_through = -1  # the last epoch in last.pt
        self.last_finished = -1
        self.best_written = -1  # the epoch in best.pt
        self.trained_since_save, self.last_save_s = 0.0, None
        self.stop, self.remote_stop, self.target_epoch = GracefulStop(), False, None
        self.tracker: WandbTracker | None = None
        self.sink: MetricsSink | None = None
        self.started = time.perf_counter()

    # --- open: every check that can fail, nothing written ------------------------------------------------
    @classmethod
    def open(cls, cfg: TrainConfig, info: dist.DistInfo, *, resume_dir=None, init_from=None,
             stop_after_epoch: int | None = None) -> TrainingRun:
        path = Path(resume_dir) if resume_dir else Path(cfg.run_dir or default_run_dir(cfg.recipe))
        run = cls(cfg, info, dist.broadcast_object(path, info), stop_after_epoch)
        run.res = resolve(cfg, info.local_rank, info.world_size)
        try:
            if resume_dir is not None:
                run._open_resume()  # takes the lock: a resume must not read what a live run is writing
            elif info.is_main and run.dir.holds_run():
                raise FastCifarError(f"{path} already holds a run ({', '.join(run.dir.holds_run())}): continue it "
                                     f"with `fastcifar train --resume {path}`, or choose another --run-dir.")
            if init_from:
                run.init_state = load_checkpoint(Path(init_from))
            run.dataset = load_dataset(cfg.dataset, cfg.data_dir, cfg.download, cfg.train_subset, cfg.test_subset,
                                       cfg.synthetic_size, cfg.seed)
            run._check_sizes()
        except BaseException:
            run.dir.unlock()
            raise
        return run

    def _open_resume(self) -> None:
        last = self.dir.file("last.pt")
        if not last.is_file():
            raise FastCifarError(f"cannot resume {self.dir.path}: it holds no last.pt (saved after each finished "
                                 f"epoch); nothing was finished there, so start again without --resume.")
        try:
            self.resume_state = load_checkpoint(last)
        except FastCifarError as exc:
            good = self._intact_best()
            raise FastCifarError(f"{exc} It cannot be resumed." + (
                f" {good} is intact: `fastcifar train --init-from {good}` starts a new run from its weights."
                if good else "")) from None
        done = self.resume_state["epoch"]
        if done >= self.cfg.epochs:
            raise FastCifarError(f"{self.dir.path} already finished all {done} epochs: nothing to resume (pass "
                                 f"--epochs N with N > {done} to train it further).")
        if self.info.is_main:
            self.dir.lock()

    def _intact_best(self) -> Path | None:
        try:
            load_checkpoint(self.dir.file("best.pt"))
            return self.dir.file("best.pt")
        except FastCifarError:
            return None

    def _check_sizes(self) -> None:
        cfg, ds, ws = self.cfg, self.dataset, self.info.world_size
        n = len(ds.train_labels)
        steps = (n // ws) // cfg.batch_size
        if steps == 0:
            raise FastCifarError(f"the training set has {n} images ({n // ws} per process), fewer than one batch "
                                 f"of {cfg.batch_size}: lower --batch-size or raise --train-subset.")
        self.trained_images = steps * cfg.batch_size * ws
        self.res.eval_batch_size = max(1, min(self.res.eval_batch_size, -(-len(ds.test_labels) // ws)))

    # --- start: the run directory, restored state, header, W&B ---------------------------------------------
    def start(self, s: Session) -> None:
        self.session = s
        self._restore(s)  # before anything is written: an incompatible checkpoint leaves no trace
        self.flops_per_image = flops.training_flops_per_image(num_classes=len(self.dataset.classes))
        self.device_name = flops.device_name(self.res.device, self.info.world_size)
        self.peak = self.cfg.peak_tflops or (flops.peak_tflops(flops.device_name(self.res.device), self.res.precision)
                                             if self.res.device.type == "cuda" else None)
        res = self.res
        self.active = " ".join(n for n, on in [
            ("compile", res.compile), ("cuda-graphs", res.cuda_graphs), ("channels_last", res.channels_last),
            (res.precision, True), (res.loader, True), (f"ddp x{self.info.world_size}", self.info.enabled),
            (f"ema {self.cfg.ema}", bool(self.cfg.ema)), ("tta flip", self.cfg.tta == "flip")] if on)
        if self.info.is_main:
            self._prepare_directory(s)
            self._header(s)
            previous = self.dir.read_json("config.json") if self.resume_state else {}
            self.tracker = WandbTracker(self.cfg.wandb, self.cfg.wandb_project, self.dir.path,
                                        {**self.cfg.to_dict(), "resolved": self.resolved}, self.dir.path.name,
                                        resume_id=previous.get("wandb_run_id"))
            if self.tracker.run_id and not self.resume_state:
                self.dir.write_json("config.json", {**self._config_doc(), "wandb_run_id": self.tracker.run_id})
            self.tracker.set_summary({"flops/train_per_image": self.flops_per_image,
                                      "flops/forward_per_image": flops.forward_flops_per_image(
                                          num_classes=len(self.dataset.classes))})
            self.sink = MetricsSink(self.dir, self.tracker)
        self.stop.install()
        s.stop_requested = self._abandon_now
        sys.stdout.flush()

    def _restore(self, s: Session) -> None:
        if self.resume_state is not None:
            st = self.resume_state
            check_compatible(s.model.state_dict(), st["model"], self.dir.file("last.pt"))
            s.model.load_state_dict(st["model"])
            load_optimizer_state(s.optimizer, st["optimizer"])
            s.schedule.load_state_dict(st.get("schedule") or {"step": st["scheduler"]["last_epoch"]})  # format 1
            s.scaler.load_state_dict(st["scaler"])
            if s.ema is not None:
                s.ema.model.load_state_dict(st.get("ema") or st["model"])
            set_rng_state(st["rng"])
            self.start_epoch = st["epoch"]
            self.saved_through = self.last_finished = self.start_epoch - 1
            best = st.get("best") or {"epoch": st.get("best_epoch", -1), "acc": st["best_acc"]}  # format 1
            is_last = best["epoch"] == self.saved_through
            self.best = Best(best["epoch"], best["acc"], best.get("model") or (st["model"] if is_last else None),
                             best.get("ema") or (st.get("ema") if is_last else None))
            self.timing = Timing(**st.get("timing", {}))
        elif self.init_state is not None:
            check_compatible(s.model.state_dict(), self.init_state["model"], Path(self.cfg.init_from))
            s.model.load_state_dict(self.init_state["model"])
            if s.ema is not None:
                s.ema.model.load_state_dict(s.model.state_dict())

    @property
    def resolved(self) -> dict:
        s, ds, ws = self.session, self.dataset, self.info.world_size
        return {**self.res.to_dict(), "device_name": self.device_name, "world_size": ws,
                "global_batch_size": self.cfg.batch_size * ws, "steps_per_epoch": len(s.train_loader),
                "trained_images_per_epoch": self.trained_images,
                "dropped_last_batch_images": len(ds.train_labels) - self.trained_images,
                "dataset": ds.description, "train_images": len(ds.train_labels), "test_images": len(ds.test_labels),
                "train_flops_per_image": self.flops_per_image, "peak_tflops": self.peak, "torch": torch.__version__,
                "fastcifar": __version__, "scheduler_interval": "step", "save_every": self._save_every_text()}

    def _config_doc(self) -> dict:
        return {"config": self.cfg.to_dict(), "resolved": self.resolved}

    def _save_every_text(self) -> str:
        if self.cfg.save_every:
            return f"every {self.cfg.save_every} epoch(s) and the last"
        if self.res.device.type == "cuda":
            return f"auto: when saving costs <= {SAVE_SHARE:.0%} of the training time since the last save"
        return "auto: every epoch (CPU)"

    def _prepare_directory(self, s: Session) -> None:
        if self.resume_state is None:
            self.dir.create()
            self.dir.lock()
            if self.dir.holds_run():  # another process got here between our check and our lock
                raise FastCifarError(f"{self.dir.path} already holds a run: use --resume or another --run-dir.")
        for path in remove_stale_temp_files(self.dir.path):
            self.notice(f"note: removed {path.name}, left by a save that was interrupted")
        if self.resume_state is None:
            self.dir.write_json("config.json", self._config_doc())
            return
        for name in JSONL_FILES:  # a crash may have left rows of epochs after the checkpoint, or a torn line
            self.dir.truncate_jsonl(name, lambda r: r.get("epoch", -1) < self.start_epoch)
        self._repair_best()
        saved = self.dir.read_json("config.json")
        planned = saved["config"]["epochs"]
        if planned != self.cfg.epochs:
            steps = len(s.train_loader)
            lr_then, lr_now = s.schedule.lr_at([self.start_epoch * steps])[0], s.schedule.lr_at([0])[0]
            self.notice(f"extending the run from {planned} to {self.cfg.epochs} epochs: the LR schedule is the one "
                        f"planned for {self.cfg.epochs} epochs, so epoch {self.start_epoch} continues at "
                        f"lr {lr_then:.3g} (peak {lr_now:.3g}), where a {self.cfg.epochs}-epoch run would be")
            history = saved.get("extended", []) + [{"from_epochs": planned, "to_epochs": self.cfg.epochs,
                                                    "at_epoch": self.start_epoch, "lr_at_epoch": lr_then}]
            self.dir.write_json("config.json", {**saved, "config": self.cfg.to_dict(), "extended": history})

    def _repair_best(self) -> None:
        """After a kill between writing last.pt and best.pt, best.pt can hold another epoch than the best one
        last.pt records; last.pt carries the best weights, so best.pt is rewritten from it."""
        if self.best.model is None:
            return
        path = self.dir.file("best.pt")
        try:
            held = load_checkpoint(path).get("epoch") if path.exists() else None
        except FastCifarError:
            held = "damaged"
        if held != self.best.epoch:
            self._write_best()
            self.notice(f"note: repaired best.pt: it held {'nothing' if held is None else f'epoch {held}'}, "
                        f"last.pt records epoch {self.best.epoch} as the best")
        self.best_written = self.best.epoch

    def _header(self, s: Session) -> None:
        cfg, ds = self.cfg, self.dataset
        print(f"fastcifar {__version__} — run directory {self.dir.path}")
        print(f"data: {ds.description}")
        dropped = len(ds.train_labels) - self.trained_images
        print(f"training on {self.trained_images:,} of {len(ds.train_labels):,} images per epoch "
              f"({len(s.train_loader)} steps of {cfg.batch_size}" + (f" x {self.info.world_size} processes" if
                                                                     self.info.enabled else "") +
              (f"; the last {dropped} are dropped: only full batches, so shapes stay static)" if dropped else ")"))
        if dropped > DROP_WARNING * len(ds.train_labels):
            print(f"warning: {dropped / len(ds.train_labels):.1%} of the training set is dropped every epoch: pick "
                  f"--batch-size or --train-subset so that one divides the other more closely")
        for notice in self.res.notices:
            print(notice)
        print(wrapped("config", cfg.to_dict()))
        print(wrapped("resolved", self.resolved))
        print(f"active: {self.res.device.type} {self.active}")
        if self.resume_state is not None:
            print(f"resuming at epoch {self.start_epoch} ({self.start_epoch} of {cfg.epochs} done; best test acc so "
                  f"far {100 * self.best.acc:.2f}%)")
        elif self.init_state is not None:
            print(f"starting from the weights of {cfg.init_from} (optimizer, schedule and epochs start afresh)")
        print(legend(cfg.tta == "flip"))

    def notice(self, text: str) -> None:
        if self.info.is_main:
            print(text, flush=True)

    # --- the epoch loop's side -----------------------------------------------------------------------------
    def epochs(self):
        end = self.cfg.epochs if self.stop_after_epoch is None else min(self.cfg.epochs, self.stop_after_epoch)
        self.loop_end = end
        return range(self.start_epoch, end)

    def clock(self) -> EpochClock:
        return EpochClock(self.session.sync)

    def progress(self, epoch: int):
        return make_progress(self.cfg, self.info, len(self.session.train_loader) * self.cfg.batch_size, epoch)

    @property
    def stopped_by(self) -> str | None:
        if self.stop.signum is not None:
            return signal.Signals(self.stop.signum).name
        return "a signal on another rank" if self.remote_stop else None

    def _abandon_now(self) -> bool:
        """At a step boundary after a signal: abandon the epoch only when every finished epoch is saved (else
        finish it, seconds on a GPU, and save); under DDP always finish it, so the ranks stop together."""
        return self.stop.signum is not None and not self.info.enabled and self.saved_through == self.last_finished

    def _wall(self) -> float:
        return self.timing.wall_s + time.perf_counter() - self.started

    def end_epoch(self, s: Session, epoch: int, train: dict, test: dict, clock: EpochClock) -> bool:
        """Record a finished epoch; returns True when the run stops after it."""
        cfg = self.cfg
        self.last_finished = epoch
        train_s, eval_s = clock.laps["train"], clock.laps["eval"]
        compile_s = train["compile_s"] + test["compile_s"]
        self.timing.train_s += train_s
        self.timing.compile_s += compile_s
        self.trained_since_save += train_s
        steps = len(s.train_loader)
        lr_start, lr_end = s.schedule.lr_at([epoch * steps, (epoch + 1) * steps - 1])
        ips = train["train_images"] / train_s
        row = {"epoch": epoch, **{k: train[k] for k in ("train_loss", "train_acc", "train_images")},
               **{k: v for k, v in test.items() if k != "compile_s"}, "lr": lr_start, "lr_end": lr_end,
               "train_time_s": train_s, "eval_time_s": eval_s, "epoch_time_s": train_s + eval_s,
               "compile_s": compile_s, "elapsed_train_s": self.timing.train_s, "elapsed_s": self._wall(),
               "train_images_per_s": ips,
               **flops.throughput(ips, self.flops_per_image, self.res.device.type, self.peak, self.info.world_size),
               "flags": train["flags"], "active": self.active}
        acc = headline(cfg.tta, row)
        row["first_reached"] = newly_reached(acc, self.best.acc, ACCURACY_MILESTONES)
        if acc > self.best.acc:
            self.best = Best(epoch, acc, _clone(s.model.state_dict()),
                             _clone(s.ema.model.state_dict()) if s.ema else None)
        signalled = dist.any_rank(self.stop.signum is not None, self.info, self.res.device)
        target = cfg.target_acc is not None and acc >= cfg.target_acc
        if target:
            self.target_epoch = epoch
        stop = signalled or target
        due = stop or epoch == self.loop_end - 1 or self._save_due(epoch)
        if self.info.is_main:
            self._record(s, epoch, row, train)
            if due:
                row["checkpoint_time_s"] = self._save(s, epoch)
            print(epoch_line(cfg, row), flush=True)
        dist.barrier(self.info)
        if signalled:
            self.remote_stop = self.stop.signum is None
        return stop

    def _record(self, s: Session, epoch: int, row: dict, train: dict) -> None:
        """Monitor rows and per-step losses first, the epoch's row last: a crash in between leaves rows that a
        resume truncates, never an epoch row without its details."""
        steps = len(s.train_loader)
        grad_rms = None
        if s.monitor is not None:
            for sample in train["samples"]:
                grads = s.monitor.rows("grad", {k: sample[k] for k in ("mean_abs", "max_abs", "norm")}, epoch=epoch,
                                       step=sample["step"])
                updates = s.monitor.rows("update", {"ratio": sample["ratio"]}, scope="step", epoch=epoch,
                                         step=sample["step"], lr=sample["lr"])
                self.sink.layer_sample(grads, updates)
            if train["samples"]:
                grad_rms = [statistics.fmean(sample["norm"][i] / math.sqrt(n) for sample in train["samples"])
                            for i, n in enumerate(s.monitor.layer_numel)]
            epoch_lr = statistics.fmean(s.schedule.lr_at(range(epoch * steps, (epoch + 1) * steps)))
            self.sink.layer_epoch(epoch, s.monitor.rows("update", {"ratio": train["update_ratio_epoch"]}, scope="epoch",
                                                        epoch=epoch, step=(epoch + 1) * steps, lr=epoch_lr), grad_rms)
        lrs = s.schedule.lr_at(range(epoch * steps, (epoch + 1) * steps))
        self.sink.steps([{"epoch": epoch, "step": epoch * steps + i, "loss": loss, "lr": lr}
                         for i, (loss, lr) in enumerate(zip(train["step_losses"], lrs))])
        self.sink.epoch(row)

    def _save_due(self, epoch: int) -> bool:
        if self.cfg.save_every:
            return (epoch + 1) % self.cfg.save_every == 0
        if self.res.device.type != "cuda" or self.last_save_s is None:
            return True
        return self.last_save_s <= SAVE_SHARE * self.trained_since_save

    def _state(self, s: Session, epoch: int) -> dict:
        best = {"epoch": self.best.epoch, "acc": self.best.acc}
        if self.best.epoch != epoch:  # last.pt is self-contained: it can always rebuild best.pt
            best.update(model=self.best.model, ema=self.best.ema)
        return {"format": CHECKPOINT_FORMAT, "epoch": epoch + 1, "model": s.model.state_dict(),
                "optimizer": s.optimizer.state_dict(), "schedule": s.schedule.state_dict(),
                "scaler": s.scaler.state_dict(), "ema": s.ema.model.state_dict() if s.ema else None,
                "rng": rng_state(), "config": self.cfg.to_dict(), "classes": list(self.dataset.classes),
                "best": best, "best_acc": self.best.acc, "best_epoch": self.best.epoch,
                "timing": {**vars(self.timing), "wall_s": self._wall()}}

    def _write_best(self) -> None:
        save_checkpoint(self.dir.file("best.pt"), {
            "format": CHECKPOINT_FORMAT, "kind": "best weights", "epoch": self.best.epoch,
            "test_acc": self.best.acc, "headline": "flip TTA" if self.cfg.tta == "flip" else "no TTA",
            "model": self.best.model, "ema": self.best.ema, "config": self.cfg.to_dict(),
            "classes": list(self.dataset.classes)})

    def _save(self, s: Session, epoch: int) -> float:
        start = time.perf_counter()
        save_checkpoint(self.dir.file("last.pt"), self._state(s, epoch))
        self.saved_through = epoch
        if self.best.epoch != self.best_written:
            self._write_best()
            self.best_written = self.best.epoch
        seconds = time.perf_counter() - start
        self.timing.checkpoint_s += seconds
        self.timing.checkpoints += 1
        self.last_save_s, self.trained_since_save = seconds, 0.0
        return seconds

    # --- close ---------------------------------------------------------------------------------------------
    def close(self, s: Session) -> dict:
        if not self.info.is_main:
            return {}
        rows = self.dir.read_jsonl("metrics.jsonl")
        if not rows:
            print(f"stopped by {self.stopped_by or 'a signal'} before the first epoch finished: nothing was saved; "
                  f"start again.", file=sys.stderr)
            self.tracker.finish(exit_code=1)
            return {"finished": False, "epochs_done": 0, "exit_code": 128 + (self.stop.signum or signal.SIGINT)}
        summary = self._summary(rows)
        self.sink.summary(summary)
        finished = summary["finished"]
        print()
        print(f"{'Results' if finished else 'Stopped early: results so far'} — {self.dataset.description}")
        print(summary_table(summary))
        if self.target_epoch is not None:
            print(f"target test accuracy {100 * self.cfg.target_acc:g}% reached at epoch {self.target_epoch}: "
                  f"stopped")
        if self.stopped_by:
            print(f"stopped by {self.stopped_by}: epochs 0-{self.saved_through} are saved in {self.dir.file('last.pt')}")
        if not finished and self.saved_through >= 0:
            print(f"continue with: fastcifar train --resume {self.dir.path}")
        if self.cfg.report:
            from fastcifar.report import make_report

            plots = make_report(self.dir.path)
            print(f"plots: {', '.join(str(p) for p in plots)}")
            self.tracker.log_images(plots)
        self.tracker.finish()
        if self.stopped_by:
            summary["exit_code"] = 128 + (self.stop.signum or signal.SIGINT)
        return summary

    def _summary(self, rows: list[dict]) -> dict:
        cfg = self.cfg
        summary = {"run_dir": str(self.dir.path), "recipe": cfg.recipe, "dataset": self.dataset.description,
                   **summarise(rows, tta=cfg.tta, epochs=cfg.epochs, target_acc=cfg.target_acc,
                               milestones=ACCURACY_MILESTONES),
                   "checkpoint_time_s": self.timing.checkpoint_s, "checkpoints": self.timing.checkpoints,
                   "total_wall_s": self._wall(), "train_wall_s": self.timing.train_s, "stopped_by": self.stopped_by,
                   "device_name": self.device_name, "active": self.active,
                   "train_flops_per_image": self.flops_per_image,
                   "last_pt": str(self.dir.file("last.pt")) if self.saved_through >= 0 else None,
                   "best_pt": str(self.dir.file("best.pt")) if self.best_written >= 0 else None}
        perf = flops.throughput(summary["mean_train_images_per_s"], self.flops_per_image, self.res.device.type,
                                self.peak, self.info.world_size)
        return {**summary, **{f"mean_{k}": v for k, v in perf.items()}}

    # --- the context: whatever ends the run, say what was kept and how to continue ---------------------------
    def __enter__(self) -> TrainingRun:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.stop.restore()
        if exc is not None and self.tracker is not None:
            self.tracker.finish(exit_code=1)
        self.dir.unlock()
        if exc is None or not self.info.is_main:
            return
        saved = self.dir.file("last.pt").exists() and (self.resume_state is not None or self.saved_through >= 0)
        resume = f"fastcifar train --resume {self.dir.path}"
        kept = (f"The last good checkpoint is {self.dir.file('last.pt')} ({self.saved_through + 1} epoch(s) done)"
                if saved else "No epoch was saved yet")
        if isinstance(exc, TrainingDiverged):
            raise TrainingDiverged(f"{exc} {kept}: lower --lr, or try --amp off, then "
                                   + (f"--resume it ({resume}) or start again." if saved else "start again.")) from None
        if isinstance(exc, NoSpace):
            raise FastCifarError(f"{exc}. {kept}, intact" + (f". Free some space, then continue with: {resume}" if saved
                                                              else ". Free some space and start again.")) from None
        if isinstance(exc, KeyboardInterrupt):
            signum = exc.args[0] if exc.args and isinstance(exc.args[0], int) else signal.SIGINT
            raise RunInterrupted(f"interrupted by {signal.Signals(signum).name}. {kept}"
                                 + (f"; continue with: {resume}" if saved else "."), signum) from None
