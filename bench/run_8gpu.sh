#!/usr/bin/env bash
# Issue 8 on nvidia-h200-x8: everything it asks for, split into stages that each fit one 10-minute device call.
#   STAGES="checks overlap" bash bench/run_8gpu.sh
#   STAGES="train-8b-tp8" | "train-8b-tp4dp2" | "train-70b-tp8" | "train-70b-tp4dp2" bash bench/run_8gpu.sh
# checks:   the GPU checks of the core (TP=8), ZeRO (TP=4 x DP=2), extension and fused-kernel issues at world 8
# overlap:  bench/bench_tp_overlap.py at TP=8 on the Llama-3-70B projections
# train-*:  bench/bench_train.py --provider all, 8 layers of the named shape (carry .whl for DeepSpeed)
# Logs and CSVs under $OUT; a short summary last.
set -u
RES=${OUT:-/tmp/8gpu_out}
mkdir -p "$RES"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 AUTOTP_FUSED_TIMEOUT_S=${AUTOTP_FUSED_TIMEOUT_S:-60}
STAGES=" ${STAGES:-checks overlap} "
nvidia-smi --query-gpu=name --format=csv,noheader | sort | uniq -c
source bench/gpu_setup.sh
install_deepspeed_wheels
build_extensions
gpu_check() {  # script, seconds, [args]
  local name; name=$(basename "$1" .py)
  timeout "$2" torchrun --standalone --nproc_per_node=8 "$1" ${3:-} > "$RES/$name.txt" 2>&1
  echo "$name (8 GPUs): exit $?, $(grep -cE 'OK$' "$RES/$name.txt") OK, $(grep -cE 'FAIL' "$RES/$name.txt") FAIL"
  grep -E "FAIL|ALL OK|SOME FAILED|Error" "$RES/$name.txt" | head -5
}
if [[ $STAGES == *" checks "* ]]; then
  gpu_check tests/gpu/nccl_core_check.py 120
  gpu_check tests/gpu/zero_nccl_check.py 150
  gpu_check tests/gpu/nccl_ext_check.py 90
  gpu_check tests/gpu/fused_check.py 150 kernels
fi
if [[ $STAGES == *" overlap "* ]]; then
  timeout 300 torchrun --standalone --nproc_per_node=8 bench/bench_tp_overlap.py --out "$RES" --models llama3-70b \
    > "$RES/bench_w8.txt" 2>&1
  echo "bench_tp_overlap (8 GPUs): exit $?"; grep -E "^llama|Error" "$RES/bench_w8.txt" | head -30
fi
train() {  # shape tp zero seconds
  timeout "$4" python3 bench/bench_train.py --provider all --shape "$1" --tp "$2" --gpus 8 --zero "$3" --steps 10 \
    --warmup 3 --vocab-parallel --csv "$RES/train_8gpu.csv" > "$RES/log_$1_tp$2_z$3.txt" 2>&1
  grep -h "PHASES\|Error" "$RES/log_$1_tp$2_z$3.txt" | head -8
}
[[ $STAGES == *" train-8b-tp8 "* ]] && train llama3-8b 8 1 560
[[ $STAGES == *" train-8b-tp4dp2 "* ]] && train llama3-8b 4 2 560
[[ $STAGES == *" train-70b-tp8 "* ]] && train llama3-70b 8 1 560
[[ $STAGES == *" train-70b-tp4dp2 "* ]] && train llama3-70b 4 2 560
[ -f "$RES/train_8gpu.csv" ] && python3 bench/print_csv.py "$RES/train_8gpu.csv" provider shape tp dp zero step_s \
  tokens_per_s_per_gpu peak_mem_gb first_losses
exit 0
