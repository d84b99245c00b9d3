# Sourced by gpu_evidence.sh and gpu_sweep.sh (bash): step bookkeeping with time limits, what the GPU machines lack
# installed from the folders ../shared/tools/device-pack.sh makes, and CIFAR-10 built from .gpu/.
# Expects OUT (an absolute output folder) and REPO, and SKIP_DATA=1 where synthetic data will do (smoke runs: no
# CIFAR-10 build); sets PY, ASSETS, DATA_DIR, HAVE_DATA, PYTHONPATH.
PY=${PYTHON:-python3} ASSETS=${GPU_CHECK_ASSETS:-$REPO/.gpu} STEPS=$OUT/.steps.tsv
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" WANDB_MODE=disabled PYTHONUNBUFFERED=1
: >"$STEPS"
log() { echo "[$(basename "$0") $(date +%T) +${SECONDS}s] $*"; }
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "${4:-}" >>"$STEPS"; log "$1: $2 ${4:-}"; }
# budget WANT RESERVE: WANT seconds, or what is left before DEADLINE minus RESERVE for the steps after this one
budget() { local b=$(($1 < DEADLINE - SECONDS - $2 ? $1 : DEADLINE - SECONDS - $2)); echo $((b > 0 ? b : 0)); }
# run NAME LIMIT CMD...: SIGINT before the limit, SIGKILL at it (the grace to stop cleanly, a sixth of the limit
# up to 15 s, is inside LIMIT, so budgets add up); the status goes to the summary.
run() {
  local name=$1 limit=$2 start=$SECONDS rc grace; shift 2
  if [ "$limit" -lt 10 ]; then record "$name" skipped 0 "no time left in the budget"; return 1; fi
  grace=$((limit / 6 < 15 ? limit / 6 : 15))
  log "$name: start (limit ${limit}s)"
  timeout -s INT -k "$grace" $((limit - grace)) "$@"; rc=$?
  case $rc in
    0) record "$name" ok $((SECONDS - start)) ;;
    124|130|137) record "$name" timeout $((SECONDS - start)) "stopped at the ${limit}s limit" ;;
    *) record "$name" "failed (exit $rc)" $((SECONDS - start)) ;;
  esac
  return $rc
}

# fvcore & co, pytest-benchmark if missing: wheels in .whl/. DALI: four parts in .dali1-4 (device-pack.sh --dali).
if compgen -G "$REPO/.whl/*.whl" >/dev/null; then
  run wheels 120 "$PY" -m pip install -q --upgrade --no-index --no-deps --target /tmp/site "$REPO"/.whl/*.whl
fi
if [ -f "$REPO/.dali4/unpack.sh" ]; then
  (cd "$REPO" && run dali 120 bash .dali4/unpack.sh)
fi
export PYTHONPATH=/tmp/site:$PYTHONPATH
if [ -f "$REPO/.dali4/unpack.sh" ]; then  # a DALI that does not import would only show as skipped tests: say so
  run dali_import 60 "$PY" -c "import nvidia.dali as d; print('nvidia.dali', d.__version__, d.__file__)"
fi

# CIFAR-10: DATA_DIR, else OUT/../data when it holds the files, else built from the carried npz into a folder
# outside the tree (inside .gpu/ it would make the next call's carry of .gpu exceed the 64 MiB a call takes).
if [ -z "${DATA_DIR:-}" ]; then
  DATA_DIR=${TMPDIR:-/tmp}/fastcifar-cifar10
  [ -f "$OUT/../data/cifar-10-batches-py/data_batch_1" ] && DATA_DIR=$(cd "$OUT/../data" && pwd)
fi
if [ "${SKIP_DATA:-0}" != 1 ] && [ ! -f "$DATA_DIR/cifar-10-batches-py/data_batch_1" ] \
   && [ -f "$ASSETS/cifar10_jpeg.npz" ] \
   && [ -f "$ASSETS/build.py" ]; then
  mkdir -p "$DATA_DIR" && run data 120 "$PY" "$ASSETS/build.py" "$DATA_DIR"
fi
HAVE_DATA=0
[ -f "$DATA_DIR/cifar-10-batches-py/data_batch_1" ] && HAVE_DATA=1
