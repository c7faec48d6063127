#!/usr/bin/env bash
# nvidia-h200-x2, one device call: one ZeRO-3 unit-layout lever measured side by side with its base and with
# PyTorch's FSDP2, TP=1 x DP=2 (Llama-3-8B shape, 8 layers, seq 4096). Versions are `git archive`s under
# .bench_versions/<name> (carried): base = the input embedding as its own FSDP2 unit, emb_root = it stays in the
# root unit with the LM head, as in the FSDP2 peer (the root is not resharded after forward: no second
# all-gather of the 1 GB embedding before its backward).
set -u
RES=${OUT:-/tmp/zero3_units_out}
mkdir -p "$RES"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader | head -1
CSV="$RES/train_zero3_units.csv"
COMMON="--steps ${STEPS:-8} --warmup 3 --csv $CSV --tp 1 --zero 3"
for v in ${VERSIONS:-base emb_root}; do
  PYTHONPATH=$PWD/.bench_versions/$v:$PWD AUTOTP_BENCH_VERSION=$v timeout 90 torchrun --standalone --nproc_per_node=2 \
    bench/bench_train.py --provider autotp $COMMON > "$RES/log_$v.txt" 2>&1 || { echo "FAILED $v"; tail -3 "$RES/log_$v.txt"; }
done
PYTHONPATH=$PWD timeout 90 torchrun --standalone --nproc_per_node=2 bench/bench_train.py --provider fsdp2 $COMMON \
  > "$RES/log_fsdp2.txt" 2>&1 || { echo "FAILED fsdp2"; tail -3 "$RES/log_fsdp2.txt"; }
PYTHONPATH=$PWD python3 bench/print_csv.py "$CSV" provider version tp dp zero step_s host_s tokens_per_s_per_gpu peak_mem_gb first_losses
