"""Tiny random-init configs for every preset family, and the dense-vs-TP comparison both tests use.

Sizes: 4 query heads, 2 KV heads (so TP=4 exercises KV replication), head_dim 16, 2 layers, vocabulary 103
(divisible by neither 2 nor 4).
"""

from __future__ import annotations


import torch
from transformers import AutoConfig, AutoModelForCausalLM

VOCAB = 103
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
              num_hidden_layers=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
FAMILIES = {
    "llama": {},
    "mistral": {"sliding_window": None},
    "qwen2": {},
    "qwen3": {"head_dim": 16},
    "gemma": {"head_dim": 16},
    "gemma2": {"head_dim": 16},
    "gemma3_text": {"head_dim": 16},
    "phi3": {},
    "olmo2": {},
    "starcoder2": {},
    "gpt_neox": {"num_key_value_heads": None, "rotary_pct": 0.5},
    "gpt2": {"n_embd": 64, "n_head": 4, "n_layer": 2, "n_positions": 64, "num_key_value_heads": None},
    "opt": {"ffn_dim": 96, "word_embed_proj_dim": 64, "num_key_value_heads": None},
    "falcon": {"new_decoder_architecture": True, "num_kv_heads": 4, "num_key_value_heads": None, "alibi": False},
    "bloom": {"n_embed": 64, "n_head": 4, "n_layer": 2, "num_key_value_heads": None},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 48, "head_dim": 16,
                  "decoder_sparse_step": 1, "mlp_only_layers": [1]},
}


def tiny_config(family: str, **overrides):
    kwargs = dict(COMMON)
    kwargs.update(FAMILIES[family])
    kwargs.update(overrides)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    config = AutoConfig.for_model(family, **kwargs)
    config._attn_implementation = "eager"
    return config


def tiny_model(family: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides), attn_implementation="eager")
    return model.float()


def batch(seed: int = 1, batch_size: int = 2, seq: int = 12):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch_size, seq), generator=gen)
    return ids


def engine_losses(engine, steps: int = 3, seed: int = 40) -> list:
    """Train `engine` for `steps` steps on fixed batches (2 x 8 tokens, labels = inputs); the losses."""
    losses = []
    for step in range(steps):
        ids = batch(seed=seed + step, batch_size=2, seq=8)
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
    return losses


def dense_run(model, optimizer, batches, clip: float):
    """The single-process reference the distributed runs are checked against: per batch (labels = inputs) the
    loss, backward, clipping to `clip`, the optimizer step. Returns (state_dict, losses, grad norms)."""
    losses, norms = [], []
    for ids in batches:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(float(loss.detach()))
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip)))
        optimizer.step()
        optimizer.zero_grad()
    return model.state_dict(), losses, norms


def losses_and_scales(engine, ids, steps: int = 12) -> tuple:
    """Train `engine` `steps` times on one batch; each step's loss (as fp32) and the loss scale after it."""
    losses, scales = [], []
    for _ in range(steps):
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach().float()))
        scales.append(engine.loss_scale)
    return losses, scales
