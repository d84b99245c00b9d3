#!/usr/bin/env bash
# Headline GPU numbers in at most 6 minutes, correctness first:  benchmarks/gpu_check.sh OUT_DIR
#  1. env.json: card, driver, torch, CUDA, DALI, commit
#  2. correctness.log: the CUDA-only tests: DALI and torch loaders give legal crops of the right images on a busy
#     GPU; the captured step (compile + one CUDA graph) matches the uncaptured one after 50 bf16 steps
#  3. flops.json: fastcifar flops --verify (when fvcore is there)
#  4. train_worksheet.json, train_fast.json: 3 epochs of each recipe on real CIFAR-10 (compile time, steady epoch
#     time, images/s, MFU, checkpoint time, accuracy)
#  5. benchmarks: the epoch per loader (torch, DALI) at batch 128 and 512, monitoring on/off, the step mechanisms,
#     the loaders alone; each record as it finishes
#  6. summary.json: all of it, and each step's status
# Each step is bounded by `timeout`; a failed step is recorded and the script goes on. The package is used from
# this tree (PYTHONPATH). Environment: PYTHON (default python3); DATA_DIR (holds cifar-10-batches-py/; default
# OUT_DIR/../data when that has it, else .gpu/data built from .gpu/cifar10_jpeg.npz + .gpu/build.py);
# GPU_CHECK_ASSETS (default .gpu); GPU_CHECK_BUDGET (seconds, default 340); GPU_CHECK_KEEP_RUNS=1 keeps the run
# directories; GPU_CHECK_SMOKE=1: tiny sizes, to check the plumbing on a CPU. Installs fvcore & co from .whl/ and
# DALI from .dali1-4/ when present (../shared/tools/device-pack.sh --dali makes them).
set -u
OUT=${1:?usage: benchmarks/gpu_check.sh OUT_DIR}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit 1
REPO=$(cd "$(dirname "$0")/.." && pwd) && cd "$REPO" || exit 1
SMOKE=${GPU_CHECK_SMOKE:-0}
DEADLINE=$((SECONDS + ${GPU_CHECK_BUDGET:-340}))
RESULTS=$OUT/.benchmarks.jsonl
: >"$RESULTS"
export FASTCIFAR_BENCH_RESULTS=$RESULTS
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
. "$REPO/benchmarks/gpu_env.sh"
log "repo $REPO, out $OUT, python $PY, smoke=$SMOKE"

run env 60 "$PY" - "$OUT/env.json" "$SMOKE" <<'EOF'
import json, os, platform, shutil, subprocess, sys
def version(module):
    try:
        return __import__(module, fromlist=["_"]).__version__
    except Exception:
        return None
def cmd(*args):
    if shutil.which(args[0]):
        return subprocess.run(args, capture_output=True, text=True).stdout.strip() or None
import torch
cuda = torch.cuda.is_available()
env = {"nvidia_smi": cmd("nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"),
       "gpu": torch.cuda.get_device_name(0) if cuda else None, "torch": torch.__version__,
       "torch_cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(), "python": platform.python_version(),
       "dali": version("nvidia.dali"), "fvcore": version("fvcore"), "wandb": version("wandb"),
       "pytest_benchmark": version("pytest_benchmark"), "commit": cmd("git", "rev-parse", "--short", "HEAD"),
       "cpu_count": os.cpu_count(), "smoke": sys.argv[2] == "1"}
json.dump(env, open(sys.argv[1], "w"), indent=1)
print(json.dumps(env))
EOF

# Correctness before any timing: the tests that only a GPU can run.
run correctness "$(budget 120 200)" "$PY" -m pytest -p no:cacheprovider -q -rs tests/test_loaders.py \
  tests/test_step.py -k "busy_gpu or captured_step" -o addopts="" 2>&1 | tee "$OUT/correctness.log"

if "$PY" -c "import fvcore" 2>/dev/null; then
  run flops 60 bash -c '"$0" -m fastcifar flops --verify --json >"$1"' "$PY" "$OUT/flops.json"
else
  echo '{"skipped": "fvcore not installed"}' >"$OUT/flops.json"; record flops skipped 0 "fvcore not installed"
fi

if [ "$HAVE_DATA" = 1 ]; then
  DATA=(--data-dir "$DATA_DIR" --no-download)
elif [ "$SMOKE" = 1 ]; then
  DATA=(--dataset synthetic --synthetic-size 64); record data synthetic 0 "no CIFAR-10 in $DATA_DIR: SYNTHETIC data"
else
  DATA=(); record data skipped 0 "no CIFAR-10 in $DATA_DIR, no $ASSETS/cifar10_jpeg.npz + build.py: no real-data runs"
fi

# 3 epochs of each recipe as a user runs them (epoch 0 includes compilation: the summary reports both).
EPOCHS=3 SMALL=()
[ "$SMOKE" = 1 ] && SMALL=(--train-subset 64 --test-subset 32 --batch-size 32 --eval-batch-size 32)
for recipe in worksheet fast; do
  [ ${#DATA[@]} -eq 0 ] && break
  rm -rf "$OUT/run-$recipe"
  run "train_$recipe" "$(budget 110 $([ $recipe = worksheet ] && echo 150 || echo 60))" "$PY" -m fastcifar train \
    --recipe "$recipe" --epochs "$EPOCHS" "${DATA[@]}" "${SMALL[@]}" --wandb off --progress off --no-report \
    --save-every 1 --run-dir "$OUT/run-$recipe"
  [ -d "$OUT/run-$recipe" ] && "$PY" - "$OUT/run-$recipe" "$OUT/train_$recipe.json" <<'EOF'
import json, pathlib, sys
run = pathlib.Path(sys.argv[1])
read = lambda name: json.loads((run / name).read_text()) if (run / name).exists() else None
metrics = run / "metrics.jsonl"
rows = [json.loads(l) for l in metrics.read_text().splitlines()] if metrics.exists() else []
json.dump({"summary": read("summary.json"), "resolved": (read("config.json") or {}).get("resolved"), "metrics": rows},
          open(sys.argv[2], "w"), indent=1)
EOF
  [ "${GPU_CHECK_KEEP_RUNS:-0}" = 1 ] || rm -rf "$OUT/run-$recipe"  # the numbers are in train_$recipe.json
done

# The benchmarks at full size on CUDA, headline first; stopped at the budget, the finished ones still count.
if "$PY" -c "import pytest_benchmark" 2>/dev/null; then
  B=benchmarks/bench_train.py
  K="test_epoch or test_monitoring or (test_eval and worksheet) or (test_step and channels_last and bf16)"
  K="$K or loader_throughput"
  if [ "$SMOKE" = 1 ]; then
    export FASTCIFAR_BENCH_TRAIN_IMAGES=128 FASTCIFAR_BENCH_EVAL_IMAGES=128 FASTCIFAR_BENCH_ROUNDS=1 \
      FASTCIFAR_BENCH_STEP_ROUNDS=1 FASTCIFAR_BENCH_STEP_BATCH=32 FASTCIFAR_BENCH_IMAGES=256
    K="batch128 or test_monitoring or loader_throughput or (test_step and eager and channels_last and fp32)"
  fi
  run benchmarks "$(budget 400 10)" "$PY" -m pytest -p no:cacheprovider -q "$B::test_epoch" "$B::test_monitoring" \
    "$B::test_step" "$B::test_eval" benchmarks/bench_loaders.py -k "$K" --benchmark-only \
    --benchmark-json "$OUT/benchmarks.json"
else
  record benchmarks skipped 0 "pytest-benchmark not installed (put it, py-cpuinfo and pytest as wheels in .whl/)"
fi

"$PY" - "$OUT" "$STEPS" "$RESULTS" "$SECONDS" <<'EOF'
import json, pathlib, statistics, sys
out = pathlib.Path(sys.argv[1])
def load(name):
    try:
        return json.loads((out / name).read_text())
    except Exception as exc:
        return {"missing": f"{name}: {type(exc).__name__}"}
steps = {}
for line in open(sys.argv[2]).read().splitlines():
    name, status, seconds, note = line.split("\t")
    steps[name] = {"status": status, "seconds": int(seconds), **({"note": note} if note else {})}
env, fl = load("env.json"), load("flops.json")
s = {"wall_s": int(sys.argv[4]), "device": env.get("gpu") or "cpu (no CUDA)", "driver": (env.get("nvidia_smi") or
     "").split(", ")[1:2], "torch": env.get("torch"), "dali": env.get("dali"), "commit": env.get("commit"),
     "env": env, "steps": steps, "correctness": steps.get("correctness", {}).get("status"),
     "flops": {k: v for k, v in fl.items() if k in ("verified", "forward_flops", "forward_backward_flops",
                                                    "training_flops_per_epoch", "skipped", "missing")},
     "reference": {"report_epoch_time_s": 44.0, "report_best_test_acc": 0.9197}, "train": {}, "benchmarks": {}}
for recipe in ("worksheet", "fast"):
    t = load(f"train_{recipe}.json")
    rows, summ = t.get("metrics") or [], t.get("summary") or {}
    if rows:
        steady = [r for r in rows if not r.get("compile_s")] or rows
        med = lambda k: statistics.median(r[k] for r in steady) if all(r.get(k) is not None for r in steady) else None
        s["train"][recipe] = {
            "epochs": len(rows), "dataset": summ.get("dataset"), "active": summ.get("active"),
            "loader": (t.get("resolved") or {}).get("loader"), "batch_size": (t.get("resolved") or {}).get(
                "global_batch_size"), "first_epoch_time_s": rows[0]["epoch_time_s"], "compile_s": summ.get("compile_s"),
            "epoch_time_s": med("epoch_time_s"), "train_time_s": med("train_time_s"),
            "images_per_s": med("train_images_per_s"), "achieved_tflops": med("achieved_tflops"), "mfu": med("mfu"),
            "checkpoint_s_per_save": summ["checkpoint_time_s"] / summ["checkpoints"] if summ.get("checkpoints") else None,
            "best_test_acc": summ.get("best_test_acc"), "headline": summ.get("headline"),
            "best_test_acc_no_tta": summ.get("best_test_acc_no_tta")}
w = s["train"].get("worksheet", {})
if w.get("epoch_time_s") and not env.get("smoke"):
    s["reference"]["speedup_vs_report"] = round(44.0 / w["epoch_time_s"], 1)
records = [json.loads(l) for l in open(sys.argv[3]).read().splitlines()]  # each benchmark as it finished
for r in records:
    x = r["extra_info"]
    s["benchmarks"][r["name"]] = {k: x[k] for k in (
        "images_per_s_median", "seconds_median", "ms_per_step_median", "mfu", "achieved_tflops", "overhead_pct_vs_off",
        "overhead_pct_vs_off_best", "loader", "dtype", "batch_size", "compile", "cuda_graphs", "graph_captured",
        "augment") if k in x}
notes = [] if env.get("dali") else ["DALI is not installed: the torch loader was used and timed"]
notes += [] if env.get("wandb") else ["wandb is not installed: the runs used --wandb off (as they always do here)"]
if records and "benchmarks" not in load("benchmarks.json"):
    notes.append("benchmarks stopped at the time limit: benchmarks.json was not written; the finished ones are here")
s["notes"] = notes
json.dump(s, open(out / "summary.json", "w"), indent=1)
print(json.dumps({k: s[k] for k in ("device", "correctness", "train", "reference", "notes")}, indent=1))
EOF
log "done in ${SECONDS}s: $OUT/summary.json"
