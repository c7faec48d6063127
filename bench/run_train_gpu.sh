#!/usr/bin/env bash
# Training throughput on the H200 machine (nvidia-h200-x4), Llama-3-8B shape, 8 layers, seq 4096, bf16.
#   MODE=features bash bench/run_train_gpu.sh   TP=4 ZeRO-1: vocab-parallel loss and sequence parallelism off/on,
#                                               and kernels torch vs triton (the sequence-parallel issue)
#   MODE=peers bash bench/run_train_gpu.sh      --provider all for TP4 ZeRO-1, TP2 ZeRO-1, TP2 x DP2 ZeRO-2, with
#                                               autotp's chosen features and a profile of one autotp step
#   MODE=autotp bash bench/run_train_gpu.sh     the same without single and DeepSpeed (a second device call)
# DeepSpeed comes from the wheels in .whl/ (see ../shared/GPU.md). Prints a short table last.
set -u
RES=${OUT:-/tmp/train_out}
mkdir -p "$RES"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
STEPS=${STEPS:-10}
FEATURES=${FEATURES:---vocab-parallel}  # the defaults chosen by MODE=features (bench/results/README.md)
source bench/gpu_setup.sh
install_deepspeed_wheels
nvidia-smi --query-gpu=name --format=csv,noheader | head -1
build_extensions
run() {  # label, then bench_train arguments
  local label=$1; shift
  timeout 170 torchrun --standalone --nproc_per_node=4 bench/bench_train.py --provider autotp --tp 4 --zero 1 \
    --steps "$STEPS" --warmup 3 --csv "$RES/train_features.csv" "$@" > "$RES/log_$label.txt" 2>&1
  grep -h RESULT "$RES/log_$label.txt" > /dev/null || { echo "FAILED $label"; tail -4 "$RES/log_$label.txt"; }
}
if [ "${MODE:-features}" = features ]; then
  run plain --kernels torch
  run vocab --kernels torch --vocab-parallel
  run seqpar --kernels torch --sequence-parallel
  run both --kernels torch --vocab-parallel --sequence-parallel
  # The fused kernels' own bench (bench/run_tp_overlap_gpu.sh) decides whether this row is worth its minutes.
  [ "${TRITON_RUN:-1}" = 1 ] && run both_triton --kernels triton --vocab-parallel --sequence-parallel
  CSV="$RES/train_features.csv"
elif [ "${MODE}" = autotp ]; then
  # The rows a peers run left out when its providers used up the device call (DeepSpeed's runs take ~100-120 s
  # each): autotp in every configuration (profile and losses at TP=4), then DTensor, in the order they matter.
  timeout 150 python3 bench/bench_train.py --provider all --providers autotp --tp 4 --gpus 4 --zero 1 \
    --steps "$STEPS" --warmup 3 --csv "$RES/train_peers.csv" --losses-csv "$RES/train_peers_losses.csv" \
    --profile "$RES/profile_tp4.md" $FEATURES > "$RES/log_tp4.txt" 2>&1
  timeout 130 python3 bench/bench_train.py --provider all --providers autotp --tp 2 --gpus 4 --zero 2 \
    --steps "$STEPS" --warmup 3 --csv "$RES/train_peers.csv" $FEATURES > "$RES/log_tp2dp2.txt" 2>&1
  CUDA_VISIBLE_DEVICES=0,1 timeout 130 python3 bench/bench_train.py --provider all --providers autotp,dtensor \
    --tp 2 --gpus 2 --zero 1 --steps "$STEPS" --warmup 3 --csv "$RES/train_peers.csv" $FEATURES > "$RES/log_tp2.txt" 2>&1
  timeout 150 python3 bench/bench_train.py --provider all --providers dtensor --tp 4 --gpus 4 --zero 1 \
    --steps "$STEPS" --warmup 3 --csv "$RES/train_peers.csv" $FEATURES > "$RES/log_tp4_dtensor.txt" 2>&1
  grep -h PHASES "$RES"/log_*.txt
  CSV="$RES/train_peers.csv"
  cat "$RES/profile_tp4.md" 2>/dev/null
else
  # Each run builds the 2.8 B-parameter model on the CPU first (~5 s since the meta-device build) and imports its
  # provider: every configuration gets ~60 s per provider, all three fit one 600 s device call. The single-GPU row
  # is measured once.
  timeout 250 python3 bench/bench_train.py --provider all --tp 4 --gpus 4 --zero 1 --steps "$STEPS" --warmup 3 \
    --csv "$RES/train_peers.csv" --losses-csv "$RES/train_peers_losses.csv" --profile "$RES/profile_tp4.md" \
    $FEATURES > "$RES/log_tp4.txt" 2>&1
  timeout 140 python3 bench/bench_train.py --provider all --providers deepspeed,autotp --tp 2 --gpus 4 --zero 2 \
    --steps "$STEPS" --warmup 3 --csv "$RES/train_peers.csv" $FEATURES > "$RES/log_tp2dp2.txt" 2>&1
  CUDA_VISIBLE_DEVICES=0,1 timeout 180 python3 bench/bench_train.py --provider all --providers deepspeed,dtensor,autotp \
    --tp 2 --gpus 2 --zero 1 --steps "$STEPS" --warmup 3 --csv "$RES/train_peers.csv" $FEATURES > "$RES/log_tp2.txt" 2>&1
  CSV="$RES/train_peers.csv"
  cat "$RES/profile_tp4.md" 2>/dev/null
fi
python3 bench/print_csv.py "$CSV" provider tp dp zero kernels vocab_parallel sequence_parallel step_s host_s \
  tokens_per_s_per_gpu peak_mem_gb first_losses
