#!/usr/bin/env bash
# One device call for the fused-kernel issue (nvidia-h200-x4): GPU checks of the fused GEMM + collective
# kernels at 4 and 2 GPUs, then bench/bench_tp_overlap.py at 4 GPUs (with the Triton-vs-cuBLAS GEMM check and the
# tuning sweep) and at 2 GPUs. Full logs and CSVs under $OUT; a short table last.
set -u
RES=${OUT:-/tmp/tp_overlap_out}
mkdir -p "$RES"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 AUTOTP_FUSED_TIMEOUT_S=${AUTOTP_FUSED_TIMEOUT_S:-60}
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader | head -1
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
# The fused ops' C++ host path (csrc/fused_*.{cpp,cu}), built once before the ranks start (else both compile).
python3 -c "import time; t = time.time(); from autotp import _ext; _ext.load('fused'); print(f'fused extension built in {time.time() - t:.0f} s')" 2>&1 | tail -4
check() {  # $1 GPUs, $2 devices, $3 seconds, $4 what (all | kernels | training)
  CUDA_VISIBLE_DEVICES=$2 timeout "$3" torchrun --standalone --nproc_per_node="$1" tests/gpu/fused_check.py "$4" \
    > "$RES/check_$1gpu_$4.txt" 2>&1
  echo "check $4 $1 GPUs: exit $?"; grep -E "OK$|FAIL$|Error|error|step 3" "$RES/check_$1gpu_$4.txt" | head -40
  grep -q "ALL OK" "$RES/check_$1gpu_$4.txt"
}
bench() {
  CUDA_VISIBLE_DEVICES=$2 timeout "$3" torchrun --standalone --nproc_per_node="$1" bench/bench_tp_overlap.py \
    --out "$RES" ${4:-} > "$RES/bench_w$1.txt" 2>&1
  echo "bench $1 GPUs: exit $?"; grep -E "SWEEP|GEMM|Error|error|failed" "$RES/bench_w$1.txt" | head -10
}
# A broken kernel's timings mean nothing and may hang, so a bench runs only where its kernel check passed in this
# call (or STAGES leaves the check out because it passed on the same code). STAGES splits the work over device
# calls of at most 10 minutes: check4 ~60 s, bench4 ~200 s, check2 ~50 s, bench2 ~80 s, train ~90 s.
STAGES=" ${STAGES:-check4 bench4 check2 bench2 train} "
ok4=1; ok2=1
[[ $STAGES == *" check4 "* ]] && { check 4 0,1,2,3 ${CHECK_S:-120} kernels || ok4=0; }
[[ $STAGES == *" bench4 "* && $ok4 == 1 ]] && bench 4 0,1,2,3 ${BENCH4_S:-240} "${BENCH4_ARGS:---sweep --gemm-check}"
[[ $STAGES == *" check2 "* ]] && { check 2 0,1 ${CHECK2_S:-90} kernels || ok2=0; }
[[ $STAGES == *" bench2 "* && $ok2 == 1 ]] && bench 2 0,1 ${BENCH2_S:-100} "${BENCH2_ARGS:---models llama3-8b}"
# Training (torch / auto / triton kernels, fp32 losses must agree); the first Triton GEMM autotunes on the
# host while peers wait inside fused ops, hence a fused timeout well above a compile.
[[ $STAGES == *" train "* ]] && AUTOTP_FUSED_TIMEOUT_S=60 check ${TRAIN_GPUS:-2} ${TRAIN_DEVICES:-0,1} ${TRAIN_S:-150} training
for w in 4 2; do  # the table of what ran (a stage left out has no CSV)
  [ -f "$RES/tp_overlap_w$w.csv" ] && python3 - "$RES/tp_overlap_w$w.csv" <<'PY'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
print(f"world {rows[0]['world']}: model proj op M | gemm coll seq symm fused (ms) | eff fused/max symm/fused host")
for r in rows:
    if r["M"] in ("8192",) or r["proj"] == "down" and r["model"] == "llama3-8b":
        print(r["model"][-3:], r["proj"], r["op"], r["M"], "|", r["gemm_ms"], r["coll_ms"], r["seq_ms"],
              r.get("symm_ms") or "-", r["fused_ms"], "|", r["overlap_eff"], r["fused_over_max"],
              r.get("symm_over_fused") or "-", r["fused_host_ms"])
PY
done
# The device returns at most 8 files: the logs travel as one archive beside the CSVs.
(cd "$RES" && ls *.txt >/dev/null 2>&1 && tar czf logs.tgz *.txt && rm -f *.txt)
exit 0  # the stages above print their own exit codes
