#!/usr/bin/env bash
# nvidia-h200-x2, one device call: the parity checks on CUDA (tests/gpu/parity_check.py), then the optimizer lever
# of issue 19 measured in one job: the one-GPU row (fused AdamW), autotp TP=2 ZeRO-1 with the user's AdamW object
# pinned to torch's foreach path (before the lever), the object left unset (the lever: fused), and the config's
# optimizer section; the lever's run is profiled. Llama-3-8B shape, 8 layers, seq 4096, bf16, vocab-parallel loss.
set -u
RES=${OUT:-/tmp/optimizer_out}
mkdir -p "$RES"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
source bench/gpu_setup.sh
nvidia-smi --query-gpu=name --format=csv,noheader | head -1
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
build_extensions
timeout 150 torchrun --standalone --nproc_per_node=2 tests/gpu/parity_check.py > "$RES/parity_check.txt" 2>&1
tail -12 "$RES/parity_check.txt"
CSV="$RES/train_optimizer.csv"
STEPS=${STEPS:-12}
timeout 120 python3 bench/bench_train.py --provider single --steps "$STEPS" --warmup 3 --csv "$CSV" \
  > "$RES/log_single.txt" 2>&1 || { echo "FAILED single"; tail -3 "$RES/log_single.txt"; }
for opt in object-foreach object config; do
  extra=""
  [ "$opt" = object ] && extra="--profile $RES/profile_tp2_object.md"
  timeout 150 torchrun --standalone --nproc_per_node=2 bench/bench_train.py --provider autotp --tp 2 --zero 1 \
    --steps "$STEPS" --warmup 3 --vocab-parallel --optimizer "$opt" --csv "$CSV" $extra \
    > "$RES/log_$opt.txt" 2>&1 || { echo "FAILED $opt"; tail -3 "$RES/log_$opt.txt"; }
done
head -12 "$RES/profile_tp2_object.md" 2>/dev/null
python3 bench/print_csv.py "$CSV" provider tp zero optimizer step_s host_s tokens_per_s_per_gpu peak_mem_gb first_losses
