"""TRL's SFTTrainer through `autotp.hf.with_autotp` at TP=2 against the stock SFTTrainer on one process.

SGD, so a weight's difference is lr x its gradient's difference (fp32 summation order, ~1e-7 relative): rtol 1e-5
on losses, atol 1e-5 on weights. (Under Adam one near-zero gradient element in 4096 moved by 2.5e-5 = lr x 0.025:
m / sqrt(v) amplifies noise where v is tiny, which says nothing about the sharding.)"""

from __future__ import annotations

import pytest
import torch

import hf_utils as H
from dist_utils import run_distributed

pytest.importorskip("trl")


def _sft(rank, world, out, tp):
    import autotp
    import autotp.hf
    from trl import SFTConfig, SFTTrainer

    model = H.tiny_model()
    deepspeed = H.ds_config(tp) if tp else None
    config = SFTConfig(output_dir=out, per_device_train_batch_size=4, learning_rate=0.1, optim="sgd", max_steps=3,
                       logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0, data_seed=0,
                       max_length=16, disable_tqdm=True, bf16=False, deepspeed=deepspeed)
    cls = autotp.hf.with_autotp(SFTTrainer) if tp else SFTTrainer
    trainer = cls(model=model, args=config, train_dataset=H.text_dataset(), processing_class=H.word_tokenizer())
    trainer.train()
    full = autotp.consolidated_state_dict(model) if tp else model.state_dict()
    return H.losses(trainer), full


def test_sft_trainer_tp2_matches_dense(tmp_path):
    ref = run_distributed(1, _sft, str(tmp_path / "dense"), 0)[0]
    got = run_distributed(2, _sft, str(tmp_path / "tp"), 2)[0]
    assert len(got[0]) == len(ref[0]) == 3
    assert got[0] == pytest.approx(ref[0], rel=1e-5)
    for name, value in ref[1].items():
        torch.testing.assert_close(got[1][name], value, rtol=0, atol=1e-5, msg=name)
