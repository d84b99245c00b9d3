"""`fastcifar compare A B`: two runs or groups of seeds side by side. Per headline metric each side's mean ± std
(n), the difference B − A with its 95 % confidence interval and Welch's t-test p-value, in words whether that
difference stands out from seed-to-seed noise at these n and how many seeds per side would make it do so at the
observed spread; then the configuration flags that differ. Reads the directories' files only (torch-free)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

from fastcifar import FastCifarError
from fastcifar.console import WIDTH
from fastcifar.seeds import GROUP_FILE, read_rows, run_metrics
from fastcifar.stats import ALPHA, MAX_SEEDS_SUGGESTED, describe, seeds_needed, welch

# Headline metrics compared: name, label, scale, unit, digits.
METRICS = [("best_test_acc", "best test accuracy (headline)", 100, "%", 2),
           ("final_test_acc", "final test accuracy", 100, "%", 2),
           ("final_test_acc_tta", "final test accuracy, flip TTA", 100, "%", 2),
           ("mean_epoch_time_s", "epoch time", 1, "s", 3),
           ("time_to_94%_s", "training time to 94%", 1, "s", 1),
           ("epoch_to_94%", "epoch reaching 94%", 1, "", 1)]
# Config fields that name a run rather than describe how it trains.
NOT_COMPARED = {"run_dir", "seed", "progress", "wandb", "wandb_project", "report", "data_dir", "download"}


def load_side(path: str) -> dict:
    """{"path", "kind": run|group, "config", "metrics": {name: [one value per run]}}."""
    folder = Path(path)
    if (folder / GROUP_FILE).is_file():
        doc = _read_json(folder / "summary.json", folder)
        runs = doc.get("runs") or []
        if not runs:
            raise FastCifarError(f"{folder} is a group of seeds with no finished seed yet: nothing to compare "
                                 f"(continue it with fastcifar train --resume {folder}).")
        config = _read_json(folder / GROUP_FILE, folder)["config"]
        # each seed's folder under the group, wherever the group was trained or has moved since
        per_run = [run_metrics(r["summary"], read_rows(folder / f"seed-{r['seed']}"), config.get("tta", "off"))
                   for r in runs]
        kind = "group"
    elif (folder / "summary.json").is_file():
        summary = _read_json(folder / "summary.json", folder)
        config = _read_json(folder / "config.json", folder)["config"]
        per_run = [run_metrics(summary, read_rows(folder), config.get("tta", "off"))]
        kind = "run"
    else:
        raise FastCifarError(f"{folder} holds no summary.json: pass a run directory of a finished (or stopped) run, "
                             f"or the folder of a `fastcifar train --seeds` group.")
    names = list(dict.fromkeys(k for m in per_run for k in m))
    return {"path": str(folder), "kind": kind, "config": config,
            "metrics": {name: [m[name] for m in per_run if name in m] for name in names}, "runs": len(per_run)}


def _read_json(path: Path, folder: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise FastCifarError(f"cannot compare {folder}: {path} is missing or unreadable ({exc}).") from None


def compare(a_path: str, b_path: str) -> dict:
    a, b = load_side(a_path), load_side(b_path)
    metrics = {}
    for name, label, *_ in METRICS:
        va, vb = a["metrics"].get(name, []), b["metrics"].get(name, [])
        if not va and not vb:
            continue
        test = welch(va, vb)
        da, db = describe(va), describe(vb)
        needed = None
        if test["p"] is not None and test["p"] >= ALPHA:
            needed = seeds_needed(test["diff"], da["std"], db["std"])
        metrics[name] = {"label": label, "a": da, "b": db, **test,
                         "distinguishable": None if test["p"] is None else test["p"] < ALPHA,
                         "seeds_needed": needed}
    keys = sorted((set(a["config"]) | set(b["config"])) - NOT_COMPARED)
    differ = {k: [a["config"].get(k), b["config"].get(k)] for k in keys if a["config"].get(k) != b["config"].get(k)}
    return {"a": {k: a[k] for k in ("path", "kind", "runs")}, "b": {k: b[k] for k in ("path", "kind", "runs")},
            "metrics": metrics, "config_diff": differ}


def verdict(m: dict) -> str:
    """In words: does the difference stand out from seed noise at these n, and what would make it."""
    na, nb = m["a"]["n"], m["b"]["n"]
    if not na or not nb:
        return "only one side has it"
    if m["p"] is None:
        if min(na, nb) < 2:
            return (f"cannot tell: n={na} vs {nb}, a single run has no spread to judge the difference against "
                    f"(train each with --seeds 3 or more)")
        return "no spread at all on either side: the runs are identical within each side"
    if m["distinguishable"]:
        return f"distinguishable from seed noise at n={na} vs {nb} (p = {m['p']:.3g} < {ALPHA:g})"
    more = (f"about {m['seeds_needed']} seeds per side would make it so at the observed spread"
            if m["seeds_needed"] else f"even {MAX_SEEDS_SUGGESTED} seeds per side would not at the observed spread"
            if m["diff"] else "the means are equal")
    return f"not distinguishable from seed noise at n={na} vs {nb} (p = {m['p']:.3g}); {more}"


def _mean_std(d: dict, scale: float, unit: str, digits: int) -> str:
    if not d["n"]:
        return "—"
    std = f" ± {scale * d['std']:.{digits}f}" if d["std"] is not None else ""
    return f"{scale * d['mean']:.{digits}f}{std} {unit} (n={d['n']})".replace("  ", " ")


def format_comparison(result: dict) -> str:
    a, b = result["a"], result["b"]
    lines = [f"A: {a['path']} ({a['kind']}, {a['runs']} run{'s' * (a['runs'] != 1)})",
             f"B: {b['path']} ({b['kind']}, {b['runs']} run{'s' * (b['runs'] != 1)})", ""]
    for name, label, scale, unit, digits in METRICS:
        m = result["metrics"].get(name)
        if m is None:
            continue
        sides = [_mean_std(m[side], scale, unit, digits) for side in ("a", "b")]
        lines.append(f"{label}: A {sides[0]} | B {sides[1]}")
        if m["diff"] is not None:
            diff = f"{scale * m['diff']:+.{digits}f} {unit}".rstrip()
            if m["ci95"] is not None:
                lo, hi = (scale * v for v in m["ci95"])
                diff += f" (95 % CI {lo:+.{digits}f} to {hi:+.{digits}f}), Welch's t-test p = {m['p']:.3g}"
            lines.append(f"  B − A: {diff}")
        # a terminal line stays within 120 columns: what would make it distinguishable goes on a line of its own
        said = verdict(m)
        head, sep, advice = said.partition("; ") if len(said) + 2 > WIDTH else (said, "", "")
        wrap = dict(width=WIDTH, subsequent_indent="    ", break_long_words=False, break_on_hyphens=False)
        lines += textwrap.wrap(head + sep.strip(), initial_indent="  ", **wrap)
        lines += textwrap.wrap(advice, initial_indent="    ", **wrap)
    lines.append("")
    if result["config_diff"]:
        flags = {"--" + k.replace("_", "-"): v for k, v in result["config_diff"].items()}
        width, col = max(map(len, flags)), max(len(str(v[0])) for v in flags.values())
        lines += ["what differs (config):", f"  {'flag':<{width}}   {'A':<{col}}   B"]
        lines += [f"  {flag:<{width}}   {str(va):<{col}}   {vb}" for flag, (va, vb) in flags.items()]
    else:
        lines.append("what differs (config): nothing but the seeds and where the runs were written")
    return "\n".join(lines)


def run_compare(args) -> int:
    result = compare(args.a, args.b)
    print(json.dumps(result, indent=2) if args.json else format_comparison(result))
    return 0


__all__ = ["compare", "format_comparison", "load_side", "run_compare", "verdict"]
