"""`fastcifar train --seeds 0,1,2`: one configuration trained once per seed, one seed after another in one process.

The model, the loaders, the compiled graphs and the CUDA graphs are built once and reset between seeds
(train.reset_session), so compilation is paid once; each seed's numbers equal what a separate `--seed K` run
gives (bit for bit on the CPU: tests/test_seeds.py). The group directory:

  GROUP/group.json      the planned seeds and the configuration (what `--resume GROUP` continues)
  GROUP/seed-K/         one ordinary run directory per seed: resume, eval and report work on it as on any run
  GROUP/summary.json    {"seeds", "runs": [{"seed", "run_dir", "summary"}], "stats": {metric: describe()}},
                        rewritten after every finished seed (stats over the seeds finished so far)

Interrupted, the finished seeds stay; `fastcifar train --resume GROUP` continues the seed that was running from
its last.pt and then trains the rest.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from fastcifar import FastCifarError
from fastcifar import distributed as dist
from fastcifar.config import RESUMABLE, TrainConfig
from fastcifar.stats import describe, format_stat
from fastcifar.summary import ACCURACY_MILESTONES
from fastcifar.tracking import RunDir

GROUP_FILE = "group.json"
# Flags that may change when a group is resumed (a subset of cli.RESUMABLE: nothing that changes what a seed
# trains, so the finished seeds and the resumed ones stay comparable).
# A group may change what a single run may on resume, but not its length or target: every seed must train alike.
GROUP_RESUMABLE = RESUMABLE - {"epochs", "target_acc"}


def parse_seeds(text: str) -> list[int]:
    """`0,1,2` -> [0, 1, 2]; `5` -> [0, 1, 2, 3, 4]; `7,` -> [7]."""
    try:
        if "," in text:
            seeds = [int(x) for x in text.split(",") if x.strip()]
        else:
            seeds = list(range(int(text)))
    except ValueError:
        raise FastCifarError(f"--seeds takes a count like 3 (seeds 0, 1, 2) or a list like 0,1,2 (one seed: 7,), "
                             f"got {text!r}") from None
    if not seeds:
        raise FastCifarError(f"--seeds needs at least one seed, got {text!r}")
    if len(set(seeds)) != len(seeds):
        raise FastCifarError(f"--seeds lists a seed twice: {text!r}")
    if min(seeds) < 0:
        raise FastCifarError(f"--seeds must be zero or positive, got {text!r}")
    return seeds


def completed(summary: dict) -> bool:
    """A seed's run is done: all its epochs, or stopped at --target-acc (not by a signal)."""
    return bool(summary.get("finished") or (summary.get("target_reached_epoch") is not None
                                            and not summary.get("stopped_by") and not summary.get("exit_code")))


def is_group(path) -> bool:
    return (Path(path) / GROUP_FILE).is_file()


def seed_dir(group: Path, seed: int) -> Path:
    return Path(group) / f"seed-{seed}"


# --- the group's statistics ------------------------------------------------------------------------------------
def time_to(rows: list[dict], threshold: float, tta: str) -> tuple[int, float] | None:
    """(epoch, training seconds) until the headline test accuracy first reached `threshold`. An epoch that
    compiled counts at the run's steady-state training time: in one process only the first seed compiles, and
    compilation is reported apart."""
    steady = [r["train_time_s"] for r in rows if not r.get("compile_s")]
    steady_s = sum(steady) / len(steady) if steady else None
    seconds = 0.0
    for r in rows:
        seconds += steady_s if r.get("compile_s") and steady_s is not None else r["train_time_s"]
        acc = r["test_acc_tta"] if tta == "flip" else r["test_acc"]
        if acc >= threshold:
            return r["epoch"], seconds
    return None


def run_metrics(summary: dict, rows: list[dict], tta: str) -> dict[str, float]:
    """One run's headline numbers, by the names the group's stats and `fastcifar compare` use."""
    out = {"best_test_acc": summary["best_test_acc"], "best_test_acc_no_tta": summary["best_test_acc_no_tta"],
           "final_test_acc": summary["final_test_acc"], "final_test_acc_tta": summary.get("final_test_acc_tta"),
           "mean_epoch_time_s": summary["mean_epoch_time_s"], "mean_train_time_s": summary["mean_train_time_s"],
           "compile_s": summary.get("compile_s")}
    if summary.get("chosen_on") == "validation":  # --val-split: the headline is the test accuracy of the epoch
        out["best_test_acc"] = summary["test_acc_at_best"]  # chosen on validation, never the test set's maximum
        out["max_test_acc"] = summary["best_test_acc"]
    for t in ACCURACY_MILESTONES:
        reached = time_to(rows, t, tta)
        out[f"epoch_to_{100 * t:g}%"] = reached[0] if reached else None
        out[f"time_to_{100 * t:g}%_s"] = reached[1] if reached else None
    return {k: v for k, v in out.items() if v is not None and math.isfinite(v)}


def group_stats(per_run: list[dict]) -> dict[str, dict]:
    names = list(dict.fromkeys(k for metrics in per_run for k in metrics))
    return {name: describe([m[name] for m in per_run if name in m]) for name in names}


def read_rows(run_dir: Path) -> list[dict]:
    return RunDir(run_dir).read_jsonl("metrics.jsonl")


# What the group's table shows: label, metric, scale, unit, digits.
TABLE = [("Best test accuracy", "best_test_acc", 100, "%", 2),
         ("Max test accuracy (not used to choose)", "max_test_acc", 100, "%", 2),
         ("Best test accuracy, no TTA", "best_test_acc_no_tta", 100, "%", 2),
         ("Final test accuracy", "final_test_acc", 100, "%", 2),
         ("Final test accuracy, flip TTA", "final_test_acc_tta", 100, "%", 2),
         ("Epoch time (steady state)", "mean_epoch_time_s", 1, "s", 3),
         *[(f"Training time to {100 * t:g}%", f"time_to_{100 * t:g}%_s", 1, "s", 1) for t in ACCURACY_MILESTONES],
         *[(f"Epoch reaching {100 * t:g}% (0-based)", f"epoch_to_{100 * t:g}%", 1, "", 1)
           for t in ACCURACY_MILESTONES]]


def group_table(doc: dict, headline: str) -> str:
    stats, n = doc["stats"], len(doc["runs"])
    lines = []
    for label, name, scale, unit, digits in TABLE:
        if name not in stats or (name == "best_test_acc_no_tta" and headline == "no TTA"):
            continue
        if name == "best_test_acc":
            label += f" ({headline})"
        reached = stats[name]["n"]
        note = f"   reached by {reached} of {n}" if reached < n else ""
        lines.append((label, format_stat(stats[name], scale, unit, digits) + note))
    width = max(len(label) for label, _ in lines)
    head = f"{'Metric':<{width}} | mean ± std (n, 95 % CI of the mean)"
    return "\n".join([head, f"{'-' * width}-+-{'-' * 40}", *(f"{label:<{width}} | {value}" for label, value in lines)])


# --- the group's run -------------------------------------------------------------------------------------------
class Group:
    def __init__(self, path: Path, cfg: TrainConfig, seeds: list[int]):
        self.path, self.cfg, self.seeds = Path(path), cfg, seeds
        self.dir = RunDir(self.path)
        self.runs: list[dict] = []

    def seed_config(self, seed: int) -> TrainConfig:
        return dataclasses.replace(self.cfg, seed=seed, run_dir=str(seed_dir(self.path, seed)))

    def state_of(self, seed: int) -> str:
        """finished | resume (a last.pt of an unfinished run) | fresh."""
        folder = seed_dir(self.path, seed)
        summary = folder / "summary.json"
        if summary.is_file() and completed(RunDir(folder).read_json("summary.json")):
            return "finished"
        return "resume" if (folder / "last.pt").is_file() else "fresh"

    def record(self, seed: int) -> None:
        folder = seed_dir(self.path, seed)
        self.runs.append({"seed": seed, "run_dir": str(folder), "summary": RunDir(folder).read_json("summary.json")})

    def document(self) -> dict:
        per_run = [run_metrics(r["summary"], read_rows(seed_dir(self.path, r["seed"])), self.cfg.tta)
                   for r in self.runs]
        return {"seeds": self.seeds, "runs": self.runs, "stats": group_stats(per_run)}

    def write_summary(self) -> dict:
        doc = self.document()
        self.dir.write_json("summary.json", doc)
        return doc


def start_group(cfg: TrainConfig, seeds: list[int], path: Path) -> Group:
    group = Group(path, cfg, seeds)
    if group.dir.holds_run() or is_group(path):
        raise FastCifarError(f"{path} already holds a run or a group of seeds: continue it with `fastcifar train "
                             f"--resume {path}`, or choose another --run-dir.")
    group.dir.create()
    group.dir.write_json(GROUP_FILE, {"seeds": seeds, "config": {**cfg.to_dict(), "seed": None, "run_dir": None}})
    return group


def resumed_group(path: Path, given: dict, recipe: str | None) -> Group:
    from fastcifar.config import build_config

    doc = RunDir(path).read_json(GROUP_FILE)
    saved = doc["config"]
    changed = sorted(k for k, v in {**given, "recipe": recipe or saved.get("recipe")}.items()
                     if k not in GROUP_RESUMABLE and saved.get(k) != v)
    if changed:
        raise FastCifarError(f"--resume continues the group of seeds as it was configured; these flags differ from "
                             f"its {GROUP_FILE} and cannot change: "
                             f"{', '.join('--' + k.replace('_', '-') for k in changed)}")
    saved.update({k: v for k, v in given.items() if k in GROUP_RESUMABLE})
    saved.update(seed=0, run_dir=None)
    cfg = build_config(**{k: v for k, v in saved.items() if k in TrainConfig.__dataclass_fields__})
    return Group(path, cfg, doc["seeds"])


def fit_group(group: Group, *, loss_fn=None) -> dict:
    """Train every seed of `group` not finished yet, in one process; returns the group's summary document (with
    "exit_code" when a seed was stopped)."""
    info = dist.setup(group.cfg.device, group.cfg.dist_timeout)
    session, dataset, stopped = None, None, None
    try:
        if info.is_main:
            group.dir.lock()  # one process per group: a second `--resume GROUP` is told who holds it
        for seed in group.seeds:
            state = dist.broadcast_object(group.state_of(seed) if info.is_main else None, info)
            if state == "finished":
                if info.is_main:
                    group.record(seed)
                    print(f"seed {seed}: finished earlier, in {seed_dir(group.path, seed)}")
                continue
            summary = _fit_seed(group, seed, state, info, session, dataset, loss_fn)
            session, dataset = summary.pop("_session"), summary.pop("_dataset")
            if info.is_main and completed(summary):
                group.record(seed)
                group.write_summary()
            stopped = dist.broadcast_object(summary.get("exit_code") or (0 if completed(summary) else 1)
                                            if info.is_main else None, info)
            if stopped:
                break
        if not info.is_main:
            return {}
        doc = group.write_summary()
        _print_results(group, doc, stopped)
        if stopped:
            doc["exit_code"] = stopped
        elif group.cfg.report:
            from fastcifar.report import make_report

            print(f"plots: {', '.join(str(p) for p in make_report(group.path))}")
        return doc
    except FastCifarError as exc:  # the seed's message says how to continue that run; the group continues so:
        if info.is_main and "--resume" in str(exc):
            exc.args = (f"{exc} To continue the whole group instead: fastcifar train --resume {group.path}",
                        *exc.args[1:])
        raise
    finally:
        group.dir.unlock()
        dist.cleanup(info)


def _fit_seed(group: Group, seed: int, state: str, info, session, dataset, loss_fn) -> dict:
    """One seed's run: a new session for the first, the same one reset for the others (no recompilation)."""
    from fastcifar.run import TrainingRun
    from fastcifar.session import build_session, reset_session
    from fastcifar.train import run_epochs

    cfg = group.seed_config(seed)
    # a seed stopped before its first save restarts in its folder as any run does (run.py clears what it left);
    # one that holds a saved record without last.pt is refused there, never removed
    subsets = cfg.train_subset or cfg.test_subset or cfg.val_split  # drawn with the seed: each seed loads its own
    resume = state == "resume"
    with TrainingRun.open(cfg, info, resume_dir=cfg.run_dir if resume else None,
                          init_from=None if resume else cfg.init_from,
                          dataset=None if subsets else dataset) as run:
        run.group = group.path.name
        # restoring a checkpoint replaces the optimizer's state tensors, which a captured CUDA graph holds on to
        if session is None or (resume and session.stepper.captured):
            session = build_session(run.cfg, info, run.dataset, run.res, loss_fn=loss_fn, notice=run.notice)
        else:
            reset_session(session, run.cfg, run.dataset, run.notice)
            run.res = session.res  # what auto became (and any fallback) is the session's
        if info.is_main:
            print(f"\n=== seed {seed} ({group.seeds.index(seed) + 1} of {len(group.seeds)}) ===", flush=True)
        run.start(session)  # a resumed seed's state is restored here, over the reset
        run_epochs(run, session)
        summary = run.close(session)
    return {**summary, "_session": session, "_dataset": run.dataset}


def _print_results(group: Group, doc: dict, stopped) -> None:
    done = [r["seed"] for r in doc["runs"]]
    print()
    if doc["runs"]:
        headline = doc["runs"][0]["summary"].get("headline", "no TTA")
        title = "Group results" if not stopped else "Group stopped early: results of the finished seeds"
        print(f"{title} — seeds {', '.join(map(str, done))} of {doc['runs'][0]['summary'].get('dataset', '')}")
        print(group_table(doc, headline))
        for r in doc["runs"]:
            s = r["summary"]
            print(f"  seed {r['seed']}: best {100 * s['best_test_acc']:.2f} % (epoch {s['best_epoch']}), final "
                  f"{100 * s['final_test_acc']:.2f} %, {s['epochs_done']} epochs — {r['run_dir']}")
    print(f"group summary: {group.path / 'summary.json'}")
    if stopped:
        left = [s for s in group.seeds if s not in done]
        print(f"seeds not finished: {', '.join(map(str, left))}; continue with: fastcifar train --resume "
              f"{group.path}")
