"""A training run's life around the epoch loop of train.fit():

  open   checks and data, nothing written: config resolved, resume checkpoint verified, sizes checked
  start  the run directory and its lock, the restored state, the header, W&B
  epoch  the record of a finished epoch: its row, monitor rows, checkpoint (when due), the epoch line
  close  summary.json, the results table, the plots

and what ends a run early: SIGINT/SIGTERM/SIGHUP (stop at a step boundary, or finish the epoch when finished
epochs are not all saved yet; a second signal exits at once), --target-acc, --stop-after-epoch, divergence, a full
disk or a run file that cannot be written. Whatever ends it, every finished epoch that was saved stays, and the
message says how to continue; where no epoch was saved, nothing is lost and the same command restarts there.
What continues a run instead of starting one (--resume, --resume-if-exists, --init-from) is in resume.py.
"""

from __future__ import annotations

import math
import signal
import statistics
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fastcifar import FastCifarError, TrainingDiverged, __version__
from fastcifar import distributed as dist
from fastcifar import flops
from fastcifar.checkpoint import Best, Timing, best_weights, input_spec, load_checkpoint, resume_state, save_checkpoint
from fastcifar.config import RECIPES, TrainConfig, resolve
from fastcifar.console import WIDTH, device_line, epoch_line, header, make_progress, shell_command, summary_table
from fastcifar.data.cifar import hold_out_validation, load_dataset
from fastcifar.files import CannotWrite, NoSpace, refresh_umask, remove_stale_temp_files
from fastcifar.progress import EpochProgress
from fastcifar.resume import ResumePath
from fastcifar.signals import GracefulStop, RunInterrupted
from fastcifar.summary import ACCURACY_MILESTONES, headline, newly_reached, selection_acc, summarise
from fastcifar.tracking import MetricsSink, RunDir, WandbTracker, default_run_dir

if TYPE_CHECKING:
    from fastcifar.session import Session

# A fresh optimizer at the recipe's full LR knocks a trained model back (measured: Adam 1e-3 took a 44.6 % model
# to 22.4 % in its first epoch); a tenth of the LR with a short warm-up keeps what it learned.
INIT_FROM_ADVICE = ("note: at the recipe's full LR the first epochs undo much of what those weights learned; to "
                    "fine-tune, pass about a tenth of it (--lr) and --warmup-epochs 1")
SAVE_SHARE = 0.05  # --save-every auto on CUDA: saving may cost at most this share of the training time


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


class TrainingRun(ResumePath):
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
        self.max_test_acc = -1.0  # the best headline test accuracy so far: milestones (the best epoch may differ)
        self.trained_since_save, self.last_save_s = 0.0, None
        self.stop, self.remote_stop, self.target_epoch = GracefulStop(), False, None
        self.tracker: WandbTracker | None = None
        self.group: str | None = None  # the W&B group of a --seeds run (seeds.py)
        self.sink: MetricsSink | None = None
        self.started = time.perf_counter()
        self.last_eval_s: float | None = None  # the last epoch's evaluation time: the progress lines' estimate

    # --- open: every check that can fail, nothing written ------------------------------------------------
    @classmethod
    def open(cls, cfg: TrainConfig, info: dist.DistInfo, *, resume_dir=None, init_from=None,
             stop_after_epoch: int | None = None, dataset=None, resume_if_exists: bool = False) -> TrainingRun:
        """`dataset`: one already loaded for this config (the seeds of a --seeds run share it).
        `resume_if_exists`: continue from the run directory's last.pt when it has one (torchrun's restart)."""
        path = Path(resume_dir) if resume_dir else Path(cfg.run_dir or default_run_dir(cfg.recipe))
        run = cls(cfg, info, dist.broadcast_object(path, info), stop_after_epoch)
        run.default_dir = resume_dir is None and not cfg.run_dir  # a fresh name is claimed when it is created
        run.res = resolve(cfg, info.local_rank, info.world_size)
        refresh_umask()  # read once, here, before any other thread (W&B, loader workers) exists
        try:
            run._on_main(run.dir.check_usable)  # first: a live process there is named, whatever the folder holds
            info.doing = "waiting for rank 0 to check the run directory"
            if resume_if_exists:
                found, warmup = run._on_main(run._saved_run_to_continue)
                if found == "last.pt":
                    resume_dir = run.dir.path
                if warmup is not None:  # the run's own warm-up, not the share of the new --epochs
                    run.cfg = cfg = replace(cfg, warmup_epochs=warmup)
                    run.res = resolve(cfg, info.local_rank, info.world_size)
            if resume_dir is not None:
                run._open_resume()
            else:
                run._on_main(run._refuse_a_used_directory)
            if init_from:
                run.init_state = load_checkpoint(Path(init_from))
            def load():
                run.dataset = hold_out_validation(load_dataset(cfg.dataset, cfg.data_dir, cfg.download,
                                                               cfg.train_subset, cfg.test_subset,
                                                               cfg.synthetic_size, cfg.seed), cfg.val_split, cfg.seed)

            run.dataset = dataset
            info.doing = "loading the data (rank 0 first)"
            if dataset is None:
                run._on_main(load)  # rank 0 first: a missing CIFAR-10 is downloaded once, not by every rank at once
            if run.dataset is None:
                load()
            run._check_sizes()
            run._dataset_notices()
        except BaseException:
            run.dir.unlock()
            raise
        return run

    def _on_main(self, action):
        """Run `action` on rank 0 and return its result on every rank (sent by broadcast: the other ranks need no
        access to the run directory); an error there stops every rank with its message (the others would
        otherwise wait forever in the next collective)."""
        error = result = None
        if self.info.is_main:
            try:
                result = action()
            except Exception as exc:  # any failure on rank 0 (an OSError too) must reach the ranks waiting on it
                error = exc
        message, result = dist.broadcast_object((str(error) if error is not None else None, result), self.info)
        if error is not None:
            raise error
        if message is not None:
            raise FastCifarError(message)
        return result

    def _refuse_a_used_directory(self) -> None:
        """A folder holding a saved epoch (or a finished run's record) is refused; one whose run saved nothing is
        restarted (start() clears it)."""
        if self.default_dir:
            return
        saved = self.dir.saved()
        if "last.pt" in saved:
            raise FastCifarError(f"{self.dir.path} already holds a run ({', '.join(self.dir.holds_run())}): continue "
                                 f"it with `{shell_command('fastcifar', 'train', '--resume', self.dir.path)}`, or "
                                 f"choose another --run-dir.")
        foreign = self.dir.foreign()
        if foreign:  # never remove what another program wrote
            raise FastCifarError(f"{self.dir.path} holds {', '.join(foreign)} that no fastcifar run wrote: a run there "
                                 f"would replace it: choose another --run-dir.")
        if saved:
            raise FastCifarError(f"{self.dir.path} holds a run's {' and '.join(saved)} but no last.pt: it cannot "
                                 f"be resumed, and a new run there would replace that record: choose another "
                                 f"--run-dir.{self._init_from_best()}")

    def _restart_hint(self, change: str = "") -> str:
        """Where no epoch was saved: nothing is lost, and the same command restarts in this folder."""
        where = shell_command(self.dir.path)
        if self.group is not None and not change:  # a seed of a --seeds group: the group continues, this seed restarts
            group = shell_command("fastcifar", "train", "--resume", self.dir.path.parent)
            return f"continue the group with `{group}`: this seed restarts in {where}"
        if self.cfg.run_dir:
            return f"run the same command again{change}: it restarts in {where}"
        return f"run the same command again{change} {'and' if change else 'with'} --run-dir {where}: it restarts there"

    def _dataset_notices(self) -> None:
        ds = self.dataset
        if self.cfg.dataset == "cifar100":
            self.res.notices.append(f"note: CIFAR-100 ({len(ds.classes)} classes): normalised with its own mean "
                                    f"{', '.join(f'{m:.4f}' for m in ds.mean)} and std "
                                    f"{', '.join(f'{s:.4f}' for s in ds.std)}")
            self.res.notices.append(f"note: the {self.cfg.recipe} recipe's settings are CIFAR-10's (chosen and "
                                    f"measured there), not tuned for CIFAR-100")

    def _check_sizes(self) -> None:
        cfg, ds, ws = self.cfg, self.dataset, self.info.world_size
        n = len(ds.train_labels)
        steps = (n // ws) // cfg.batch_size
        if steps == 0:
            raise FastCifarError(f"the training set has {n} images ({n // ws} per process), fewer than one batch "
                                 f"of {cfg.batch_size}: lower --batch-size or raise --train-subset.")
        if cfg.limit_steps:
            steps = min(steps, cfg.limit_steps)
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
            ("sync-bn", self.cfg.sync_bn and self.info.enabled), (f"ema {self.cfg.ema}", bool(self.cfg.ema)),
            ("tta flip", self.cfg.tta == "flip")] if on)
        self.info.doing = "waiting for rank 0 to prepare the run directory"
        self._on_main(lambda: self._prepare_directory(s))
        if self.info.is_main:
            previous = self.dir.read_json("config.json") if self.resume_state else {}
            self.tracker = WandbTracker(self.cfg.wandb, self.cfg.wandb_project, self.dir.path,
                                        {**self.cfg.to_dict(), "resolved": self.resolved}, self.dir.path.name,
                                        resume_id=previous.get("wandb_run_id"), group=self.group)
            if self.tracker.run_id and not self.resume_state:
                self.dir.write_json("config.json", {**self._config_doc(), "wandb_run_id": self.tracker.run_id})
            self.tracker.set_summary({"flops/train_per_image": self.flops_per_image,
                                      "flops/forward_per_image": flops.forward_flops_per_image(
                                          num_classes=len(self.dataset.classes))})
            self.sink = MetricsSink(self.dir, self.tracker)
            self._header(s)  # after W&B: its own lines come before the header, not between legend and epoch 0
        self.stop.install()
        s.stop_requested = self._abandon_now
        sys.stdout.flush()

    @property
    def resolved(self) -> dict:
        s, ds, ws = self.session, self.dataset, self.info.world_size
        return {**self.res.to_dict(), "device_name": self.device_name, "world_size": ws,
                "global_batch_size": self.cfg.batch_size * ws, "steps_per_epoch": len(s.train_loader),
                "trained_images_per_epoch": self.trained_images,
                "dropped_last_batch_images": len(ds.train_labels) - self.trained_images,
                "dataset": ds.description, "train_images": len(ds.train_labels), "test_images": len(ds.test_labels),
                "classes": len(ds.classes), "normalize_mean": list(ds.mean), "normalize_std": list(ds.std),
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
            if self.default_dir:
                self.dir.claim_new()
            self.dir.create()
            self.dir.lock()
            self._refuse_a_used_directory()  # again: another process may have saved there before our lock
            left = self.dir.clear_unsaved()
            if left:
                self.notice(f"restarting in {self.dir.path}: the run started there saved no epoch (killed, stopped "
                            f"or out of disk before its first checkpoint); removed what it left: {', '.join(left)}")
        for path in remove_stale_temp_files(self.dir.path):
            self.notice(f"note: removed {path.name}, left by a save that was interrupted")
        if self.resume_state is None:
            self.dir.write_json("config.json", self._config_doc())
            return
        self._continue_directory(s)

    def _header(self, s: Session) -> None:
        if self.resume_state is not None:
            start = (f"resuming at epoch {self.start_epoch} ({self.start_epoch} of {self.cfg.epochs} done; best "
                     f"{'validation' if self.cfg.val_split else 'test'} acc so far {100 * self.best.acc:.2f}%)")
        elif self.init_state is not None:
            start = f"starting from the weights of {self.cfg.init_from} (optimizer, schedule and epochs start afresh)"
            if self.cfg.lr >= RECIPES[self.cfg.recipe].get("lr", TrainConfig.lr):
                start += "\n" + INIT_FROM_ADVICE
        else:
            start = None
        print(header(self.cfg, self.dataset, run_dir=self.dir.path, steps=len(s.train_loader),
                     trained_images=self.trained_images, world_size=self.info.world_size, notices=self.res.notices,
                     resolved=self.res.to_dict(), active=f"{self.res.device.type} {self.active}", start=start,
                     device=device_line(self.cfg, self.res.device, self.device_name)))

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

    def progress(self, epoch: int) -> EpochProgress | None:
        if not self.info.is_main:
            return None
        s = self.session
        bar = make_progress(self.cfg, self.info, len(s.train_loader) * self.cfg.batch_size, epoch)
        # evaluation's share of a training step, by FLOPs: forward only, twice under flip TTA
        eval_flops = flops.forward_flops_per_image(num_classes=len(self.dataset.classes)) * \
            (2 if self.cfg.tta == "flip" else 1) * s.eval_loader.num_images
        interval = math.inf if self.cfg.progress == "off" else self.cfg.log_interval  # off: epoch lines only
        return EpochProgress(s, epoch=epoch, end_epoch=self.loop_end, bar=bar, interval=interval,
                             eval_per_step=eval_flops / (self.flops_per_image * self.cfg.batch_size),
                             last_eval_s=self.last_eval_s, estimate=epoch == self.start_epoch)

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
        self.last_eval_s = eval_s - test["compile_s"]
        compile_s = train["compile_s"] + test["compile_s"]
        self.timing.train_s += train_s
        self.timing.compile_s += compile_s
        self.trained_since_save += train_s
        steps = len(s.train_loader)
        lrs = s.schedule.lr_at(range(epoch * steps, (epoch + 1) * steps))  # host arithmetic, no sync
        lr_start, lr_end, lr_peak = lrs[0], lrs[-1], max(lrs)
        ips = train["train_images"] / train_s
        row = {"epoch": epoch, **{k: train[k] for k in ("train_loss", "train_acc", "train_images")},
               **{k: v for k, v in test.items() if k != "compile_s"}, "lr": lr_start, "lr_end": lr_end,
               "lr_peak": lr_peak,
               "train_time_s": train_s, "eval_time_s": eval_s, "epoch_time_s": train_s + eval_s,
               "compile_s": compile_s, "elapsed_train_s": self.timing.train_s, "elapsed_s": self._wall(),
               "train_images_per_s": ips,
               **flops.throughput(ips, self.flops_per_image, self.res.device.type, self.peak, self.info.world_size),
               "flags": train["flags"], "active": self.active}
        acc = headline(cfg.tta, row)
        row["first_reached"] = newly_reached(acc, self.max_test_acc, ACCURACY_MILESTONES)
        self.max_test_acc = max(self.max_test_acc, acc)
        chosen_by = selection_acc(cfg.tta, row)  # validation accuracy under --val-split, else the test's
        if chosen_by > self.best.acc:
            self.best = Best.of(s, epoch, chosen_by, test_acc=acc)
        self.info.doing = f"recording epoch {epoch}"
        signalled = dist.any_rank(self.stop.signum is not None, self.info, self.res.device)
        target = cfg.target_acc is not None and acc >= cfg.target_acc
        if target:
            self.target_epoch = epoch
        stop = signalled or target
        due = stop or epoch == self.loop_end - 1 or self._save_due(epoch)
        if self.info.is_main:
            self._record(s, epoch, row, train)
            if due:  # timed after the row is written (the row is the epoch's record; a crash between is safe)
                row["checkpoint_time_s"] = self._save(s, epoch)
                self.tracker.log({"epoch": epoch, "time/checkpoint_s": row["checkpoint_time_s"]})
            print(epoch_line(cfg, row), flush=True)
        else:
            self.info.doing = f"waiting for rank 0 to record epoch {epoch}" + (" and save it" if due else "")
        dist.barrier(self.info)
        if signalled:
            self.remote_stop = self.stop.signum is None
        return stop

    def _record(self, s: Session, epoch: int, row: dict, train: dict) -> None:
        """Monitor rows and per-step losses first, the epoch's row last: a crash in between leaves rows that a
        resume truncates, never an epoch row without its details."""
        steps = len(s.train_loader)
        lrs = s.schedule.lr_at(range(epoch * steps, (epoch + 1) * steps))
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
            epoch_lr = statistics.fmean(lrs)
            self.sink.layer_epoch(epoch, s.monitor.rows("update", {"ratio": train["update_ratio_epoch"]}, scope="epoch",
                                                        epoch=epoch, step=(epoch + 1) * steps, lr=epoch_lr), grad_rms)
        self.sink.steps([{"epoch": epoch, "step": epoch * steps + i, "loss": loss, "lr": lr}
                         for i, (loss, lr) in enumerate(zip(train["step_losses"], lrs))])
        self.sink.epoch(row)

    def _save_due(self, epoch: int) -> bool:
        if self.cfg.save_every:
            return (epoch + 1) % self.cfg.save_every == 0
        if self.res.device.type != "cuda" or self.last_save_s is None:
            return True
        return self.last_save_s <= SAVE_SHARE * self.trained_since_save

    def _write_best(self) -> None:
        if self.best.model is None:
            return
        save_checkpoint(self.dir.file("best.pt"), best_weights(
            self.best, headline="flip TTA" if self.cfg.tta == "flip" else "no TTA", config=self.cfg.to_dict(),
            classes=list(self.dataset.classes), on_validation=bool(self.cfg.val_split),
            input=input_spec(self.dataset.mean, self.dataset.std)))

    def _save(self, s: Session, epoch: int) -> float:
        start = time.perf_counter()
        timing = Timing(**{**vars(self.timing), "wall_s": self._wall(), "save_started_at": time.time()})
        save_checkpoint(self.dir.file("last.pt"), resume_state(
            s, epoch=epoch, best=self.best, timing=timing, config=self.cfg.to_dict(),
            classes=list(self.dataset.classes), world_size=self.info.world_size))
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
            print(f"stopped by {self.stopped_by or 'a signal'} before the first epoch finished: nothing was saved, "
                  f"so nothing is lost; {self._restart_hint()}.", file=sys.stderr)
            self.tracker.finish(exit_code=1)
            return {"finished": False, "epochs_done": 0, "exit_code": 128 + (self.stop.signum or signal.SIGINT)}
        summary = self._summary(rows)
        self.sink.summary(summary)
        finished = summary["finished"]
        print()
        quick = f" (quick check, --limit-steps {self.cfg.limit_steps})" if self.cfg.limit_steps else ""
        print(textwrap.fill(f"{'Results' if finished else 'Stopped early: results so far'}{quick} — "
                            f"{self.dataset.description}", WIDTH, subsequent_indent="    "))
        print(summary_table(summary))
        if summary.get("profile"):
            print(f"profile: {summary['profile']['table']} and {summary['profile']['trace']}")
        if self.target_epoch is not None:
            print(f"target test accuracy {100 * self.cfg.target_acc:g}% reached at epoch {self.target_epoch}: "
                  f"stopped")
        if self.stopped_by:
            saved = "epoch 0 is" if self.saved_through == 0 else f"epochs 0-{self.saved_through} are"
            print(f"stopped by {self.stopped_by}: {saved} saved in {self.dir.file('last.pt')}")
        if not finished and self.saved_through >= 0:
            print(f"continue with: {shell_command('fastcifar', 'train', '--resume', self.dir.path)}")
        if self.cfg.report:
            from fastcifar.report import make_report

            plots = make_report(self.dir.path)
            if plots:
                print(f"plots in {Path(plots[0]).parent}: {', '.join(Path(p).name for p in plots)}")
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
        profiler = getattr(self.session, "profiler", None)
        if profiler is not None:  # --profile: where the trace and table are (None: too few steps to profile)
            summary["profile"] = profiler.files
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
        resume = shell_command("fastcifar", "train", "--resume", self.dir.path)
        kept = (f"The last good checkpoint is {self.dir.file('last.pt')} ({self.saved_through + 1} epoch(s) done), "
                f"intact" if saved else "No epoch was saved yet, so nothing is lost")
        if isinstance(exc, TrainingDiverged):
            # only what applies to this run: --amp off where it trains in reduced precision
            options = f"a lower --lr (this run: {self.cfg.lr:g})" + (
                f" or --amp off (this run: {self.res.precision})" if self.res.amp_dtype is not None else "")
            raise TrainingDiverged(f"{exc} {kept}" + (
                f". Resuming would repeat the same steps: start again with {options}, in another --run-dir."
                if saved else f": {self._restart_hint(f' with {options}')}.")) from None
        if isinstance(exc, CannotWrite):
            fix = "free some space" if isinstance(exc, NoSpace) else "make it (and its folder) writable again"
            raise FastCifarError(f"{exc}. {kept}: {fix}, then " + (
                f"continue with: {resume}" if saved else f"{self._restart_hint()}.")) from None
        if isinstance(exc, OSError):  # the system refused something no check foresaw: one line, and what was kept
            where = f": {exc.filename}" if exc.filename else ""
            raise FastCifarError(f"{exc.strerror or exc}{where}. {kept}: fix that, then " + (
                f"continue with: {resume}" if saved else f"{self._restart_hint()}.")) from None
        if isinstance(exc, KeyboardInterrupt):
            signum = exc.args[0] if exc.args and isinstance(exc.args[0], int) else signal.SIGINT
            raise RunInterrupted(f"interrupted by {signal.Signals(signum).name}. {kept}"
                                 + (f"; continue with: {resume}" if saved else f"; {self._restart_hint()}."),
                                 signum) from None
