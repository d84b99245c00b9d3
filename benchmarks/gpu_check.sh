#!/usr/bin/env bash
# The former headline check, now part of the evidence run: benchmarks/gpu_check.sh OUT_DIR [--from STAGE] runs
# benchmarks/gpu_evidence.sh (same arguments; see its header). Kept so existing instructions still work.
exec bash "$(dirname "$0")/gpu_evidence.sh" "$@"
