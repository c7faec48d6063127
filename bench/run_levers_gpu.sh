#!/usr/bin/env bash
# nvidia-h200-x2, one device call: step-time levers of issue 19 measured side by side in one job. Each version of
# the package is a `git archive` of its commit under .bench_versions/<name>/ (carried, git-ignored), so "before"
# and "after" run on the same machine minutes apart: the one-GPU row, then autotp TP=2 ZeRO-1 (the user's AdamW
# object, vocab-parallel loss) per version, the last one profiled; then tests/gpu/parity_check.py on the tree.
set -u
RES=${OUT:-/tmp/levers_out}
mkdir -p "$RES"
export PYTHONUNBUFFERED=1
VERSIONS=${VERSIONS:-"base dp1 norm"}
# Optional packages carried as wheels in .whl/ (liger-kernel): installed to /tmp/site, put after each version.
SITE=""
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  SITE=":/tmp/site"
  PYTHONPATH=/tmp/site python3 -c "import liger_kernel.transformers as l; print('liger-kernel importable:', bool(l.apply_liger_kernel_to_llama))" 2>&1 | tail -1
fi
STEPS=${STEPS:-12}
CSV="$RES/train_levers.csv"
nvidia-smi --query-gpu=name --format=csv,noheader | head -1
for v in $VERSIONS; do  # the C++ extensions of each version, built outside the timed runs
  PYTHONPATH=$PWD/.bench_versions/$v$SITE python3 -c "from autotp import _ext; _ext.load('planner'); print('$v: planner built')" 2>&1 | tail -1
done
PYTHONPATH=$PWD timeout 120 python3 bench/bench_train.py --provider single --steps "$STEPS" --warmup 3 --csv "$CSV" \
  > "$RES/log_single.txt" 2>&1 || { echo "FAILED single"; tail -3 "$RES/log_single.txt"; }
last=${VERSIONS##* }
for v in $VERSIONS; do
  extra=""
  [ "$v" = "$last" ] && extra="--profile $RES/profile_tp2_$v.md"
  PYTHONPATH=$PWD/.bench_versions/$v$SITE AUTOTP_BENCH_VERSION=$v timeout 150 torchrun --standalone --nproc_per_node=2 \
    bench/bench_train.py --provider autotp --tp 2 --zero 1 --steps "$STEPS" --warmup 3 --vocab-parallel \
    --optimizer object --csv "$CSV" $extra > "$RES/log_$v.txt" 2>&1 || { echo "FAILED $v"; tail -3 "$RES/log_$v.txt"; }
done
PYTHONPATH=$PWD$SITE timeout 150 torchrun --standalone --nproc_per_node=2 tests/gpu/parity_check.py > "$RES/parity_check.txt" 2>&1
grep -E "^(OK|FAIL|ALL)" "$RES/parity_check.txt"
head -11 "$RES/profile_tp2_$last.md" 2>/dev/null | tail -8
PYTHONPATH=$PWD python3 bench/print_csv.py "$CSV" provider version tp zero optimizer step_s host_s tokens_per_s_per_gpu peak_mem_gb first_losses
