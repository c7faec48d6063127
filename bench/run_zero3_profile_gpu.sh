#!/usr/bin/env bash
# One device call (issue 22): where autotp's stage 3 loses to PyTorch's FSDP2, kernel by kernel, and a lever
# against its base in the same job. The gap is there at DP=1 too (train_zero3.csv: 22,874 against 23,833
# tokens/s on one GPU), so NPROC=1 runs on the one-GPU kind. VERSIONS: `version_path` in gpu_setup.sh. Two
# rounds of unprofiled rows
# alternating the versions and FSDP2, so each ratio has its noise beside it; then one profiled step of the last
# version and of FSDP2 (bench_train.py --profile writes <name>.md and <name>_kernels.csv; PROFILE=0: none).
# Llama-3-8B shape, 8 layers, seq 4096, micro-batch 1, bf16 compute, fp32 masters, clipping.
set -u
RES=${OUT:-/tmp/zero3_profile_out}
N=${NPROC:-1}
VERSIONS=${VERSIONS:-tree}
mkdir -p "$RES"
export PYTHONUNBUFFERED=1
source bench/gpu_setup.sh
nvidia-smi --query-gpu=name --format=csv,noheader | head -1
# no extension build: stage 3 at TP=1 loads none of them (FSDP2 does the collectives)
CSV="$RES/train_zero3_profile_dp$N.csv"
row() {  # label, version, bench_train arguments
  local label=$1 v=$2; shift 2
  PYTHONPATH=$(version_path $v) AUTOTP_BENCH_VERSION=$v timeout ${LIMIT:-120} torchrun --standalone --nproc_per_node=$N \
    bench/bench_train.py "$@" --tp 1 --zero 3 --steps ${STEPS:-10} --warmup 3 --csv "$CSV" > "/tmp/log_$label.txt" 2>&1 \
    || { echo "FAILED $label"; grep -v -i warn "/tmp/log_$label.txt" | tail -3; }
}
for round in 1 2; do
  for v in $VERSIONS; do row "autotp_${v}_$round" "$v" --provider autotp; done
  row "fsdp2_$round" tree --provider fsdp2
done
if [ "${PROFILE:-1}" != 0 ]; then
  row autotp_prof "${VERSIONS##* }" --provider autotp --profile "$RES/profile_zero3_dp${N}_autotp.md"
  row fsdp2_prof tree --provider fsdp2 --profile "$RES/profile_zero3_dp${N}_fsdp2.md"
fi
PYTHONPATH=$PWD python3 bench/print_csv.py "$CSV" provider version dp zero step_s host_s tokens_per_s_per_gpu peak_mem_gb first_losses
