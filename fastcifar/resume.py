"""The resume path of a training run: what continues a run rather than starting one.

  --resume DIR         rank 0 reads and verifies last.pt and sends it to the other ranks (nodes need no shared disk)
  --resume-if-exists   the same command continues from last.pt when torchrun restarts the job; another
                       configuration's run is refused, naming the flags that differ
  restore              model, optimizer, schedule, scaler, RNG, epoch counters and timings from the checkpoint;
                       or, for --init-from, only a checkpoint's model weights
  continue the folder  rows of epochs after the checkpoint dropped, best.pt repaired, --epochs extended or shortened

`ResumePath` is the part of `TrainingRun` (run.py) that does this; it reads and writes the run's own state (dir, cfg,
best, timing, the epoch counters) and nothing else.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from fastcifar import FastCifarError
from fastcifar.checkpoint import Best, check_compatible, load_checkpoint, restore
from fastcifar.config import RECIPES, differing_flags, recipe_warmup
from fastcifar.console import shell_command
from fastcifar.summary import headline
from fastcifar.tracking import JSONL_FILES

if TYPE_CHECKING:
    from fastcifar.session import Session


class ResumePath:
    """TrainingRun's resume path (a base class of it; see the module docstring)."""

    def _saved_run_to_continue(self) -> tuple[str | None, float | None]:
        """--resume-if-exists, on rank 0: ("last.pt", warm-up) when the run directory holds this configuration's
        run to continue; (None, None) when it holds none, or one that saved no epoch yet (a fresh start there
        clears it). The warm-up is the saved run's when the command's differs only as a recipe's share of a
        changed --epochs (as --resume keeps it), else None."""
        if not self.dir.holds_run():
            return None, None
        try:
            document = self.dir.read_json("config.json")
            saved = document["config"]
        except (FastCifarError, KeyError, TypeError):
            raise FastCifarError(f"--resume-if-exists: {self.dir.path} holds a run without a readable config.json: "
                                 f"it cannot be checked against this command; choose another --run-dir.") from None
        warmup = self._saved_recipe_warmup(saved, document.get("extended") or [])
        differ = differing_flags(saved, self.cfg if warmup is None else replace(self.cfg, warmup_epochs=warmup))
        if differ:
            raise FastCifarError(f"--resume-if-exists: {self.dir.path} holds a run of another configuration; these "
                                 f"flags differ from its config.json: {', '.join(differ)}.")
        return ("last.pt", warmup) if self.dir.file("last.pt").is_file() else (None, None)

    def _saved_recipe_warmup(self, saved: dict, extended: list) -> float | None:
        """A recipe's warm-up follows --epochs (config.recipe_warmup): a restarted command with another --epochs
        computes another one. Where the run's is the share of the --epochs it started with (an extension keeps it,
        so later restarts of the same command meet it again) and the command's is the share of its own --epochs,
        the run keeps its own, as `--resume --epochs` does."""
        cfg, recipe, warmup = self.cfg, saved.get("recipe"), saved.get("warmup_epochs")
        if recipe != cfg.recipe or recipe not in RECIPES or warmup == cfg.warmup_epochs:
            return None
        started_with = extended[0].get("from_epochs") if extended else saved.get("epochs")
        if started_with and warmup == recipe_warmup(recipe, started_with) and \
                cfg.warmup_epochs == recipe_warmup(recipe, cfg.epochs):
            return warmup
        return None

    def _open_resume(self) -> None:
        """Rank 0 reads last.pt and sends it to the others: nodes need not share the run directory."""
        self.info.doing = "waiting for rank 0 to read last.pt and send it"
        self.resume_state = self._on_main(self._read_last)

    def _read_last(self) -> dict:
        last = self.dir.file("last.pt")
        if not last.is_file():
            saved = self.dir.saved()
            if not saved:
                raise FastCifarError(
                    f"cannot resume {self.dir.path}: no epoch was saved there (its run stopped before its first "
                    f"checkpoint), so there is nothing to continue and nothing to lose: run the command that started "
                    f"it again, without --resume (its flags are in {shell_command(self.dir.file('config.json'))})"
                    + ("" if self.cfg.run_dir else f" and with --run-dir {shell_command(self.dir.path)}")
                    + ": it restarts there.")
            try:
                finished = len(self.dir.read_jsonl("metrics.jsonl"))
            except FastCifarError:
                finished = 0
            records = f", though its metrics.jsonl records {finished} finished epoch(s)" if finished else ""
            raise FastCifarError(f"cannot resume {self.dir.path}: its last.pt (the resume state, saved after "
                                 f"finished epochs) is missing{records}; it holds {', '.join(saved)}."
                                 + (self._init_from_best() or " No checkpoint survives there: start a new run."))
        try:
            state = load_checkpoint(last)
        except FastCifarError as exc:
            good = self._intact_best()
            raise FastCifarError(f"{exc} It cannot be resumed." + (
                f" {good} is intact: `{shell_command('fastcifar', 'train', '--init-from', good)}` starts a new run "
                f"from its weights." if good else "")) from None
        done = state["epoch"]
        if done >= self.cfg.epochs:
            raise FastCifarError(f"{self.dir.path} already finished all {done} epochs: nothing to resume (pass "
                                 f"--epochs N with N > {done} to train it further).")
        # Read before locking, so that refusing a finished run changes nothing on disk; saves are atomic renames, so
        # what was read is a whole checkpoint even if another process holds the directory (the lock then says so).
        self.dir.lock()
        return state

    def _intact_best(self) -> Path | None:
        try:
            load_checkpoint(self.dir.file("best.pt"))
            return self.dir.file("best.pt")
        except FastCifarError:
            return None

    def _init_from_best(self) -> str:
        best = self.dir.file("best.pt")
        try:
            epoch = load_checkpoint(best).get("epoch")
        except FastCifarError:
            return ""
        return (f" Its best.pt (epoch {epoch}) is intact: `{shell_command('fastcifar', 'train', '--init-from', best)}`"
                f" starts a new run from its weights.")

    def _restore(self, s: Session) -> None:
        if self.resume_state is not None:
            self.start_epoch, self.best, self.timing = restore(s, self.resume_state, self.dir.file("last.pt"),
                                                               self.info.world_size)
            self.saved_through = self.last_finished = self.start_epoch - 1
            if self.info.is_main:  # the others cannot look at the run directory
                self.timing.count_the_last_save([self.dir.file("last.pt"), self.dir.file("best.pt")])
        elif self.init_state is not None:
            check_compatible(s.model.state_dict(), self.init_state["model"], Path(self.cfg.init_from))
            s.model.load_state_dict(self.init_state["model"])
            if s.ema is not None:
                s.ema.model.load_state_dict(s.model.state_dict())

    def _continue_directory(self, s: Session) -> None:
        """On resume, after the lock: rows of unsaved epochs dropped, best.pt repaired, an --epochs change recorded."""
        for name in JSONL_FILES:  # a crash may have left rows of epochs after the checkpoint, or a torn line
            self.dir.truncate_jsonl(name, lambda r: r.get("epoch", -1) < self.start_epoch)
        self.max_test_acc = max((headline(self.cfg.tta, r) for r in self.dir.read_jsonl("metrics.jsonl")),
                                default=-1.0)
        self._repair_best()
        saved = self.dir.read_json("config.json")
        planned = saved["config"]["epochs"]
        if planned != self.cfg.epochs:
            steps = len(s.train_loader)
            lr_then, lr_now = s.schedule.lr_at([self.start_epoch * steps])[0], s.schedule.peak
            change = "extending" if self.cfg.epochs > planned else "shortening"
            self.notice(f"{change} the run from {planned} to {self.cfg.epochs} epochs: the LR schedule is the one "
                        f"planned for {self.cfg.epochs} epochs, so epoch {self.start_epoch} continues at "
                        f"lr {lr_then:.3g} (peak {lr_now:.3g}), where a {self.cfg.epochs}-epoch run would be")
            history = saved.get("extended", []) + [{"from_epochs": planned, "to_epochs": self.cfg.epochs,
                                                    "at_epoch": self.start_epoch, "lr_at_epoch": lr_then}]
            self.dir.write_json("config.json", {**saved, "config": self.cfg.to_dict(), "extended": history})

    def _repair_best(self) -> None:
        """After a kill between writing last.pt and best.pt, best.pt can hold another epoch than the best one
        last.pt records; last.pt carries the best weights, so best.pt is rewritten from it. A last.pt of format 1
        did not carry them when the best epoch was an earlier one: then best.pt is their only copy, kept as it is
        and read back so that later checkpoints carry them."""
        path = self.dir.file("best.pt")
        if self.best.model is None:
            if self.best.epoch >= 0:
                try:
                    held = load_checkpoint(path) if path.exists() else {}
                except FastCifarError:
                    held = {}
                if held.get("epoch") == self.best.epoch and held.get("model") is not None:
                    self.best = Best(self.best.epoch, self.best.acc, held["model"], held.get("ema"))
                else:
                    self.notice(f"warning: the weights of the best epoch ({self.best.epoch}) are in neither last.pt "
                                f"nor best.pt; best.pt is left as it is")
                self.best_written = self.best.epoch  # never overwrite best.pt with no weights
            return
        try:
            held = load_checkpoint(path).get("epoch") if path.exists() else None
        except FastCifarError:
            held = "damaged"
        if held != self.best.epoch:
            self._write_best()
            self.notice(f"note: repaired best.pt: it held {'nothing' if held is None else f'epoch {held}'}, "
                        f"last.pt records epoch {self.best.epoch} as the best")
        self.best_written = self.best.epoch
