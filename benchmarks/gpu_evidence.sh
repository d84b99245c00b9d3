#!/usr/bin/env bash
# Every open claim in one GPU command:  benchmarks/gpu_evidence.sh OUT_DIR [--from STAGE]
#
# Stages, in value order (each writes its files into OUT_DIR, then summary.json and summary.md are rewritten from
# everything there, so a kill at any point keeps every finished answer; benchmarks/evidence_summary.py):
#   1 env          env.json (card, driver, torch, CUDA, cuDNN, DALI, commit), flops.json (fastcifar flops)
#   2 correctness  the CUDA-only tests, compiled at batch 128 (the worksheet run's, which then hits the compile
#                  cache): loaders on a busy GPU (bf16 synced, fp32 unsynchronised), captured vs eager step
#   3 worksheet    the worksheet recipe, all 25 epochs, full CIFAR-10, DALI when present (run-worksheet/)
#   4 fast         the fast recipe, seeds 0,1,2 x 15 epochs in one process (run-fast/seed-K/)
#   5 benchmarks   the epoch per loader (torch, DALI) at batch 128 and 512, monitoring on/off, step modes
#   6 profile      fastcifar train --profile at batch 128 (worksheet) and 512 (fast) (profile-b128/, -b512/)
# --from STAGE starts at that stage (a second call for what the first one's budget left out); env is recorded
# anyway where OUT_DIR has no env.json, so every call's figures name their machine and code.
#
# Budget: EVIDENCE_BUDGET seconds (default 480, and never more than 540 minus the set-up's time: the lent
# machines allow 10 minutes a command and one is kept spare), counted from the END of set-up (wheels, DALI's
# parts, CIFAR-10 built: gpu_env.sh). Each stage's limit includes its stop grace (gpu_env.sh's run), so the
# limits add up to the budget; a stage starts only with at least 10 s left, else it is recorded as skipped.
#
# How the budget is split, from `fastcifar flops`: a training image costs 3.33 GFLOP (forward 1.11, backward
# 2.22), so a 50,000-image epoch is 166 TFLOP and a 10,000-image test pass 11 TFLOP (22 with flip TTA). An H100
# SXM does 989 dense bf16 TFLOP/s; the targets (1.0 s / 0.5 s per epoch at batch 128 / 512) are 17 % / 34 % MFU.
# Budgeted at 1.5x those times, plus measured-elsewhere fixed costs (imports + data + DALI build ~15 s per
# process, torch.compile of one model graph ~30-60 s cold, a few s from the cache):
#   env           30 s   imports, nvidia-smi, flops (--verify: fvcore's count too)
#   correctness   90 s   compile at batch 128 (~60 s) + 100 steps x 0.43 TFLOP + busy-GPU matmuls (~20 TFLOP)
#   worksheet    150 s   25 x 177 TFLOP = 4.4 PFLOP: 30 s at 15 % MFU, x1.5 = 45 s; + eval compile (batch 1000)
#                        ~40 s + start-up 15 s + checkpoints (<= 5 % of training, --save-every auto)
#   fast         150 s   45 x 188 TFLOP = 8.5 PFLOP: 29 s at 30 % MFU, x1.5 = 43 s; + compile at batch 512 once
#                        ~60 s + start-up 15 s + 3 captures
#   benchmarks   what is left after keeping the profile's 80 s, up to 150 s: 4 epoch benchmarks x 4 epochs
#                        (~1-2 s each) + one compile each from the cache; the step modes last (each compiles)
#   profile       80 s   two short runs (32 steps each, compile cache warm), 20 profiled steps each
# Stages 1-4 (420 s) fit in the first call with room to spare if the estimates hold; the benchmarks stage leaves
# the profile its 80 s (small, and what the speed work after this run is studied from), and `--from benchmarks`
# in a second call (EVIDENCE_BUDGET=whatever that call has) finishes what was skipped.
#
# Environment: PYTHON, DATA_DIR, GPU_CHECK_ASSETS (see gpu_env.sh); EVIDENCE_BUDGET; EVIDENCE_KEEP_CHECKPOINTS=1
# keeps the runs' .pt files (removed by default: 130 MB each, and the numbers are in the run's JSON files);
# EVIDENCE_SMOKE=1: every stage at tiny sizes on synthetic data (the plumbing, on a CPU, in about a minute).
# EVIDENCE_COMMIT: the commit to record where the tree has no .git (a copied work tree); env.json also records
# source_sha256, a hash of the tracked sources that `git` can reproduce here for any commit (see benchmarks/README).
# EVIDENCE_RETURN=DIR: after every stage, DIR gets summary.md, summary.json, gpu_evidence.log, evidence.tgz (all of
# OUT but the checkpoints and the profiles) and profile-b128.tgz, profile-b512.tgz: six files, for a machine that
# brings back only a few files from one folder (the lent GPU machines: 8 files, 16 MiB each).
set -u
OUT=${1:?usage: benchmarks/gpu_evidence.sh OUT_DIR [--from STAGE]}
FROM=env
[ "${2:-}" = "--from" ] && FROM=${3:?--from needs a stage: env correctness worksheet fast benchmarks profile}
STAGES=(env correctness worksheet fast benchmarks profile)
case " ${STAGES[*]} " in *" $FROM "*) ;; *) echo "unknown stage $FROM: one of ${STAGES[*]}" >&2; exit 2 ;; esac
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit 1
if [ -n "${EVIDENCE_RETURN:-}" ] && [ "$(mkdir -p "$EVIDENCE_RETURN" && cd "$EVIDENCE_RETURN" && pwd)" = "$OUT" ]; then
  echo "EVIDENCE_RETURN must be another folder than OUT_DIR ($OUT): it receives a packed copy of OUT_DIR" >&2
  exit 2
fi
REPO=$(cd "$(dirname "$0")/.." && pwd) && cd "$REPO" || exit 1
SMOKE=${EVIDENCE_SMOKE:-0}
exec > >(tee -a "$OUT/gpu_evidence.log") 2>&1
SKIP_DATA=$SMOKE . "$REPO/benchmarks/gpu_env.sh"  # set-up: wheels, DALI, CIFAR-10 (its own time limits)
SETUP_S=$SECONDS
BUDGET=${EVIDENCE_BUDGET:-480}
[ "$BUDGET" -gt $((540 - SETUP_S)) ] && BUDGET=$((540 - SETUP_S))
DEADLINE=$((SECONDS + BUDGET))
export FASTCIFAR_BENCH_RESULTS=$OUT/benchmarks.jsonl
log "repo $REPO, out $OUT, python $PY, smoke=$SMOKE, set-up ${SETUP_S}s, budget ${BUDGET}s from now, from $FROM"

wanted() {  # wanted STAGE: at or after --from
  local s; for s in "${STAGES[@]}"; do [ "$s" = "$FROM" ] && return 0; [ "$s" = "$1" ] && return 1; done
}
summarise() { "$PY" "$REPO/benchmarks/evidence_summary.py" "$OUT" || log "summary failed"; bring_back; }
bring_back() {  # EVIDENCE_RETURN: a few whole files, each replaced atomically, so a kill leaves the last good set
  local dest=${EVIDENCE_RETURN:-} d inside=()
  [ -n "$dest" ] || return 0
  dest=$(mkdir -p "$dest" && cd "$dest" && pwd) || return 0
  case "$dest/" in "$OUT"/*) inside=(--exclude="./${dest#"$OUT"/}") ;; esac  # never pack the packs
  for f in summary.md summary.json gpu_evidence.log; do
    [ -f "$OUT/$f" ] && cp "$OUT/$f" "$dest/.$f" && mv "$dest/.$f" "$dest/$f"
  done
  # exit 1 is GNU tar's "a file changed as it was read" (the log being appended): the archive is still whole
  tar czf "$dest/.evidence.tgz" --warning=no-file-changed -C "$OUT" --exclude='*.pt' --exclude='./profile-b*' \
    "${inside[@]}" .
  if [ $? -le 1 ]; then mv "$dest/.evidence.tgz" "$dest/evidence.tgz"; else rm -f "$dest/.evidence.tgz"; fi
  for d in "$OUT"/profile-b*/; do
    [ -d "$d" ] || continue
    d=$(basename "$d")
    tar czf "$dest/.$d.tgz" --warning=no-file-changed -C "$OUT" --exclude='*.pt' "$d"
    if [ $? -le 1 ]; then mv "$dest/.$d.tgz" "$dest/$d.tgz"; else rm -f "$dest/.$d.tgz"; fi
  done
}
drop_checkpoints() { [ "${EVIDENCE_KEEP_CHECKPOINTS:-0}" = 1 ] || find "$OUT" -name '*.pt' -delete; }

if [ "$SMOKE" = 1 ]; then
  DATA=(--dataset synthetic --synthetic-size 32); record data synthetic 0 "SMOKE: synthetic data"
elif [ "$HAVE_DATA" = 1 ]; then
  DATA=(--data-dir "$DATA_DIR" --no-download)
else
  DATA=(); record data missing 0 "no CIFAR-10 in $DATA_DIR and no $ASSETS/cifar10_jpeg.npz + build.py: no training"
fi
TRAIN=("$PY" -m fastcifar train --wandb off --progress off --no-report)
WS_EPOCHS=25 FAST_EPOCHS=15 SMALL=() SMALL_FAST=()
if [ "$SMOKE" = 1 ]; then  # tiny and eager: the plumbing, not the numbers
  WS_EPOCHS=2 FAST_EPOCHS=2 SMALL=(--batch-size 16 --eval-batch-size 16 --no-monitor) SMALL_FAST=(--warmup-epochs 1)
fi

if wanted env || [ ! -f "$OUT/env.json" ]; then  # always recorded: a --from call's figures need their machine
  run env "$(budget 30 0)" "$PY" - "$OUT/env.json" "$SMOKE" <<'EOF'
import json, os, platform, shutil, subprocess, sys
def version(module):
    try:
        return __import__(module, fromlist=["_"]).__version__
    except Exception:
        return None
def cmd(*args):
    if shutil.which(args[0]):
        return subprocess.run(args, capture_output=True, text=True).stdout.strip() or None
sys.path.insert(0, "benchmarks")
from evidence_summary import source_sha256
import torch
cuda = torch.cuda.is_available()
env = {"nvidia_smi": cmd("nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"),
       "gpu": torch.cuda.get_device_name(0) if cuda else None, "torch": torch.__version__,
       "torch_cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(), "python": platform.python_version(),
       "dali": version("nvidia.dali"), "fvcore": version("fvcore"), "wandb": version("wandb"),
       "pytest_benchmark": version("pytest_benchmark"),
       "commit": os.environ.get("EVIDENCE_COMMIT") or cmd("git", "rev-parse", "--short", "HEAD"),
       "source_sha256": source_sha256("."),
       "cpu_count": os.cpu_count(), "smoke": sys.argv[2] == "1"}
json.dump(env, open(sys.argv[1], "w"), indent=1)
print(json.dumps(env))
from fastcifar.flops import run_flops  # the FLOP counts the budget split above is computed from
import argparse, contextlib, io
args = argparse.Namespace(input_size=32, stem="cifar", num_classes=10, batch_size=1, json=True,
                          verify=env["fvcore"] is not None)
text = io.StringIO()
with contextlib.redirect_stdout(text):
    run_flops(args)
open(os.path.join(os.path.dirname(sys.argv[1]), "flops.json"), "w").write(text.getvalue())
EOF
  summarise
fi

if wanted correctness && ! "$PY" -c "import pytest" 2>/dev/null; then
  record correctness skipped 0 "pytest not installed (put its wheels, with pytest-benchmark's, in .whl/)"
elif wanted correctness; then
  export FASTCIFAR_GPU_TEST_BATCH=128
  run correctness "$(budget 90 0)" "$PY" -m pytest -p no:cacheprovider -q -rs \
    -o addopts="" --junitxml "$OUT/correctness.xml" tests/test_loaders.py tests/test_step.py \
    -k "busy_gpu or unsynchronised or captured_step_matches" >"$OUT/correctness.log" 2>&1
  tail -5 "$OUT/correctness.log"
  summarise
fi

if wanted worksheet && [ ${#DATA[@]} -gt 0 ]; then
  rm -rf "$OUT/run-worksheet"
  run worksheet "$(budget 150 0)" "${TRAIN[@]}" --recipe worksheet --epochs "$WS_EPOCHS" "${DATA[@]}" \
    "${SMALL[@]}" --run-dir "$OUT/run-worksheet"
  drop_checkpoints
  summarise
fi

if wanted fast && [ ${#DATA[@]} -gt 0 ]; then
  rm -rf "$OUT/run-fast"
  if "${TRAIN[@]:0:4}" --help | grep -q -- --seeds; then  # one process: compiled once for the three seeds
    run fast "$(budget 150 0)" "${TRAIN[@]}" --recipe fast --epochs "$FAST_EPOCHS" --seeds 0,1,2 "${DATA[@]}" \
      "${SMALL[@]}" "${SMALL_FAST[@]}" --run-dir "$OUT/run-fast"
  else  # a fastcifar without --seeds: one process per seed (each compiles again)
    record fast_seeds_flag missing 0 "fastcifar train has no --seeds: one process per seed"
    mkdir -p "$OUT/run-fast"
    for seed in 0 1 2; do
      run "fast_seed$seed" "$(budget $((150 / 3)) 0)" "${TRAIN[@]}" --recipe fast --epochs "$FAST_EPOCHS" \
        --seed "$seed" "${DATA[@]}" "${SMALL[@]}" "${SMALL_FAST[@]}" --run-dir "$OUT/run-fast/seed-$seed"
    done
  fi
  drop_checkpoints
  summarise
fi

if wanted benchmarks; then
  if "$PY" -c "import pytest_benchmark" 2>/dev/null; then
    B=benchmarks/bench_train.py
    # pytest runs them in file order: the epochs per loader first (the DALI / torch ratio), the step modes last
    K="test_epoch or test_monitoring or (test_step and channels_last and bf16) or loader_throughput"
    if [ "$SMOKE" = 1 ]; then
      export FASTCIFAR_BENCH_STEP_ROUNDS=1 FASTCIFAR_BENCH_STEP_BATCH=8
      K="test_step and eager and channels_last and fp32"  # a CPU epoch at batch 128 alone takes ~10 s
    fi
    run benchmarks "$(budget 150 80)" "$PY" -m pytest -p no:cacheprovider -q "$B::test_epoch" "$B::test_monitoring" \
      "$B::test_step" benchmarks/bench_loaders.py -k "$K" --benchmark-only --benchmark-json "$OUT/benchmarks.json"
  else
    record benchmarks skipped 0 "pytest-benchmark not installed (put it, py-cpuinfo and pytest as wheels in .whl/)"
  fi
  summarise
fi

if wanted profile && [ ${#DATA[@]} -gt 0 ]; then
  # 32 steps: 3 warm-up + capture, 1 + 2 profiler warm-up, 20 profiled (SMOKE: 6 steps, 2 profiled)
  for spec in "worksheet 128 4096" "fast 512 16384"; do
    set -- $spec
    rm -rf "$OUT/profile-b$2"
    if [ "$SMOKE" = 1 ]; then
      ARGS=(--dataset synthetic --synthetic-size 48 --batch-size 8 --eval-batch-size 24 --no-monitor --profile 2)
    else
      ARGS=("${DATA[@]}" --batch-size "$2" --train-subset "$3" --test-subset 1000 --no-monitor --profile 20)
    fi
    run "profile_b$2" "$(budget 40 0)" "${TRAIN[@]}" --recipe "$1" --epochs 1 --warmup-epochs 0 "${ARGS[@]}" \
      --run-dir "$OUT/profile-b$2"
    drop_checkpoints
  done
  summarise
fi

summarise
log "done in ${SECONDS}s (set-up ${SETUP_S}s): $OUT/summary.md"
cat "$OUT/summary.md"
bring_back  # once more, so the log brought back shows the end
