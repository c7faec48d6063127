#!/usr/bin/env bash
# One device call for the ZeRO issue (nvidia-h200-x4): the NCCL correctness check, then Llama-3-8B-shaped
# 8 layers, seq 4096, bf16, TP2 x DP2: autotp ZeRO-0/1/2 and DeepSpeed ZeRO-1/2, 50 steps each, same data.
#   bash bench/run_zero_gpu.sh            (wheels for DeepSpeed in .whl/, see bench/results/README.md)
set -u
RES=${OUT:-/tmp/zero_out}
mkdir -p "$RES"
export PYTHONPATH=$PWD
STEPS=${STEPS:-50}
nvidia-smi --query-gpu=name --format=csv,noheader | head -1
timeout 240 torchrun --standalone --nproc_per_node=4 tests/gpu/zero_nccl_check.py 2>&1 \
  | grep -E "^zero|^resume|ALL OK|SOME FAILED|Error|error" | head -20
run() {  # provider zero [extra args]
  local provider=$1 zero=$2; shift 2
  timeout 150 torchrun --standalone --nproc_per_node=4 bench/bench_train.py --provider "$provider" --tp 2 \
    --zero "$zero" --steps "$STEPS" --warmup 5 --csv "$RES/train.csv" --losses-csv "$RES/zero_losses.csv" "$@" \
    > "$RES/log_${provider}_z${zero}.txt" 2>&1
  grep -h RESULT "$RES/log_${provider}_z${zero}.txt" || { echo "FAILED $provider zero=$zero"; tail -5 "$RES/log_${provider}_z${zero}.txt"; }
}
for zero in 0 1 2; do run autotp "$zero"; done
if ls .whl/deepspeed-*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=$PWD:/tmp/site
  for zero in 1 2; do run deepspeed "$zero"; done
fi
python3 bench/print_csv.py "$RES/train.csv" provider zero step_s tokens_per_s_per_gpu peak_mem_gb after_mem_gb first_losses
