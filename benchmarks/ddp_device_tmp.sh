set -x
export WANDB_MODE=disabled PYTHONPATH=$PWD
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 150 benchmarks/ddp_overhead.sh $OUT 64 2>&1 | tail -5
for spec in "512 auto" "64 auto" "64 off"; do set -- $spec
  timeout 110 python -m fastcifar train --recipe fast --dataset synthetic --synthetic-size 50000 --epochs 2 --batch-size $1 --cuda-graphs $2 --no-report --wandb off --progress off --no-monitor --run-dir $OUT/gpu_b$1_$2 > $OUT/gpu_b$1_$2.log 2>&1
  tail -4 $OUT/gpu_b$1_$2.log; grep "^epoch\|active" $OUT/gpu_b$1_$2.log
done
