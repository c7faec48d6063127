#!/usr/bin/env bash
# nvidia-h200-x2 (GPUS=2), the open issues' GPU work in one call, most needed first, each stage in its own time
# limit so one hang costs only its stage:
#   fused  issue 21: tests/gpu/fused_check.py (every fused op and autograd Function, bf16/fp16/fp32, both host
#          paths, bit-identical across ranks and runs, a missing rank raises);
#   2d     issue 23: bench/bench_2d.py, 1-D TP=GPUS against each r x c grid of GPUS ranks on Llama-3-8B's MLP;
#   zero3  issue 22: autotp stage 3 against PyTorch FSDP2 at DP=GPUS, two rounds alternating (Llama-3-8B shape,
#          8 layers, seq 4096), same rows as train_zero3.csv;
#   levers the 2026-12-01 step levers (foreach clipping norm, clipping in the fused step, Triton widening; measured
#          on one GPU only) at TP=GPUS ZeRO-1: the one-GPU row, then `base` (a `git archive` of aa0853f's
#          autotp/ and autotp_kernels/ under .bench_versions/base, carried) against the tree, two rounds;
#          LEVER_VERSIONS="base norm fold tree" (archives of 2002a26 and 4988621 as norm and fold) gives each
#          lever its own delta at TP=GPUS.
# STAGES picks (default all; all four take ~11 min, over one call's 10: run STAGES="fused 2d", then
# STAGES="zero3 levers" on the warm machine). Logs go into logs.tgz; a short table last.
set -u
RES=${OUT:-/tmp/open_issues_out}
mkdir -p "$RES"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 AUTOTP_FUSED_TIMEOUT_S=${AUTOTP_FUSED_TIMEOUT_S:-60}
GPUS=${GPUS:-2}
STAGES=" ${STAGES:-fused 2d zero3 levers} "
LOGS=/tmp/open_issues_logs
mkdir -p $LOGS
source bench/gpu_setup.sh
nvidia-smi --query-gpu=name --format=csv,noheader | head -1
python3 -c "import time; t = time.time(); from autotp import _ext; _ext.load('fused'); _ext.load('planner'); _ext.load('nccl'); print(f'extensions built in {time.time() - t:.0f} s')" 2>&1 | tail -3
if [[ $STAGES == *" fused "* ]]; then
  timeout ${CHECK_S:-180} torchrun --standalone --nproc_per_node=$GPUS tests/gpu/fused_check.py kernels \
    > "$RES/fused_check_w$GPUS.txt" 2>&1
  echo "fused check: exit $?"; grep -E "FAIL$|Error|error" "$RES/fused_check_w$GPUS.txt" | head -20
  grep -q "ALL OK" "$RES/fused_check_w$GPUS.txt" && echo "fused check: ALL OK" || echo "fused check: NOT OK"
fi
if [[ $STAGES == *" 2d "* ]]; then
  timeout ${TP2D_S:-180} torchrun --standalone --nproc_per_node=$GPUS bench/bench_2d.py --out "$RES" \
    > $LOGS/bench_2d_w$GPUS.txt 2>&1
  echo "bench_2d: exit $?"; grep -v -i warn $LOGS/bench_2d_w$GPUS.txt | tail -8
fi
if [[ $STAGES == *" zero3 "* ]]; then
  CSV="$RES/train_zero3_dp$GPUS.csv"
  for round in 1 2; do
    for provider in autotp fsdp2; do
      timeout ${TRAIN_S:-100} torchrun --standalone --nproc_per_node=$GPUS bench/bench_train.py --provider $provider \
        --tp 1 --zero 3 --steps ${STEPS:-8} --warmup 3 --csv "$CSV" > $LOGS/zero3_${provider}_$round.txt 2>&1 \
        || { echo "FAILED zero3 $provider"; grep -v -i warn $LOGS/zero3_${provider}_$round.txt | tail -3; }
    done
  done
  python3 bench/print_csv.py "$CSV" provider dp zero step_s host_s tokens_per_s_per_gpu peak_mem_gb first_losses
fi
if [[ $STAGES == *" levers "* ]]; then
  CSV="$RES/train_levers_tp$GPUS.csv"
  for v in ${LEVER_VERSIONS:-base tree}; do
    [ $v != tree ] && [ -d .bench_versions/$v ] && PYTHONPATH=$(version_path $v) python3 -c \
      "from autotp import _ext; _ext.load('planner'); print('$v: planner built')" 2>&1 | tail -1
  done
  timeout ${TRAIN_S:-100} torchrun --standalone --nproc_per_node=1 bench/bench_train.py --provider single --steps 10 \
    --warmup 3 --csv "$CSV" > $LOGS/levers_single.txt 2>&1 || echo "FAILED single"
  for round in 1 2; do
    for v in ${LEVER_VERSIONS:-base tree}; do
      [ $v != tree ] && [ ! -d .bench_versions/$v ] && { echo "no .bench_versions/$v carried"; continue; }
      PYTHONPATH=$(version_path $v) AUTOTP_BENCH_VERSION=$v timeout ${TRAIN_S:-100} torchrun --standalone --nproc_per_node=$GPUS \
        bench/bench_train.py --provider autotp --tp $GPUS --zero 1 --vocab-parallel --steps 10 --warmup 3 --csv "$CSV" \
        > $LOGS/levers_${v}_$round.txt 2>&1 || { echo "FAILED levers $v"; grep -v -i warn $LOGS/levers_${v}_$round.txt | tail -3; }
    done
  done
  python3 bench/print_csv.py "$CSV" provider version tp zero step_s host_s tokens_per_s_per_gpu peak_mem_gb first_losses
fi
(cd $LOGS && tar czf "$RES/logs.tgz" *.txt)
exit 0
