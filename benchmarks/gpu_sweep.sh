#!/usr/bin/env bash
# The fast recipe's grid of variants x seeds on the full CIFAR-10, within 8 minutes:  benchmarks/gpu_sweep.sh OUT_DIR
# Writes OUT_DIR/sweep.json (every finished run, and per variant the mean and spread over seeds; see
# benchmarks/gpu_sweep.py for the grid) and OUT_DIR/gpu_sweep.log. Installs from .whl/ and .dali1-4/ and builds
# CIFAR-10 from .gpu/ like gpu_evidence.sh. Environment: GPU_SWEEP_BUDGET (seconds after which no run starts,
# default 400), GPU_SWEEP_SEEDS (default 3), GPU_SWEEP_VARIANTS (comma-separated subset), GPU_SWEEP_SMOKE=1 (tiny
# synthetic runs: the plumbing, on a CPU), plus gpu_evidence.sh's PYTHON, DATA_DIR, GPU_CHECK_ASSETS.
set -u
OUT=${1:?usage: benchmarks/gpu_sweep.sh OUT_DIR}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit 1
REPO=$(cd "$(dirname "$0")/.." && pwd) && cd "$REPO" || exit 1
DEADLINE=$((SECONDS + 470))
exec > >(tee -a "$OUT/gpu_sweep.log") 2>&1
SKIP_DATA=${GPU_SWEEP_SMOKE:-0} . "$REPO/benchmarks/gpu_env.sh"
ARGS=(--budget "${GPU_SWEEP_BUDGET:-400}" --seeds "${GPU_SWEEP_SEEDS:-3}")
[ -n "${GPU_SWEEP_VARIANTS:-}" ] && ARGS+=(--variants "$GPU_SWEEP_VARIANTS")
if [ "${GPU_SWEEP_SMOKE:-0}" = 1 ]; then
  ARGS+=(--smoke)
elif [ "$HAVE_DATA" = 1 ]; then
  ARGS+=(--data-dir "$DATA_DIR")
else
  record sweep skipped 0 "no CIFAR-10 in $DATA_DIR and no $ASSETS/cifar10_jpeg.npz + build.py"; exit 1
fi
run sweep "$(budget 600 0)" "$PY" "$REPO/benchmarks/gpu_sweep.py" "$OUT" "${ARGS[@]}"
rc=$?
log "done in ${SECONDS}s: $OUT/sweep.json"
exit $rc
