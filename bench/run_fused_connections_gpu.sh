#!/usr/bin/env bash
# nvidia-h200-x2, one call: the fused-op bench (8B, M=4096/8192) with the default CUDA_DEVICE_MAX_CONNECTIONS and with
# 32 (does a deep queue of stream waits block other streams through shared hardware queues?), then training
# steps torch vs auto (the committed fused_table.csv) without and with sequence parallelism.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 AUTOTP_FUSED_TIMEOUT_S=60
python3 -c "from autotp import _ext; _ext.load('fused'); _ext.load('planner')" 2>&1 | tail -2
for conn in default 32; do
  mkdir -p $OUT/conn_$conn
  if [ $conn = default ]; then unset CUDA_DEVICE_MAX_CONNECTIONS; else export CUDA_DEVICE_MAX_CONNECTIONS=$conn; fi
  timeout 150 torchrun --standalone --nproc_per_node=2 bench/bench_tp_overlap.py --out $OUT/conn_$conn --models llama3-8b --tokens 4096,8192 > $OUT/conn_$conn/log.txt 2>&1; echo "bench conn=$conn exit $?"
done
unset CUDA_DEVICE_MAX_CONNECTIONS
CSV=$OUT/train_confirm.csv
for run in "torch" "auto" "torch --sequence-parallel" "auto --sequence-parallel"; do
  timeout 90 torchrun --standalone --nproc_per_node=2 bench/bench_train.py --provider autotp --tp 2 --zero 1 --vocab-parallel --steps 8 --warmup 3 --csv $CSV --kernels $run > $OUT/train_$(echo $run | tr ' ' '_').txt 2>&1 || echo "FAILED $run"
done
python3 bench/print_csv.py $CSV kernels sequence_parallel step_s host_s tokens_per_s_per_gpu first_losses
python3 - <<'PY'
import csv, os
out = os.environ["OUT"]
a = {(r["proj"], r["op"], r["M"]): r for r in csv.DictReader(open(f"{out}/conn_default/tp_overlap_w2.csv"))}
b = {(r["proj"], r["op"], r["M"]): r for r in csv.DictReader(open(f"{out}/conn_32/tp_overlap_w2.csv"))}
print("case | seq default/32 | fused default/32 | b2b default/32")
for k in a:
    print(*k, "|", a[k]["seq_ms"], b[k]["seq_ms"], "|", a[k]["fused_ms"], b[k]["fused_ms"], "|", a[k]["fused_b2b_ms"], b[k]["fused_b2b_ms"])
PY
(cd $OUT && tar czf logs.tgz conn_*/log.txt train_*.txt && rm -f conn_*/log.txt train_*.txt)
