#!/usr/bin/env bash
# DDP overhead with gloo on the CPU: the same global batch trained by 1 process and by 2 (torchrun), and the
# 2-process per-rank batch alone in 1 process (what DDP adds over the same work). Synthetic data, 2 epochs of
# 4 steps, no monitoring; prints each run's steady training images/s from its summary.json.
#   benchmarks/ddp_overhead.sh OUT_DIR [GLOBAL_BATCH]      (OMP_NUM_THREADS=1 per process)
set -euo pipefail
out=${1:?usage: ddp_overhead.sh OUT_DIR [GLOBAL_BATCH]}; batch=${2:-64}; half=$((batch / 2))
py=${PYTHON:-python}; torchrun=${TORCHRUN:-$(dirname "$(command -v "$py")")/torchrun}
flags=(--dataset synthetic --synthetic-size $((batch * 4)) --epochs 2 --no-monitor --wandb off --no-report
       --progress off --device cpu)
export OMP_NUM_THREADS=1 WANDB_MODE=disabled
"$py" -m fastcifar train "${flags[@]}" --batch-size "$batch" --run-dir "$out/one_x$batch" > "$out/one_x$batch.log"
"$py" -m fastcifar train "${flags[@]}" --batch-size "$half" --run-dir "$out/one_x$half" > "$out/one_x$half.log"
"$torchrun" --standalone --nproc_per_node 2 -m fastcifar train "${flags[@]}" --batch-size "$half" \
    --run-dir "$out/two_x$half" > "$out/two_x$half.log"
for run in "one_x$batch" "one_x$half" "two_x$half"; do
    "$py" -c "import json, sys; s = json.load(open(sys.argv[1])); print(sys.argv[2], 'images/s', \
round(s['mean_train_images_per_s'], 1), 'epoch train s', round(s['mean_train_time_s'], 2))" \
        "$out/$run/summary.json" "$run"
done
