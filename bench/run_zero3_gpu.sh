#!/usr/bin/env bash
# nvidia-h200-x2, one device call (issue 22): ZeRO stage 3 (FSDP2 under autotp) next to stage 2 and next to
# PyTorch's own FSDP2 (bench_train.py --provider fsdp2, torchtitan's recipe) in one job, at DP=2 and, for the
# memory trend, at DP=1. Llama-3-8B shape, 8 layers, seq 4096, micro-batch 1, bf16 compute, fp32 masters.
set -u
RES=${OUT:-/tmp/zero3_out}
mkdir -p "$RES"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
source bench/gpu_setup.sh
nvidia-smi --query-gpu=name --format=csv,noheader | head -1
build_extensions
CSV="$RES/train_zero3.csv"
COMMON="--steps ${STEPS:-8} --warmup 3 --csv $CSV"
row() {  # label, nproc, bench_train arguments
  local label=$1 n=$2; shift 2
  timeout ${LIMIT:-90} torchrun --standalone --nproc_per_node=$n bench/bench_train.py "$@" $COMMON \
    > "$RES/log_$label.txt" 2>&1 || { echo "FAILED $label"; grep -v -i warn "$RES/log_$label.txt" | tail -3; }
}
row autotp_z2_dp2 2 --provider autotp --tp 1 --zero 2
row autotp_z3_dp2 2 --provider autotp --tp 1 --zero 3
row fsdp2_dp2 2 --provider fsdp2 --tp 1 --zero 3
row autotp_z3_dp1 1 --provider autotp --tp 1 --zero 3
row fsdp2_dp1 1 --provider fsdp2 --tp 1 --zero 3
python3 bench/print_csv.py "$CSV" provider tp dp zero step_s host_s tokens_per_s_per_gpu peak_mem_gb static_mem_gb first_losses
