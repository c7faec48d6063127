"""autotp-train: train a small causal LM with tensor parallelism, from one command.

    autotp-train                                 # no GPU: 2 gloo processes, TP=2, 4-layer Llama, ~1-2 min
    autotp-train --model qwen3 --steps 400       # another family, random init, byte vocabulary
    autotp-train --model ./my-hf-model --config ds.json --output runs/a
    torchrun --nproc_per_node=8 -m autotp.train --tp 4     # under torchrun: TP=4 x DP=2
    autotp-train --nproc 4 --tp 2 --zero 2 --save-every 50  # ZeRO-2 over DP=2, checkpoints every 50 steps
    autotp-train --nproc 4 --tp 2 --zero 2 --resume         # continue from <output>/checkpoints/latest

Text is tokenized as UTF-8 bytes (ids 0-255, no tokenizer library); the corpus is autotp/data/corpus.txt.
Without torchrun the command spawns --nproc local processes itself (default: every GPU with NCCL, else 2 CPU
processes with gloo). `--config` is a DeepSpeed-style JSON whose top-level keys replace the built-in defaults.
Writes <output>/model (an HF directory, loadable without autotp), <output>/losses.csv and <output>/loss.png;
with --save-every, training checkpoints in <output>/checkpoints (exact resume with --resume, also at another
--nproc/--tp/--zero).
"""

from __future__ import annotations

import argparse
import copy
import csv
import importlib.resources
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist

BYTE_VOCAB = 256
PAD_ID, BOS_ID, EOS_ID = 256, 257, 258
VOCAB_SIZE = 264  # 256 bytes + 3 specials, padded to a multiple of 8 so TP 2/4/8 splits it evenly
SMALL = dict(vocab_size=VOCAB_SIZE, hidden_size=256, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=4, intermediate_size=688, pad_token_id=PAD_ID, bos_token_id=BOS_ID,
             eos_token_id=EOS_ID, tie_word_embeddings=False)
# Per-family renames and extras on top of SMALL (GPT-2 spells its sizes n_*, has no GQA).
FAMILIES = {
    "llama": {}, "mistral": {"sliding_window": None}, "qwen2": {}, "qwen3": {"head_dim": 32}, "phi3": {},
    "gpt2": {"n_embd": 256, "n_layer": 4, "n_head": 8, "n_inner": 688, "hidden_size": None,
             "num_hidden_layers": None, "num_attention_heads": None, "num_key_value_heads": None,
             "intermediate_size": None},
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="autotp-train", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama",
                        help=f"HF model directory, or a family for a small random model: {', '.join(FAMILIES)}")
    parser.add_argument("--config", help="DeepSpeed-style JSON; its top-level keys replace the defaults")
    parser.add_argument("--nproc", type=int, help="processes to spawn (default: GPU count, else 2)")
    parser.add_argument("--tp", type=int, help="tensor-parallel size (default: config's autotp_size, else nproc)")
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps (default 200)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens (bytes) per sample (default 128)")
    parser.add_argument("--output", default="./autotp_output", help="output directory (default ./autotp_output)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--zero", type=int, choices=[0, 1, 2], help="ZeRO stage over the DP group (default: config's, "
                        "else 0)")
    parser.add_argument("--save-every", type=int, default=0, help="save a training checkpoint every N steps and at "
                        "the end (default: off)")
    parser.add_argument("--resume", action="store_true", help="continue from <output>/checkpoints/latest")
    args = parser.parse_args(argv)
    under_torchrun = "RANK" in os.environ
    args.nproc = int(os.environ["WORLD_SIZE"]) if under_torchrun else (
        args.nproc or torch.cuda.device_count() or 2)
    if args.steps < 1 or args.seq_len < 2 or args.nproc < 1 or args.save_every < 0:
        parser.error("--steps must be >= 1, --seq-len >= 2, --nproc >= 1 and --save-every >= 0")
    if not under_torchrun and torch.cuda.is_available() and args.nproc > torch.cuda.device_count():
        parser.error(f"--nproc {args.nproc} exceeds the {torch.cuda.device_count()} local GPUs")
    if args.model not in FAMILIES:
        if not os.path.isfile(os.path.join(args.model, "config.json")):
            parser.error(f"--model '{args.model}' is neither an HF model directory (no config.json there) nor a "
                         f"known family ({', '.join(FAMILIES)})")
        from transformers import AutoConfig

        vocab = getattr(AutoConfig.from_pretrained(args.model).get_text_config(), "vocab_size", 0) or 0
        if vocab < EOS_ID + 1:
            parser.error(f"--model '{args.model}' has vocab_size {vocab}; byte-level training needs >= {EOS_ID + 1}")
    args.ds_config = build_config(parser, args)
    return args


def build_config(parser, args) -> dict:
    """Built-in defaults with the user's JSON laid over them (top-level keys replace), validated here so a
    bad config fails in the parent instead of in every worker."""
    from .config import ConfigError, load_config_dict, parse_config

    config = {
        "train_micro_batch_size_per_gpu": 8,
        "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": 2e-3, "betas": [0.9, 0.95], "weight_decay": 0.01}},
        "scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": args.steps, "warmup_type": "linear",
                                                            "warmup_num_steps": max(2, min(20, args.steps // 10)),
                                                            "cos_min_ratio": 0.1}},
        "tensor_parallel": {"autotp_size": args.nproc},
        "bf16": {"enabled": torch.cuda.is_available()},
    }
    try:
        user = copy.deepcopy(load_config_dict(args.config)) if args.config else {}
        batch_keys = {"train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"}
        if batch_keys & set(user):
            config = {k: v for k, v in config.items() if k not in batch_keys}
        config.update(user)
        if args.tp is not None:
            config["tensor_parallel"] = {**(config.get("tensor_parallel") or {}), "autotp_size": args.tp}
        if args.zero is not None:
            config["zero_optimization"] = {**(config.get("zero_optimization") or {}), "stage": args.zero}
        parse_config(config, args.nproc)
    except ConfigError as err:
        given = [f"--config {args.config}" if args.config else "", f"--tp {args.tp}" if args.tp else "",
                 f"--zero {args.zero}" if args.zero is not None else ""]
        parser.error(f"{' and '.join(g for g in given if g) or 'built-in config'}: {err}")
    return config


def build_model(name: str, seq_len: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    if name not in FAMILIES:
        return AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32)
    kwargs = {**SMALL, "max_position_embeddings": max(seq_len, 256), **FAMILIES[name]}
    if name == "gpt2":
        kwargs["n_positions"] = kwargs.pop("max_position_embeddings")
    config = AutoConfig.for_model(name, **{k: v for k, v in kwargs.items() if v is not None})
    return AutoModelForCausalLM.from_config(config)


def load_corpus() -> torch.Tensor:
    raw = importlib.resources.files("autotp").joinpath("data/corpus.txt").read_bytes()
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()


def sample_batch(corpus: torch.Tensor, rows: int, seq_len: int, seed: int) -> torch.Tensor:
    """`rows` random windows; the same `seed` gives the same batch on every rank of a TP group."""
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, corpus.numel() - seq_len, (rows,), generator=generator)
    return torch.stack([corpus[s:s + seq_len] for s in starts.tolist()])


@torch.no_grad()
def greedy_sample(engine, prompt: str, new_bytes: int) -> str:
    """Greedy continuation; every rank runs it (TP layers communicate) and gets the same text."""
    engine.eval()
    ids = torch.tensor([list(prompt.encode())], device=engine.device)
    for _ in range(new_bytes):
        next_id = engine(input_ids=ids).logits[0, -1, :BYTE_VOCAB].argmax()
        ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
    return bytes(ids[0].tolist()).decode("utf-8", errors="replace")


def write_curve(output: str, rows: list) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(os.path.join(output, "losses.csv"), "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["step", "loss", "lr", "grad_norm", "tokens_per_s"])
        writer.writerows(rows)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r[0] for r in rows], [r[1] for r in rows], lw=1)
    ax.set(xlabel="step", ylabel="loss (nats / byte)", title="autotp-train")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(output, "loss.png"), dpi=120)
    plt.close(fig)


def train(args) -> None:
    import autotp
    from tqdm import tqdm

    autotp.init_distributed()
    rank = dist.get_rank()
    if not torch.cuda.is_available():
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.get_world_size()))
    torch.manual_seed(args.seed)  # same initial weights on every rank
    model = build_model(args.model, args.seq_len)
    n_params = sum(p.numel() for p in model.parameters())
    engine, _, _, _ = autotp.initialize(model=model, config=args.ds_config)
    corpus = load_corpus()
    micro, accum = engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps
    tokens_per_step = micro * accum * engine.dp_world_size * args.seq_len
    rows, start = [], time.perf_counter()
    checkpoints = os.path.join(args.output, "checkpoints")
    if args.resume:
        path, client = engine.load_checkpoint(checkpoints)
        if path is not None:
            rows = client["rows"]
            if rank == 0:
                print(f"autotp-train: resumed from {path} at step {engine.global_steps}")
    first = engine.global_steps
    bar = tqdm(total=args.steps, initial=first, disable=rank != 0, dynamic_ncols=True, desc="autotp-train")
    for step in range(first, args.steps):
        engine.train()
        step_start, loss_sum = time.perf_counter(), 0.0
        for micro_step in range(accum):
            seed = ((args.seed * 1_000_003 + step) * accum + micro_step) * engine.dp_world_size + engine.dp_rank
            input_ids = sample_batch(corpus, micro, args.seq_len, seed).to(engine.device)
            loss = engine(input_ids=input_ids, labels=input_ids).loss
            engine.backward(loss)
            engine.step()
            loss_sum += loss.detach().float()
        mean_loss = (loss_sum / accum).reshape(1)
        if engine.dp_world_size > 1:
            dist.all_reduce(mean_loss, group=engine.groups.dp_group)
            mean_loss /= engine.dp_world_size
        tokens_per_s = tokens_per_step / (time.perf_counter() - step_start)
        rows.append([step + 1, round(mean_loss.item(), 5), engine.get_lr()[0],
                     round(engine.get_global_grad_norm() or 0.0, 5), round(tokens_per_s, 1)])
        bar.set_postfix(loss=f"{rows[-1][1]:.3f}", tok_s=f"{tokens_per_s:,.0f}")
        bar.update()
        if args.save_every and ((step + 1) % args.save_every == 0 or step + 1 == args.steps):
            engine.save_checkpoint(checkpoints, client_state={"rows": rows})
    bar.close()
    elapsed = time.perf_counter() - start
    sample = greedy_sample(engine, "The ", 60)
    model_dir = os.path.join(args.output, "model")
    engine.save_pretrained(model_dir)
    if rank == 0:
        write_curve(args.output, rows)
        where = f"{dist.get_world_size()} x {engine.device.type} ({dist.get_backend()})"
        print(f"autotp-train: {args.model} ({n_params / 1e6:.1f}M params), TP={engine.tp_world_size} x "
              f"DP={engine.dp_world_size} on {where}, {args.steps} steps of {tokens_per_step} tokens")
        print(f"loss {rows[0][1]:.3f} -> {rows[-1][1]:.3f}; {args.steps - first} steps in {elapsed:.1f} s "
              f"({tokens_per_step * (args.steps - first) / elapsed:,.0f} tokens/s)")
        print(f"sample: {sample!r}")
        print(f"model:  {model_dir}  (AutoModelForCausalLM.from_pretrained; input ids are UTF-8 bytes)")
        print(f"curve:  {os.path.join(args.output, 'loss.png')}, {os.path.join(args.output, 'losses.csv')}")
    dist.barrier()  # a rank that tears gloo down while rank 0 still writes can abort (SIGABRT)
    dist.destroy_process_group()


def _worker(local_rank: int, nproc: int, rendezvous_file: str, args) -> None:
    os.environ.update(RANK=str(local_rank), WORLD_SIZE=str(nproc), LOCAL_RANK=str(local_rank),
                      LOCAL_WORLD_SIZE=str(nproc))
    import autotp

    # A file rendezvous: a free port found first and bound later can be taken in between by another job.
    autotp.init_distributed(init_method=f"file://{rendezvous_file}")
    train(args)


def main(argv=None) -> None:
    args = parse_args(argv)
    os.makedirs(args.output, exist_ok=True)
    if "RANK" in os.environ:
        train(args)
        return
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="autotp-rdzv-") as tmp:
        try:
            mp.spawn(_worker, args=(args.nproc, os.path.join(tmp, "store"), args), nprocs=args.nproc, join=True)
        except mp.ProcessRaisedException as err:  # spawn has already stopped the other workers
            sys.stderr.write(err.msg.rstrip() + "\n")  # the worker's traceback
            sys.exit(f"autotp-train: rank {err.error_index} failed: {_last_line(err.msg)}")
        except mp.ProcessExitedException as err:
            sys.exit(f"autotp-train: rank {err.error_index} exited with code {err.exit_code} ({err})")


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else "no error message"


if __name__ == "__main__":
    main()
