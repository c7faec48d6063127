"""autotp under the HF `Trainer`, TRL and PEFT: a DeepSpeed config with `tensor_parallel` in `TrainingArguments`
trains with autotp's TP x ZeRO, no DeepSpeed needed.

    import autotp.hf                                   # before TrainingArguments are built
    args = TrainingArguments(..., deepspeed="ds_config.json")
    trainer = autotp.hf.Trainer(model=model, args=args, train_dataset=data)
    trainer = autotp.hf.with_autotp(trl.SFTTrainer)(model=model, args=sft_config, train_dataset=data)
"""

from __future__ import annotations

import transformers

from .args import install_hooks
from .trainer import AutoTPTrainerMixin, with_autotp

install_hooks()

Trainer = with_autotp(transformers.Trainer)

__all__ = ["Trainer", "with_autotp", "AutoTPTrainerMixin"]
