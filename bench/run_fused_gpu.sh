#!/usr/bin/env bash
# nvidia-h200-x2 (or x4 with GPUS=4), one device call for the fused-kernel issue: build the fused extension, the
# kernel bench (Llama-3-8B shapes, with the host-cost profile and the `auto` table rows), then training steps
# (Llama-3-8B shape, 8 layers, seq 4096, TP=GPUS ZeRO-1, bf16) with kernels torch / auto (the table just
# measured), without and with sequence parallelism. The kernel checks first. A short table last.
set -u
RES=${OUT:-/tmp/fused_out}
mkdir -p "$RES"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 AUTOTP_FUSED_TIMEOUT_S=${AUTOTP_FUSED_TIMEOUT_S:-60}
GPUS=${GPUS:-2}
nvidia-smi --query-gpu=name --format=csv,noheader | head -1
python3 -c "import time; t = time.time(); from autotp import _ext; _ext.load('fused'); _ext.load('planner'); print(f'extensions built in {time.time() - t:.0f} s')" 2>&1 | tail -3
STAGES=" ${STAGES:-check bench train} "
if [[ $STAGES == *" check "* ]]; then  # a broken kernel's timings mean nothing: the rest runs only if this passes
  timeout ${CHECK_S:-150} torchrun --standalone --nproc_per_node=$GPUS tests/gpu/fused_check.py kernels \
    > "$RES/check_kernels.txt" 2>&1
  echo "check: exit $?"; grep -E "FAIL$|Error|error" "$RES/check_kernels.txt" | head -20
  grep -q "ALL OK" "$RES/check_kernels.txt" && echo "check: ALL OK" || STAGES=""
fi
if [[ $STAGES == *" bench "* ]]; then
  timeout ${BENCH_S:-200} torchrun --standalone --nproc_per_node=$GPUS bench/bench_tp_overlap.py --out "$RES" \
    --models llama3-8b --write-table --host-profile ${BENCH_ARGS:-} > "$RES/bench_w$GPUS.txt" 2>&1
  echo "bench: exit $?"; grep -E "host us|Error|error" "$RES/bench_w$GPUS.txt" | head -12
  # `auto` in the training rows below reads the table this call measured.
  [ -f "$RES/fused_table_w$GPUS.csv" ] && cp "$RES/fused_table_w$GPUS.csv" autotp_kernels/fused_table.csv
fi
if [[ $STAGES == *" train "* ]]; then
  CSV="$RES/train_fused.csv"
  COMMON="--provider autotp --tp $GPUS --zero 1 --vocab-parallel --steps ${STEPS:-8} --warmup 3 --csv $CSV"
  TR="torchrun --standalone --nproc_per_node=$GPUS bench/bench_train.py"
  # torch and auto twice, interleaved: the spread of each pair is the run-to-run noise the comparison has.
  RUNS=("torch" "auto" "torch --sequence-parallel" "auto --sequence-parallel" "torch" "auto")
  for i in "${!RUNS[@]}"; do
    run=${RUNS[$i]}
    label=${i}_$(echo "$run" | tr ' ' '_')
    timeout ${TRAIN_S:-90} $TR $COMMON --kernels $run > "$RES/train_$label.txt" 2>&1 || {
      echo "FAILED $run"; grep -v -i warn "$RES/train_$label.txt" | tail -4; }
  done
  python3 bench/print_csv.py "$CSV" kernels sequence_parallel step_s host_s tokens_per_s_per_gpu peak_mem_gb first_losses
fi
[ -f "$RES/tp_overlap_w$GPUS.csv" ] && python3 bench/print_csv.py "$RES/tp_overlap_w$GPUS.csv" proj op M gemm_ms coll_ms seq_ms symm_ms fused_ms fused_b2b_ms fused_host_ms fused_host_loop_ms
(cd "$RES" && ls *.txt >/dev/null 2>&1 && tar czf logs.tgz *.txt && rm -f *.txt)
exit 0
