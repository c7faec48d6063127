#!/usr/bin/env bash
# nvidia-h200-x2, one device call: issue 19's table re-measured in one job (Llama-3-8B shape, 8 layers, seq 4096,
# micro-batch 1, bf16): one GPU with fused AdamW, DeepSpeed AutoTP TP=2 ZeRO-1, PyTorch DTensor TP=2, autotp TP=2
# ZeRO-1 (the user's AdamW object, profiled; the config's optimizer; sequence parallelism), TP=1 x DP=2 ZeRO-2 for
# autotp and DeepSpeed. DeepSpeed from the wheels carried in .whl/. Prints the table last.
# The rows take ~11 minutes, more than one call's 10: GROUP=autotp runs the one-GPU row, autotp's and DTensor's;
# GROUP=deepspeed the one-GPU row again (each call's ratios are to its own) and DeepSpeed's two.
set -u
RES=${OUT:-/tmp/table_out}
mkdir -p "$RES"
export PYTHONUNBUFFERED=1
source bench/gpu_setup.sh
install_deepspeed_wheels
# PKG: a `git archive` of the package to measure (.bench_versions/<name>, carried), else the working tree.
export PYTHONPATH=${PKG:+$PWD/$PKG:}$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name --format=csv,noheader | head -1
build_extensions
CSV="$RES/train_table.csv"
STEPS=${STEPS:-10}
COMMON="--steps $STEPS --warmup 3 --csv $CSV"
row() {  # label, limit s, command...
  local label=$1 limit=$2; shift 2
  timeout "$limit" "$@" > "$RES/log_$label.txt" 2>&1 || { echo "FAILED $label"; grep -v -i warn "$RES/log_$label.txt" | tail -3; }
}
TR="torchrun --standalone --nproc_per_node=2 bench/bench_train.py"
row single 80 python3 bench/bench_train.py --provider single $COMMON
if [ "${GROUP:-autotp}" = autotp ]; then
  row autotp_object 90 $TR --provider autotp --tp 2 --zero 1 --vocab-parallel --optimizer object $COMMON --profile "$RES/profile_tp2_table.md"
  row autotp_config 75 $TR --provider autotp --tp 2 --zero 1 --vocab-parallel --optimizer config $COMMON
  row autotp_sp 75 $TR --provider autotp --tp 2 --zero 1 --vocab-parallel --sequence-parallel $COMMON
  row autotp_dp2 75 $TR --provider autotp --tp 1 --zero 2 $COMMON
  row dtensor 75 $TR --provider dtensor --tp 2 $COMMON
else
  row deepspeed_tp2 130 $TR --provider deepspeed --tp 2 --zero 1 $COMMON
  row deepspeed_dp2 130 $TR --provider deepspeed --tp 1 --zero 2 $COMMON
fi
head -11 "$RES/profile_tp2_table.md" 2>/dev/null | tail -8
python3 bench/print_csv.py "$CSV" provider tp zero optimizer sequence_parallel step_s host_s tokens_per_s_per_gpu peak_mem_gb first_losses
