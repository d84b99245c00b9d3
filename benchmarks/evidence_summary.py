"""summary.json and summary.md of a gpu_evidence.sh output folder, from whatever its stages have written so far.

Run after every stage (so a kill keeps every finished answer) and safe to run by hand on a partial folder:
    python benchmarks/evidence_summary.py OUT
    python benchmarks/evidence_summary.py --source-sha256 [DIR]   # the hash env.json records of a source tree
Torch-free: it reads files only.
"""

from __future__ import annotations

import json
import statistics
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

REPORT = {"epoch_time_s": 44.0, "best_test_acc": 0.9197}  # the lab report's worksheet run
TARGETS = {"epoch_s_batch128": 1.0, "epoch_s_batch512": 0.5, "fast_acc": 0.94, "fast_epochs": 15,
           "dali_vs_torch": 1.03, "monitor_overhead_pct": 2.0}


def load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def steps(out: Path) -> dict:
    found = {}
    if (out / ".steps.tsv").exists():
        for line in (out / ".steps.tsv").read_text().splitlines():
            name, status, seconds, note = (line.split("\t") + [""] * 4)[:4]
            found[name] = {"status": status, "seconds": int(seconds or 0), **({"note": note} if note else {})}
    return found


def correctness(out: Path) -> dict | None:
    try:
        suite = ET.parse(out / "correctness.xml").getroot()
    except (OSError, ET.ParseError):
        return None
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    cases = {}
    for case in suite.iter("testcase"):
        outcome = "passed"
        for kind in ("failure", "error", "skipped"):
            if case.find(kind) is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[kind]
        cases[f"{case.get('classname', '').split('.')[-1]}::{case.get('name')}"] = outcome
    counts = {k: sum(v == k for v in cases.values()) for k in ("passed", "failed", "error", "skipped")}
    return {**counts, "tests": cases}


def run_numbers(run_dir: Path) -> dict | None:
    """One run directory (its summary.json and metrics.jsonl): the claims' numbers."""
    summ = load(run_dir / "summary.json")
    rows = []
    if (run_dir / "metrics.jsonl").exists():
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    if not rows:
        return None
    resolved = (load(run_dir / "config.json") or {}).get("resolved") or {}
    steady = [r for r in rows if not r.get("compile_s")] or rows
    med = lambda key: statistics.median(r[key] for r in steady) if all(r.get(key) is not None for r in steady) \
        else None  # noqa: E731
    accs = [r.get("test_acc_tta", r["test_acc"]) if (summ or {}).get("headline") == "flip TTA" else r["test_acc"]
            for r in rows]
    reach = next((r for r, a in zip(rows, accs) if a >= TARGETS["fast_acc"]), None)
    return {
        "epochs_done": len(rows), "finished": (summ or {}).get("finished", False), "loader": resolved.get("loader"),
        "batch_size": resolved.get("global_batch_size"), "active": rows[-1].get("active"),
        "best_test_acc": max(accs), "best_test_acc_no_tta": max(r["test_acc"] for r in rows),
        "final_test_acc": rows[-1]["test_acc"], "final_test_acc_tta": rows[-1].get("test_acc_tta"),
        "first_epoch_time_s": rows[0]["epoch_time_s"], "compile_s": sum(r.get("compile_s", 0.0) for r in rows),
        "epoch_time_s": med("epoch_time_s"), "train_time_s": med("train_time_s"),
        "images_per_s": med("train_images_per_s"), "achieved_tflops": med("achieved_tflops"), "mfu": med("mfu"),
        "checkpoint_s_per_save": (summ["checkpoint_time_s"] / summ["checkpoints"]
                                  if summ and summ.get("checkpoints") else None),
        "epoch_reaching_94": reach["epoch"] if reach else None,
        "wall_s_to_94": reach["elapsed_s"] if reach else None, "train_s_to_94": reach["elapsed_train_s"] if reach
        else None}


def spread(values: list[float]) -> dict | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"n": len(values), "mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1
            else 0.0, "min": min(values), "max": max(values)}


def fast_seeds(out: Path) -> dict | None:
    group = out / "run-fast"
    runs = sorted((p for p in group.glob("seed-*") if p.is_dir()), key=lambda p: int(p.name.split("-")[1])) \
        if group.is_dir() else []
    seeds = {p.name: run_numbers(p) for p in runs}
    seeds = {k: v for k, v in seeds.items() if v}
    if not seeds:
        return None
    per = list(seeds.values())
    return {"seeds": seeds, "group_summary": load(group / "summary.json"),
            "best_tta": spread([s["best_test_acc"] for s in per]),
            "best_no_tta": spread([s["best_test_acc_no_tta"] for s in per]),
            "epoch_reaching_94": [s["epoch_reaching_94"] for s in per],
            "train_s_to_94": spread([s["train_s_to_94"] for s in per]),
            "epoch_time_s": spread([s["epoch_time_s"] for s in per])}


def benchmarks(out: Path) -> dict:
    found = {}
    if (out / "benchmarks.jsonl").exists():
        for line in (out / "benchmarks.jsonl").read_text().splitlines():
            r = json.loads(line)
            x = r["extra_info"]
            found[r["name"]] = {k: x[k] for k in (
                "images_per_s_median", "seconds_median", "ms_per_step_median", "mfu", "achieved_tflops",
                "overhead_pct_vs_off", "overhead_pct_vs_off_best", "loader", "dtype", "batch_size", "compile",
                "cuda_graphs", "graph_captured", "augment", "mode") if k in x}
    return found


def profiles(out: Path) -> dict:
    found = {}
    for folder in sorted(out.glob("profile-*")):
        numbers = load(folder / "profile" / "profile.json")
        if numbers:
            found[folder.name] = {k: numbers[k] for k in ("steps", "wall_ms_per_step", "host_ms_per_step",
                                                          "device_ms_per_step", "device_busy_share",
                                                          "launches_per_step", "trace", "trace_bytes", "describe")}
            found[folder.name]["top_kernels"] = numbers["top_kernels"][:5]
    return found


def _pct(x):
    return "—" if x is None else f"{100 * x:.2f} %"


def _s(x):
    return "—" if x is None else f"{x:.2f} s"


def dali_missing(s: dict) -> str | None:
    """Why DALI cannot have been measured, or None when it was there."""
    step = s["stages"].get("dali_import")
    if step and step["status"] != "ok":
        return "DALI did not import after its set-up (the dali_import step; gpu_evidence.log says why)"
    if not s["env"].get("dali"):
        return "DALI is not installed on this machine (its parts were not carried: benchmarks/README.md)"
    return None


def claims(s: dict) -> list[tuple[str, str, str]]:
    """(claim, measured, verdict) rows of summary.md."""
    h100 = "H100" in (s.get("device") or "")
    caveat = "" if h100 else " (target set for an H100)"
    rows = []
    c = s.get("correctness")
    cuda = bool(s["env"].get("gpu"))
    rows.append(("CUDA-only correctness tests pass", "not run" if c is None else
                 f"{c['passed']} passed, {c['failed'] + c['error']} failed, {c['skipped']} skipped",
                 "—" if c is None or c["passed"] == 0 else "FAIL" if c["failed"] + c["error"] else
                 # on a GPU a skipped test is a missing answer (DALI's tests skip where DALI does not import)
                 f"incomplete: {c['skipped']} skipped (correctness.log says why)" if cuda and c["skipped"] else
                 "pass"))
    w = s["train"].get("worksheet")
    rows.append(("worksheet recipe, 25 epochs: best test accuracy vs the report's 91.97 %",
                 "not run" if not w else f"best {_pct(w['best_test_acc'])}, final {_pct(w['final_test_acc'])} "
                                         f"({w['epochs_done']} epochs)",
                 "—" if not w else ("matches or beats" if w["best_test_acc"] >= REPORT["best_test_acc"] else
                                    f"{100 * (REPORT['best_test_acc'] - w['best_test_acc']):.2f} points below")))
    rows.append(("worksheet epoch (train + test) vs the report's 44 s",
                 "not run" if not w or w["epoch_time_s"] is None else
                 f"{_s(w['epoch_time_s'])} steady, first {_s(w['first_epoch_time_s'])}, compile {_s(w['compile_s'])}, "
                 f"MFU {_pct(w['mfu'])}, checkpoint {_s(w['checkpoint_s_per_save'])}/save, loader {w['loader']}",
                 "—" if not w or not w["epoch_time_s"] else
                 f"{REPORT['epoch_time_s'] / w['epoch_time_s']:.0f}x faster"))
    f = s["train"].get("fast")
    if f:
        accs = ", ".join(f"{k} {_pct(v['best_test_acc'])} ({_pct(v['best_test_acc_no_tta'])} no TTA; 94 % "
                         + ("not reached" if v["epoch_reaching_94"] is None else
                            f"at epoch {v['epoch_reaching_94']}, {_s(v['train_s_to_94'])} of training")
                         + ")" for k, v in f["seeds"].items())
        mean = f["best_tta"]
        measured = f"mean {_pct(mean['mean'])} ± {_pct(mean['std'])} over {mean['n']} seeds: {accs}"
        met = mean["n"] >= 3 and mean["mean"] >= TARGETS["fast_acc"]
        verdict = "met" if met else ("missed" if mean["n"] >= 3 else f"incomplete ({mean['n']} seeds)")
    else:
        measured, verdict = "not run", "—"
    rows.append(("fast recipe: 94 % test accuracy (flip TTA), mean of 3 seeds, in ≤ 15 epochs", measured, verdict))
    b = s["benchmarks"]
    for batch, key in ((128, "epoch_s_batch128"), (512, "epoch_s_batch512")):
        times = {loader: b.get(f"test_epoch[batch{batch}-{loader}]", {}).get("seconds_median") for loader in
                 ("torch", "dali")}
        best = min((t for t in times.values() if t), default=None)
        rows.append((f"training epoch at batch {batch} ≤ {TARGETS[key]} s (steady)",
                     "not run" if best is None else ", ".join(f"{k} {_s(v)}" for k, v in times.items() if v),
                     "—" if best is None else ("met" if best <= TARGETS[key] else "missed") + caveat))
        claim = f"DALI epoch within 3 % of the torch loader's at batch {batch}"
        if all(times.values()):
            ratio = times["dali"] / times["torch"]
            rows.append((claim, f"DALI / torch = {ratio:.3f}", "met" if ratio <= TARGETS["dali_vs_torch"] else
                         "missed"))
        else:
            why = dali_missing(s) or "no DALI and torch epoch benchmarks at this batch"
            rows.append((claim, f"not measured: {why}", "—"))
    m = b.get("test_monitoring[on]", {})
    if "overhead_pct_vs_off" in m:
        rows.append(("monitoring costs < 2 % of the epoch", f"{m['overhead_pct_vs_off']:.2f} % (median), "
                     f"{m.get('overhead_pct_vs_off_best', float('nan')):.2f} % (best rounds)",
                     "met" if m["overhead_pct_vs_off"] < TARGETS["monitor_overhead_pct"] else "missed"))
    for name, p in s["profiles"].items():
        rows.append((f"profile {name} ({p['describe']})", f"{p['wall_ms_per_step']:.2f} ms/step, device busy "
                     f"{100 * p['device_busy_share']:.0f} %, {p['launches_per_step']:.0f} launches/step, host "
                     f"{p['host_ms_per_step']:.2f} ms/step", "recorded"))
    return rows


def summarise(out: Path) -> dict:
    env = load(out / "env.json") or {}
    flops = load(out / "flops.json") or {}
    s = {"device": env.get("gpu") or ("cpu (no CUDA)" if env else None), "commit": env.get("commit"),
         "smoke": env.get("smoke"), "env": env, "stages": steps(out), "correctness": correctness(out),
         "flops": {k: flops.get(k) for k in ("forward_flops", "forward_backward_flops", "training_flops_per_epoch",
                                             "verified") if k in flops},
         "reference": REPORT, "targets": TARGETS, "train": {}, "benchmarks": benchmarks(out),
         "profiles": profiles(out)}
    w = run_numbers(out / "run-worksheet")
    if w:
        s["train"]["worksheet"] = w
    f = fast_seeds(out)
    if f:
        s["train"]["fast"] = f
    s["claims"] = [{"claim": c, "measured": m, "verdict": v} for c, m, v in claims(s)]
    return s


def markdown(s: dict) -> str:
    env = s["env"]
    lines = [f"# fastcifar GPU evidence run{' (SMOKE: tiny sizes, not evidence)' if s.get('smoke') else ''}", "",
             f"device {s['device']}, driver {(env.get('nvidia_smi') or '—')}, torch {env.get('torch')}, CUDA "
             f"{env.get('torch_cuda')}, cuDNN {env.get('cudnn')}, DALI {env.get('dali')}, commit {s['commit']}", "",
             "| claim | measured | verdict |", "|---|---|---|"]
    lines += [f"| {c['claim']} | {c['measured']} | {c['verdict']} |" for c in s["claims"]]
    lines += ["", "| stage | status | seconds | note |", "|---|---|---|---|"]
    lines += [f"| {k} | {v['status']} | {v['seconds']} | {v.get('note', '')} |" for k, v in s["stages"].items()]
    return "\n".join(lines) + "\n"


def source_sha256(root: str) -> str:
    """One hash of the package's and benchmarks' sources under `root` (names and bytes): env.json records it, since a
    copied work tree has no .git. For a commit: `git archive COMMIT fastcifar benchmarks | tar -x -C DIR`, then
    `python benchmarks/evidence_summary.py --source-sha256 DIR` gives the same hash when the tree was that commit."""
    import hashlib

    base = Path(root)
    files = sorted(p.relative_to(base).as_posix() for d in ("fastcifar", "benchmarks") for p in (base / d).rglob("*")
                   if p.is_file() and p.suffix in (".py", ".sh") and "__pycache__" not in p.parts)
    digest = hashlib.sha256()
    for name in files:
        digest.update(name.encode() + b"\0" + (base / name).read_bytes() + b"\0")
    return digest.hexdigest()


def main(out: str) -> None:
    folder = Path(out)
    s = summarise(folder)
    (folder / "summary.json").write_text(json.dumps(s, indent=1))
    (folder / "summary.md").write_text(markdown(s))


if __name__ == "__main__":
    if sys.argv[1] == "--source-sha256":
        print(source_sha256(sys.argv[2] if len(sys.argv) > 2 else "."))
    else:
        main(sys.argv[1])
