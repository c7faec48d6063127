"""Train a causal LM with the HF Trainer under autotp: TP inside the node, ZeRO data parallelism over the rest.

    torchrun --nproc_per_node=2 examples/hf_trainer.py                  # TP=2 (CPU: gloo, fp32; GPU: NCCL, bf16)
    torchrun --nproc_per_node=4 examples/hf_trainer.py --tp 2 --zero 1  # TP=2 x DP=2, ZeRO-1
    torchrun --nproc_per_node=2 examples/hf_trainer.py --lora           # PEFT LoRA on a TP-sharded model

The DeepSpeed config is the one a DeepSpeed AutoTP user already has: "auto" values come from TrainingArguments.
`--backend deepspeed` runs the same script through transformers' own DeepSpeed path (needs DeepSpeed installed),
for a side-by-side timing. The data: random windows of the English text shipped with autotp, as UTF-8 bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

SHAPES = {  # hidden, intermediate, heads, kv heads, vocabulary
    "tiny": (256, 688, 8, 4, 264),
    "llama3-8b": (4096, 14336, 32, 8, 128256),
}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="a local HF model directory, or a shape: " + ", ".join(SHAPES))
    parser.add_argument("--layers", type=int, default=4, help="decoder layers of a random-init shape")
    parser.add_argument("--tp", type=int, default=None, help="TP size (default: all processes)")
    parser.add_argument("--zero", type=int, default=1, choices=(0, 1, 2))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4, help="micro-batch per GPU")
    parser.add_argument("--lora", action="store_true", help="train a LoRA adapter (peft) instead of all weights")
    parser.add_argument("--backend", default="autotp", choices=("autotp", "deepspeed"))
    parser.add_argument("--output", default="./hf_trainer_output")
    return parser.parse_args()


class ByteWindows(torch.utils.data.Dataset):
    """`count` windows of `length` bytes from autotp's corpus; ids 0-255 are bytes (the model's vocabulary may be
    larger)."""

    def __init__(self, length: int, count: int = 4096, seed: int = 0):
        import autotp

        path = os.path.join(os.path.dirname(autotp.__file__), "data", "corpus.txt")
        data = torch.frombuffer(bytearray(open(path, "rb").read()), dtype=torch.uint8).long()
        gen = torch.Generator().manual_seed(seed)
        self.starts = torch.randint(0, len(data) - length, (count,), generator=gen)
        self.data, self.length = data, length

    def __len__(self):
        return len(self.starts)

    def __getitem__(self, i):
        ids = self.data[self.starts[i]:self.starts[i] + self.length]
        return {"input_ids": ids, "labels": ids.clone()}


def build_model(name: str, layers: int, dtype):
    from transformers import AutoModelForCausalLM, LlamaConfig

    if name not in SHAPES:
        return AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    hidden, intermediate, heads, kv_heads, vocab = SHAPES[name]
    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                         max_position_embeddings=8192, tie_word_embeddings=False)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=dtype)


class StepTimer:
    """Wall time of each optimizer step (a TrainerCallback, built lazily so transformers imports after args)."""

    def __new__(cls):
        from transformers import TrainerCallback

        class _Timer(TrainerCallback):
            def __init__(self):
                self.times, self._start = [], None

            def on_step_begin(self, args, state, control, **kwargs):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self._start = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self.times.append(time.perf_counter() - self._start)

        return _Timer()


def main():
    opts = parse_args()
    if opts.backend == "autotp":
        import autotp.hf  # before TrainingArguments: routes a DeepSpeed config with `tensor_parallel` to autotp

        trainer_class = autotp.hf.Trainer
    else:
        from transformers import Trainer as trainer_class
    from transformers import TrainingArguments

    world = int(os.environ.get("WORLD_SIZE", "1"))
    gpu = torch.cuda.is_available()
    ds_config = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
        "zero_optimization": {"stage": opts.zero},
        "tensor_parallel": {"autotp_size": opts.tp or world},
    }
    args = TrainingArguments(
        output_dir=opts.output, max_steps=opts.steps, per_device_train_batch_size=opts.batch,
        learning_rate=2e-4 if opts.lora else 1e-4, lr_scheduler_type="cosine", warmup_steps=min(10, opts.steps // 10),
        weight_decay=0.01, max_grad_norm=1.0, bf16=gpu, use_cpu=not gpu, logging_steps=10, save_strategy="no",
        report_to=[], seed=0, deepspeed=ds_config, disable_tqdm=True)

    model = build_model(opts.model, opts.layers, torch.bfloat16 if gpu else torch.float32)
    if opts.lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                 "gate_proj", "up_proj", "down_proj"]))
    timer = StepTimer()
    trainer = trainer_class(model=model, args=args, train_dataset=ByteWindows(opts.seq_len), callbacks=[timer])
    result = trainer.train()
    trainer.save_model(os.path.join(opts.output, "final"))  # plain HF files (or the LoRA adapter)

    if args.process_index == 0:
        steady = sorted(timer.times[len(timer.times) // 2:])  # the second half: compiled, warmed up
        step_s = steady[len(steady) // 2]
        tp = opts.tp or world
        tokens = opts.batch * opts.seq_len * (world // tp)  # DP ranks each read their own batch
        print(json.dumps({"backend": opts.backend, "world": world, "tp": tp, "zero": opts.zero, "lora": opts.lora,
                          "model": opts.model, "layers": opts.layers, "seq_len": opts.seq_len, "batch": opts.batch,
                          "step_s": round(step_s, 4), "tokens_per_s_per_gpu": round(tokens / step_s / world, 1),
                          "peak_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if gpu else None,
                          "train_loss": round(result.training_loss, 4)}))
    import torch.distributed as dist

    if dist.is_initialized():  # leave together: a rank that exits while another still reads gloo sockets aborts it
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
