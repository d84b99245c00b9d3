#!/usr/bin/env bash
# Headline numbers on one NVIDIA GPU in under 8 minutes:  benchmarks/gpu_check.sh OUT_DIR
# Writes env.json, flops.json, train_worksheet.json, train_fast.json, benchmarks.json, gpu_check.log and summary.json
# (headline numbers + each step's status) to OUT_DIR. Each step is bounded by `timeout`; a failed step is recorded
# and the script goes on. The package is used from this tree (PYTHONPATH): no install needed.
# Environment: PYTHON (default python3); DATA_DIR (holds cifar-10-batches-py/; default OUT_DIR/../data when that
# has it, else .gpu/data, built from .gpu/cifar10_jpeg.npz + .gpu/build.py when those are there); GPU_CHECK_ASSETS
# (that folder, default .gpu); GPU_CHECK_BUDGET (seconds, default 450); GPU_CHECK_KEEP_RUNS=1 keeps the run
# directories (~90 MB of checkpoints each); GPU_CHECK_SMOKE=1: tiny sizes, to check the plumbing on a CPU.
set -u
OUT=${1:?usage: benchmarks/gpu_check.sh OUT_DIR}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit 1
REPO=$(cd "$(dirname "$0")/.." && pwd) && cd "$REPO" || exit 1
PY=${PYTHON:-python3} SMOKE=${GPU_CHECK_SMOKE:-0} ASSETS=${GPU_CHECK_ASSETS:-$REPO/.gpu}
DEADLINE=$((SECONDS + ${GPU_CHECK_BUDGET:-450}))
STEPS=$(mktemp) RESULTS=$(mktemp)  # step statuses; benchmark records as each finishes
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" WANDB_MODE=disabled FASTCIFAR_BENCH_RESULTS=$RESULTS
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
log() { echo "[gpu_check $(date +%T) +${SECONDS}s] $*"; }
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "${4:-}" >>"$STEPS"; log "$1: $2 ${4:-}"; }
budget() { local b=$(($1 < DEADLINE - SECONDS - $2 ? $1 : DEADLINE - SECONDS - $2)); echo $((b > 0 ? b : 0)); }
# run NAME LIMIT CMD...: SIGINT at the limit, SIGKILL 20 s later; the status goes to summary.json.
run() {
  local name=$1 limit=$2 start=$SECONDS rc; shift 2
  if [ "$limit" -lt 10 ]; then record "$name" skipped 0 "no time left in the budget"; return 1; fi
  log "$name: start (limit ${limit}s)"
  timeout -s INT -k 20 "$limit" "$@"; rc=$?
  case $rc in
    0) record "$name" ok $((SECONDS - start)) ;;
    124|130|137) record "$name" timeout $((SECONDS - start)) "stopped at the ${limit}s limit" ;;
    *) record "$name" "failed (exit $rc)" $((SECONDS - start)) ;;
  esac
  return $rc
}

log "repo $REPO, out $OUT, python $PY, smoke=$SMOKE"
# Offline machines: fvcore & co (and pytest, pytest-benchmark, py-cpuinfo if missing) may come as wheels in .whl/.
if compgen -G "$REPO/.whl/*.whl" >/dev/null; then
  run wheels 120 "$PY" -m pip install -q --upgrade --no-index --no-deps --target /tmp/site "$REPO"/.whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PYTHONPATH
fi

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

if "$PY" -c "import fvcore" 2>/dev/null; then
  run flops 120 bash -c '"$0" -m fastcifar flops --verify --json >"$1"' "$PY" "$OUT/flops.json"
else
  echo '{"skipped": "fvcore not installed"}' >"$OUT/flops.json"; record flops skipped 0 "fvcore not installed"
fi

# CIFAR-10 for the real-data runs.
if [ -z "${DATA_DIR:-}" ]; then
  DATA_DIR=$ASSETS/data
  [ -f "$OUT/../data/cifar-10-batches-py/data_batch_1" ] && DATA_DIR=$(cd "$OUT/../data" && pwd)
fi
if [ ! -f "$DATA_DIR/cifar-10-batches-py/data_batch_1" ] && [ -f "$ASSETS/cifar10_jpeg.npz" ] \
   && [ -f "$ASSETS/build.py" ]; then
  mkdir -p "$DATA_DIR" && run data 120 "$PY" "$ASSETS/build.py" "$DATA_DIR"
fi
if [ -f "$DATA_DIR/cifar-10-batches-py/data_batch_1" ]; then
  DATA=(--data-dir "$DATA_DIR" --no-download)
elif [ "$SMOKE" = 1 ]; then
  DATA=(--dataset synthetic --synthetic-size 64); record data synthetic 0 "no CIFAR-10 in $DATA_DIR: SYNTHETIC data"
else
  DATA=(); record data skipped 0 "no CIFAR-10 in $DATA_DIR, no $ASSETS/cifar10_jpeg.npz + build.py: no real-data runs"
fi

# A few epochs of each recipe as a user runs them (epoch 1 includes torch.compile: summary.json reports both).
EPOCHS=3 SMALL=()
[ "$SMOKE" = 1 ] && EPOCHS=1 SMALL=(--train-subset 64 --test-subset 32 --batch-size 32 --eval-batch-size 32)
for recipe in worksheet fast; do
  [ ${#DATA[@]} -eq 0 ] && break
  rm -rf "$OUT/run-$recipe"  # the worksheet run leaves 200 s of the budget for the fast run and the benchmarks
  run "train_$recipe" "$(budget 150 $([ $recipe = worksheet ] && echo 200 || echo 120))" "$PY" -m fastcifar train \
    --recipe "$recipe" --epochs "$EPOCHS" "${DATA[@]}" "${SMALL[@]}" --wandb off --progress off --no-report \
    --run-dir "$OUT/run-$recipe"
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
  B=benchmarks/bench_train.py K=()
  [ "$SMOKE" = 1 ] && K=(-k "not batch512 and not contiguous and not fast") && export FASTCIFAR_BENCH_TRAIN_IMAGES=128 \
    FASTCIFAR_BENCH_EVAL_IMAGES=128 FASTCIFAR_BENCH_ROUNDS=1 FASTCIFAR_BENCH_STEP_ROUNDS=1 \
    FASTCIFAR_BENCH_STEP_BATCH=32 FASTCIFAR_BENCH_IMAGES=256
  run benchmarks "$(budget 400 15)" "$PY" -m pytest -p no:cacheprovider -q "$B::test_epoch" "$B::test_monitoring" \
    "$B::test_eval" benchmarks/bench_loaders.py "$B::test_step" "${K[@]}" --benchmark-only \
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
s = {"wall_s": int(sys.argv[4]), "device": env.get("gpu") or "cpu (no CUDA)", "env": env, "steps": steps,
     "flops": {k: v for k, v in fl.items() if k in ("verified", "forward_flops", "forward_backward_flops",
                                                    "training_flops_per_epoch", "skipped", "missing")},
     "reference": {"report_epoch_time_s": 44.0, "report_best_test_acc": 0.9197}, "train": {}, "benchmarks": {}}
for recipe in ("worksheet", "fast"):
    t = load(f"train_{recipe}.json")
    rows, summ = t.get("metrics") or [], t.get("summary") or {}
    if rows:
        steady = rows[1:] or rows  # the first epoch carries torch.compile
        med = lambda k: statistics.median(r[k] for r in steady) if all(r.get(k) is not None for r in steady) else None
        s["train"][recipe] = {"epochs": len(rows), "dataset": summ.get("dataset"), "active": summ.get("active"),
                              "first_epoch_time_s": rows[0]["epoch_time_s"], "epoch_time_s": med("epoch_time_s"),
                              "train_time_s": med("train_time_s"), "images_per_s": med("train_images_per_s"),
                              "achieved_tflops": med("achieved_tflops"), "mfu": med("mfu"),
                              "best_test_acc": summ.get("best_test_acc")}
w = s["train"].get("worksheet", {})
if w.get("epoch_time_s") and not env.get("smoke"):
    s["reference"]["speedup_vs_report"] = round(44.0 / w["epoch_time_s"], 1)
records = [json.loads(l) for l in open(sys.argv[3]).read().splitlines()]  # each benchmark as it finished
for r in records:
    x = r["extra_info"]
    s["benchmarks"][r["name"]] = {k: x[k] for k in ("images_per_s_median", "seconds_median", "ms_per_step_median",
                                                    "mfu", "overhead_pct_vs_off", "overhead_pct_vs_off_best", "loader",
                                                    "dtype") if k in x}
notes = [] if env.get("dali") else ["DALI is not installed: the torch loader was used and timed"]
notes += [] if env.get("wandb") else ["wandb is not installed: the runs used --wandb off (as they always do here)"]
if records and "benchmarks" not in load("benchmarks.json"):
    notes.append("benchmarks stopped at the time limit: benchmarks.json was not written; the finished ones are here")
s["notes"] = notes
json.dump(s, open(out / "summary.json", "w"), indent=1)
print(json.dumps({k: s[k] for k in ("device", "train", "reference", "notes")}, indent=1))
EOF
log "done in ${SECONDS}s: $OUT/summary.json"
rm -f "$STEPS" "$RESULTS"
