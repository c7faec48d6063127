#!/usr/bin/env bash
# One device call for the NCCL extension issue (nvidia-h200-x4): build the extension, its GPU checks at 4 and 2
# GPUs, then bench/bench_zero_reduce_scatter.py at TP1 x DP4 and TP2 x DP2 for autotp (torch, nccl_ext) and
# DeepSpeed ZeRO-2 (wheels in .whl/). Prints a short table last.
set -u
RES=${OUT:-/tmp/ext_out}
mkdir -p "$RES"
export PYTHONPATH=$PWD AUTOTP_EXT_DIR=/tmp/autotp_ext
nvidia-smi --query-gpu=name --format=csv,noheader | head -1
start=$(date +%s)
python3 -c "from autotp import _ext; _ext.load('planner'); m = _ext.load('nccl'); print('nccl extension built, NCCL', m.nccl_version())" 2>&1 | tail -3
echo "build: $(( $(date +%s) - start )) s"
check() {
  timeout 150 torchrun --standalone --nproc_per_node="$1" tests/gpu/nccl_ext_check.py > "$RES/check_$1gpu.txt" 2>&1
  grep -E "OK$|FAIL$|Error|error:" "$RES/check_$1gpu.txt" | head -30
}
check 4
for tp in 1 2; do
  timeout 150 torchrun --standalone --nproc_per_node=4 bench/bench_zero_reduce_scatter.py --tp $tp --out "$RES" \
    > "$RES/bench_autotp_tp$tp.txt" 2>&1; grep -E "^RS|Error" "$RES/bench_autotp_tp$tp.txt" | head -5
done
if ls .whl/deepspeed-*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  for tp in 1 2; do
    PYTHONPATH=$PWD:/tmp/site timeout 150 torchrun --standalone --nproc_per_node=4 bench/bench_zero_reduce_scatter.py \
      --provider deepspeed --tp $tp --out "$RES" > "$RES/bench_ds_tp$tp.txt" 2>&1
    grep -E "^RS|Error" "$RES/bench_ds_tp$tp.txt" | tail -3
  done
fi
check 2
cut -d, -f4,5,9- "$RES/zero_rs.csv"
python3 - "$RES/zero_rs_buckets.csv" <<'PY'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
for key in sorted({(r["tp"], r["backend"]) for r in rows}):
    sel = [r for r in rows if (r["tp"], r["backend"]) == key]
    ratio = [float(r["ours_busbw"]) / float(r["nccl_busbw"]) for r in sel if float(r["nccl_busbw"]) > 0]
    print(f"tp={key[0]} {key[1]:<9} buckets={len(sel)} busbw ours/nccl: min {min(ratio):.2f} median "
          f"{sorted(ratio)[len(ratio)//2]:.2f}; largest bucket {max(sel, key=lambda r: int(r['elements']))['ours_busbw']} GB/s")
PY
