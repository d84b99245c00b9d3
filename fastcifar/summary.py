"""A run's numbers from its epoch rows alone (metrics.jsonl): the headline accuracy, the steady-state timings
(epochs that compiled are kept apart), time-to-accuracy and the target. Torch-free: the run, the sweep and
anything reading a run directory share it."""

from __future__ import annotations

import statistics

ACCURACY_MILESTONES = (0.90, 0.92, 0.93, 0.94)  # time-to-accuracy is recorded for each


def headline(tta: str, row: dict) -> float:
    """The accuracy a run is judged by: with flip TTA when --tta flip, else plain."""
    return row["test_acc_tta"] if tta == "flip" else row["test_acc"]


def selection_acc(tta: str, row: dict) -> float:
    """The accuracy the best epoch is chosen by: validation's under --val-split, else the headline test accuracy."""
    if row.get("val_acc") is not None:
        return row["val_acc_tta"] if tta == "flip" else row["val_acc"]
    return headline(tta, row)


def newly_reached(acc: float, best_before: float, milestones=None) -> list[float]:
    """The milestones an epoch's accuracy crosses for the first time."""
    return [t for t in (milestones or ACCURACY_MILESTONES) if acc >= t > best_before]


def summarise(rows: list[dict], *, tta: str, epochs: int, target_acc: float | None, milestones=None) -> dict:
    last = rows[-1]
    steady = [r for r in rows if not r.get("compile_s")] or rows  # compilation is reported apart
    accs = [headline(tta, r) for r in rows]
    chosen_by = [selection_acc(tta, r) for r in rows]
    best = max(range(len(rows)), key=lambda i: chosen_by[i])  # the epoch best.pt holds
    best_test = max(range(len(rows)), key=lambda i: accs[i])
    on_validation = rows[best].get("val_acc") is not None

    def first_at(threshold):
        return next((r for r, a in zip(rows, accs) if threshold is not None and a >= threshold), None)

    time_to = {}
    for t in milestones or ACCURACY_MILESTONES:
        row = first_at(t)
        time_to[f"{100 * t:g}%"] = row and {"epoch": row["epoch"], "wall_s": row["elapsed_s"],
                                            "train_s": row["elapsed_train_s"]}
    target = first_at(target_acc)
    return {
        "finished": len(rows) == epochs, "epochs_done": len(rows), "epochs": epochs,
        "final_train_acc": last["train_acc"], "final_test_acc": last["test_acc"],
        "final_test_acc_tta": last.get("test_acc_tta"), "final_train_loss": last["train_loss"],
        "final_test_loss": last["test_loss"], "headline": "flip TTA" if tta == "flip" else "no TTA",
        "chosen_on": "validation" if on_validation else "test", "best_epoch": rows[best]["epoch"],
        "best_val_acc": chosen_by[best] if on_validation else None, "test_acc_at_best": accs[best],
        # the best test accuracy over all epochs: chosen on the test set itself, so for comparison only
        "best_test_acc": accs[best_test], "best_test_epoch": rows[best_test]["epoch"],
        "best_test_acc_no_tta": max(r["test_acc"] for r in rows),
        "mean_epoch_time_s": statistics.fmean(r["epoch_time_s"] for r in steady),
        "mean_train_time_s": statistics.fmean(r["train_time_s"] for r in steady),
        "mean_train_images_per_s": statistics.fmean(r["train_images_per_s"] for r in steady),
        "timed_epochs": len(steady), "first_epoch_time_s": rows[0]["epoch_time_s"],
        "compile_s": sum(r.get("compile_s", 0.0) for r in rows), "time_to_acc": time_to,
        "target_acc": target_acc, "target_reached_epoch": target["epoch"] if target else None,
        "flagged_layers": sorted({name for r in rows for v in r["flags"].values() for name in v}),
    }
