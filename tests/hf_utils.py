"""Shared pieces of the HF Trainer tests: a tiny random-init model, a token dataset, TrainingArguments."""

from __future__ import annotations

import torch

VOCAB, SEQ = 128, 16


def tiny_model(family: str = "llama", seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model(family, vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=64, tie_word_embeddings=False, head_dim=16)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


class TokenDataset(torch.utils.data.Dataset):
    """`n` random sequences; a few padded (labels -100) so ranks hold different token counts."""

    def __init__(self, n: int = 32, seed: int = 1):
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=gen)
        self.lengths = torch.randint(SEQ // 2, SEQ + 1, (n,), generator=gen)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        labels = self.ids[i].clone()
        labels[self.lengths[i]:] = -100
        mask = (labels != -100).long()
        return {"input_ids": self.ids[i], "labels": labels, "attention_mask": mask}


def training_args(output_dir: str, deepspeed=None, **overrides):
    from transformers import TrainingArguments

    kwargs = dict(output_dir=output_dir, per_device_train_batch_size=4, per_device_eval_batch_size=4,
                  gradient_accumulation_steps=1, learning_rate=1e-3, max_steps=4, logging_steps=1,
                  save_strategy="no", report_to=[], use_cpu=True, seed=0, data_seed=0,
                  dataloader_num_workers=0, disable_tqdm=True, weight_decay=0.01, max_grad_norm=1.0)
    kwargs.update(overrides)
    return TrainingArguments(deepspeed=deepspeed, **kwargs)


def ds_config(tp: int, stage: int = 0, **extra):
    config = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
              "train_batch_size": "auto", "gradient_clipping": "auto", "bf16": {"enabled": "auto"},
              "zero_optimization": {"stage": stage, **({"stage3_prefetch_bucket_size": "auto",
                                                        "stage3_param_persistence_threshold": "auto"}
                                                       if stage == 3 else {})},
              "tensor_parallel": {"autotp_size": tp}}
    config.update(extra)
    return config


def losses(trainer) -> list[float]:
    return [row["loss"] for row in trainer.state.log_history if "loss" in row]


WORDS = ("the a one two red blue cat dog sat ran on under mat log and then it was big small very quick slow "
         "bird fish tree sky").split()


def word_tokenizer():
    """A word-level fast tokenizer over `WORDS` (ids 0-3 special), built in memory: no download."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def text_dataset(n: int = 32, seed: int = 3):
    import random

    from datasets import Dataset

    rng = random.Random(seed)
    return Dataset.from_dict({"text": [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12)))
                                       for _ in range(n)]})
