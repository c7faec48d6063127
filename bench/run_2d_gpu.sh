#!/usr/bin/env bash
# nvidia-h200-x2 (GPUS=2) or nvidia-h200-x4 (GPUS=4), one device call for the 2-D TP issue: bench/bench_2d.py on
# Llama-3-8B's MLP (8192 tokens, bf16): 1-D TP=GPUS against every r x c grid of GPUS ranks, bytes per rank and
# forward + backward time. At 2 GPUs this is the layer-level check; the 2 x 2 grid needs 4.
set -u
RES=${OUT:-/tmp/tp2d_out}
mkdir -p "$RES"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
GPUS=${GPUS:-2}
nvidia-smi --query-gpu=name --format=csv,noheader | head -1
timeout ${LIMIT:-300} torchrun --standalone --nproc_per_node=$GPUS bench/bench_2d.py --out "$RES" ${ARGS:-} \
  > "$RES/bench_2d_w$GPUS.txt" 2>&1
echo "bench_2d: exit $?"; grep -v -i warn "$RES/bench_2d_w$GPUS.txt" | tail -8
