"""Choose the fast recipe's defaults by measurement: a grid of variants x seeds on the full CIFAR-10, each a real
`fit()` in this one process (torch.compile's graphs are reused across runs, so only the first run compiles).

    python benchmarks/gpu_sweep.py OUT_DIR --data-dir DIR [--budget SECONDS] [--seeds 3] [--smoke]

Run order, so that a sweep cut short by its budget keeps what matters most: the recipe itself with every seed
(its claim is a mean over seeds), then every variant with seed 0, then the variants' other seeds. After each run
OUT_DIR/sweep.json is rewritten (atomically) with every finished run and, per variant, the mean and spread over
its seeds of the headline accuracy (flip TTA), the accuracy without TTA, the epoch at which 94 % was first
reached, and the time. --smoke: tiny synthetic runs, to
check the plumbing on a CPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

# name -> overrides of the fast recipe (README "Recipes" says where each idea comes from)
VARIANTS: dict[str, dict] = {
    "fast": {},
    "lr0.1": {"lr": 0.1},
    "lr0.4": {"lr": 0.4},
    "no-zero-init": {"zero_init_residual": False},
    "no-cutout": {"augment": "crop,flip"},
    "smoothing0.2": {"label_smoothing": 0.2},
    "ema0.999": {"ema": 0.999},
    "cosine": {"scheduler": "cosine"},
    "batch256": {"batch_size": 256, "lr": 0.1},  # twice the steps per epoch, the same LR per image
    "adamw": {"optimizer": "adamw", "lr": 2e-3, "weight_decay": 5e-2},  # Adam learnt faster on the CPU subset
}
SMOKE = {"dataset": "synthetic", "synthetic_size": 32, "batch_size": 16, "epochs": 2, "warmup_epochs": 0.5}


def schedule(names: list[str], seeds: int) -> list[tuple[str, int]]:
    first = [(names[0], seed) for seed in range(seeds)]
    return first + [(n, 0) for n in names[1:]] + [(n, seed) for seed in range(1, seeds) for n in names[1:]]


def per_variant(runs: list[dict]) -> dict:
    by_variant: dict[str, list[dict]] = {}
    for run in runs:
        by_variant.setdefault(run["variant"], []).append(run)
    table = {}
    for name, rs in by_variant.items():
        def stats(key, rs=rs):
            values = [r[key] for r in rs if r.get(key) is not None]
            if not values:
                return None
            return {"mean": statistics.fmean(values), "spread": max(values) - min(values),
                    "stdev": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}

        table[name] = {"overrides": VARIANTS.get(name, {}), "seeds": [r["seed"] for r in rs],
                       "failed": [r["seed"] for r in rs if "error" in r],  # left out of every mean below
                       "best_test_acc": stats("best_test_acc"), "best_test_acc_no_tta": stats("best_test_acc_no_tta"),
                       "final_test_acc": stats("final_test_acc"), "epoch_94": stats("epoch_94"),
                       "train_wall_s": stats("train_wall_s"), "mean_epoch_time_s": stats("mean_epoch_time_s")}
    return table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--data-dir")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds; no run starts after this")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--variants", help="comma-separated subset of: " + ", ".join(VARIANTS))
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)

    from fastcifar import FastCifarError
    from fastcifar.config import build_config
    from fastcifar.files import atomic_write, dumps
    from fastcifar.train import fit

    names = args.variants.split(",") if args.variants else list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants: {', '.join(unknown)}")
    args.out.mkdir(parents=True, exist_ok=True)
    start, runs = time.perf_counter(), []
    base = SMOKE if args.smoke else {"data_dir": args.data_dir, "download": False}
    for name, seed in schedule(names, args.seeds):
        if time.perf_counter() - start > args.budget:
            print(f"sweep: budget of {args.budget:.0f} s reached; {len(runs)} runs done", flush=True)
            break
        run_dir = args.out / "runs" / f"{name}-seed{seed}"
        cfg = build_config("fast", **{**base, **VARIANTS[name], "seed": seed, "run_dir": str(run_dir),
                                      "wandb": "off", "progress": "off", "report": False, "monitor": False,
                                      "save_every": 1000})
        began = time.perf_counter()
        try:
            summary, error = fit(cfg), None
        except FastCifarError as exc:  # a diverging variant (a high LR may) is a result, not the sweep's end
            summary, error = {}, str(exc)
        reached = (summary.get("time_to_acc") or {}).get("94%")
        runs.append({"variant": name, "seed": seed, "overrides": VARIANTS[name],
                     **{k: summary.get(k) for k in ("best_test_acc", "best_test_acc_no_tta", "best_epoch",
                                                    "final_test_acc", "final_test_acc_tta", "epochs_done",
                                                    "mean_epoch_time_s", "first_epoch_time_s", "compile_s",
                                                    "train_wall_s", "total_wall_s", "time_to_acc", "device_name",
                                                    "active")},
                     "epoch_94": reached["epoch"] if reached else None, "wall_s": time.perf_counter() - began,
                     **({"error": error} if error else {})})
        for path in run_dir.glob("*.pt"):
            path.unlink()  # 180 MB of checkpoints per run: the numbers are what the sweep keeps
        atomic_write(args.out / "sweep.json", (dumps({"runs": runs, "variants": per_variant(runs),
                                                      "elapsed_s": time.perf_counter() - start}, indent=1)
                                               + "\n").encode())
        result = f"{100 * runs[-1]['best_test_acc']:.2f} %" if not error else f"failed: {error}"
        print(f"sweep: {name} seed {seed}: {result} ({runs[-1]['wall_s']:.0f} s)", flush=True)
    if not any("error" not in r for r in runs):
        print("sweep: no run finished", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
