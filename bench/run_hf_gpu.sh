#!/usr/bin/env bash
# nvidia-h200-x2, one device call (issue 20): the README's HF Trainer script (examples/hf_trainer.py), bf16, TP=2,
# through autotp.hf.Trainer and through transformers' own DeepSpeed path (DeepSpeed AutoTP, wheels carried in
# .whl/), timed in the same job; then autotp with PEFT LoRA. Each row is one JSON line of the script; the table is
# printed last and written to $OUT/hf_trainer.csv.
set -u
RES=${OUT:-/tmp/hf_out}
mkdir -p "$RES"
export PYTHONUNBUFFERED=1
source bench/gpu_setup.sh
install_deepspeed_wheels
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
python3 -c "import torch, transformers, accelerate, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'peft', peft.__version__)"
python3 -c "import deepspeed; print('deepspeed', deepspeed.__version__)" 2>&1 | tail -1
nvidia-smi --query-gpu=name --format=csv,noheader | head -1
COMMON="--model llama3-8b --layers ${LAYERS:-4} --seq-len ${SEQ:-4096} --batch 1 --steps ${STEPS:-20} --zero 1"
run() {  # name, extra args
  timeout ${LIMIT:-200} torchrun --standalone --nproc_per_node=2 examples/hf_trainer.py $COMMON --output /tmp/hf_$1 \
    "${@:2}" > "$RES/log_$1.txt" 2>&1 || { echo "FAILED $1"; grep -v Warning "$RES/log_$1.txt" | tail -4; }
  grep '^{"backend"' "$RES/log_$1.txt" >> "$RES/rows.jsonl"
}
run autotp --backend autotp
run deepspeed --backend deepspeed
[ "${LORA:-1}" = 1 ] && run autotp_lora --backend autotp --lora
python3 - "$RES" <<'PY'
import csv, json, sys, datetime, torch, transformers
res = sys.argv[1]
rows = [json.loads(line) for line in open(f"{res}/rows.jsonl")]
meta = dict(gpu=torch.cuda.get_device_name(0), torch=torch.__version__, transformers=transformers.__version__,
            date=datetime.date.today().isoformat())
with open(f"{res}/hf_trainer.csv", "w", newline="") as handle:
    writer = csv.DictWriter(handle, fieldnames=list(rows[0]) + list(meta))
    writer.writeheader()
    for row in rows:
        writer.writerow({**row, **meta})
print("| backend | lora | tp | s/step | tokens/s/GPU | peak GB | train loss |")
for r in rows:
    print(f"| {r['backend']} | {r['lora']} | {r['tp']} | {r['step_s']} | {r['tokens_per_s_per_gpu']} | {r['peak_gb']} | {r['train_loss']} |")
PY
