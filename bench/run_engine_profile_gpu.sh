#!/usr/bin/env bash
# One device call on the one-GPU kind: what autotp's engine adds to a step that TP does not explain. autotp at
# TP=1 x DP=1 (ZeRO-1: fp32 masters, the user's AdamW object on torch's fused kernel, clipping) against the plain
# one-GPU step (`--provider single`), kernel by kernel: everything but the TP collectives is in both, at twice
# TP=2's per-GPU sizes. VERSIONS (`version_path` in gpu_setup.sh) run in two rounds alternating with the single
# row (SINGLE=0: none); then one profiled step of the last version and of single (<name>.md and
# <name>_kernels.csv; PROFILE=0: none). ZERO: the autotp rows' ZeRO stage (default 1). Llama-3-8B shape, 8
# layers, seq 4096, micro-batch 1, bf16.
set -u
RES=${OUT:-/tmp/engine_profile_out}
VERSIONS=${VERSIONS:-tree}
mkdir -p "$RES"
export PYTHONUNBUFFERED=1
source bench/gpu_setup.sh
nvidia-smi --query-gpu=name --format=csv,noheader | head -1
for v in $VERSIONS; do  # ZeRO-1's bucket planner of each version, built outside the timed runs
  PYTHONPATH=$(version_path $v) python3 -c "from autotp import _ext; _ext.load('planner'); print('$v: planner built')" 2>&1 | tail -1
done
CSV="$RES/train_engine_tp1.csv"
row() {  # label, version, bench_train arguments
  local label=$1 v=$2; shift 2
  PYTHONPATH=$(version_path $v) AUTOTP_BENCH_VERSION=$v timeout ${LIMIT:-120} torchrun --standalone \
    --nproc_per_node=1 bench/bench_train.py "$@" --steps ${STEPS:-10} --warmup 3 --csv "$CSV" > "/tmp/log_$label.txt" 2>&1 \
    || { echo "FAILED $label"; grep -v -i warn "/tmp/log_$label.txt" | tail -3; }
}
for round in 1 2; do
  [ "${SINGLE:-1}" = 1 ] && row "single_$round" tree --provider single
  for v in $VERSIONS; do row "autotp_${v}_$round" "$v" --provider autotp --tp 1 --zero ${ZERO:-1}; done
done
if [ "${PROFILE:-1}" != 0 ]; then
  row autotp_prof "${VERSIONS##* }" --provider autotp --tp 1 --zero ${ZERO:-1} --profile "$RES/profile_tp1_autotp.md"
  row single_prof tree --provider single --profile "$RES/profile_tp1_single.md"
fi
PYTHONPATH=$PWD python3 bench/print_csv.py "$CSV" provider version tp zero step_s host_s tokens_per_s_per_gpu peak_mem_gb first_losses
