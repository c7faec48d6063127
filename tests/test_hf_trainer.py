"""autotp.hf.Trainer against transformers.Trainer on one process: same seed, data and hyper-parameters.

Tolerances: the runs differ only in fp32 summation order (TP splits each GEMM's reduction, DP splits the batch
mean), ~1e-7 relative per operation; after 4 AdamW steps the largest weight difference seen was 1.1e-6, and Adam's
normalised update keeps it near lr x 1e-3, so weights get atol 1e-5 and losses rtol 1e-5.
"""

from __future__ import annotations

import os

import pytest
import torch

import hf_utils as H
from dist_utils import run_distributed

pytest.importorskip("accelerate")
LOSS_RTOL, WEIGHT_ATOL = 1e-5, 1e-5


def _eval_metrics(trainer) -> dict:
    """evaluate()'s metrics, and predict()'s logits of the eval samples under "predictions"."""
    metrics = trainer.evaluate()
    metrics["predictions"] = torch.as_tensor(trainer.predict(H.TokenDataset(8, seed=2)).predictions)
    return metrics


def _dense(rank, world, out, overrides, evaluate):
    import autotp.hf  # noqa: F401  (hooks installed: a plain run must be unaffected)
    import transformers

    model = H.tiny_model()
    args = H.training_args(out, **overrides)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=H.TokenDataset(),
                                   eval_dataset=H.TokenDataset(8, seed=2))
    trainer.train()
    metrics = _eval_metrics(trainer) if evaluate else {}
    return H.losses(trainer), {k: v.detach().clone() for k, v in model.state_dict().items()}, metrics


def _autotp(rank, world, out, tp, stage, overrides, evaluate, save_dir):
    import autotp
    import autotp.hf  # noqa: F401  (installs the TrainingArguments hook before the arguments are built)

    model = H.tiny_model()
    overrides = dict(overrides)
    overrides["per_device_train_batch_size"] = overrides.get("per_device_train_batch_size", 4) * tp // world
    args = H.training_args(out, deepspeed=H.ds_config(tp, stage), **overrides)
    trainer = autotp.hf.Trainer(model=model, args=args, train_dataset=H.TokenDataset(),
                                eval_dataset=H.TokenDataset(8, seed=2))
    trainer.train()
    metrics = _eval_metrics(trainer) if evaluate else {}
    if save_dir:
        trainer.save_model(save_dir)
    full = autotp.consolidated_state_dict(model)
    return H.losses(trainer), full, metrics, trainer.get_total_train_batch_size(args)


def _compare(ref, got):
    assert got[0] == pytest.approx(ref[0], rel=LOSS_RTOL)
    assert len(got[0]) == len(ref[0])
    for name, value in ref[1].items():
        torch.testing.assert_close(got[1][name], value, rtol=0, atol=WEIGHT_ATOL, msg=name)


# The last case trains with torch's fused AdamW and a norm limit every step exceeds: autotp clips inside the fused
# step (`step.takes_grad_scale`), the dense Trainer with clip_grad_norm_.
FUSED_CLIPPED = {"optim": "adamw_torch_fused", "max_grad_norm": 0.05}


@pytest.mark.parametrize("world,tp,stage,overrides", [(2, 2, 0, {}), (4, 2, 1, {}), (4, 2, 3, {}),
                                                      (2, 2, 1, FUSED_CLIPPED)])
def test_trainer_matches_dense(tmp_path, world, tp, stage, overrides):
    ref = run_distributed(1, _dense, str(tmp_path / "dense"), overrides, False)[0]
    got = run_distributed(world, _autotp, str(tmp_path / "tp"), tp, stage, overrides, False, None)
    _compare(ref, got[0])
    assert got[0][3] == 4  # total train batch: micro x accumulation x DP, not x world (DeepSpeed #7298)


def test_accumulation_evaluate_and_save(tmp_path):
    """Gradient accumulation 2 at ZeRO-2, evaluate() loss, and save_model() read back by plain transformers."""
    overrides = dict(gradient_accumulation_steps=2, per_device_train_batch_size=2)
    ref = run_distributed(1, _dense, str(tmp_path / "dense"), overrides, True)[0]
    save_dir = str(tmp_path / "saved")
    got = run_distributed(2, _autotp, str(tmp_path / "tp"), 2, 2, overrides, True, save_dir)[0]
    _compare(ref, got)
    assert got[2]["eval_loss"] == pytest.approx(ref[2]["eval_loss"], rel=LOSS_RTOL)
    # predict(): the full-vocabulary logits of every sample, once (not once per TP rank). atol 1e-4: each logit
    # sums 64 products with weights that may differ by WEIGHT_ATOL, so up to ~sqrt(64) x 1e-5 plus the layers below.
    assert got[2]["predictions"].shape == ref[2]["predictions"].shape == (8, H.SEQ, H.VOCAB)
    torch.testing.assert_close(got[2]["predictions"], ref[2]["predictions"], rtol=0, atol=1e-4)
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(save_dir).state_dict()
    for name, value in ref[1].items():
        torch.testing.assert_close(reloaded[name], value, rtol=0, atol=WEIGHT_ATOL, msg=name)


def _resume(rank, world, out, tp, resume_from, max_steps):
    import autotp.hf

    model = H.tiny_model()
    args = H.training_args(out, deepspeed=H.ds_config(tp, 1), per_device_train_batch_size=4 * tp // world,
                           max_steps=max_steps, save_strategy="steps", save_steps=2)
    trainer = autotp.hf.Trainer(model=model, args=args, train_dataset=H.TokenDataset())
    trainer.train(resume_from_checkpoint=resume_from)
    return H.losses(trainer)


def test_resume_same_and_other_layout(tmp_path):
    """A step checkpoint resumed at TP=2 and at TP=1 x DP=2 continues with the uninterrupted run's losses."""
    out = str(tmp_path / "run")
    full = run_distributed(2, _resume, out, 2, None, 4)[0]
    checkpoint = os.path.join(out, "checkpoint-2")
    assert os.path.isdir(os.path.join(checkpoint, "autotp"))
    same = run_distributed(2, _resume, str(tmp_path / "same"), 2, checkpoint, 4)[0]
    other = run_distributed(2, _resume, str(tmp_path / "other"), 1, checkpoint, 4)[0]
    # log_history comes back from the checkpoint: steps 1-2 as saved, 3-4 trained after the resume
    assert len(same) == len(other) == len(full) == 4
    assert same[2:] == pytest.approx(full[2:], rel=LOSS_RTOL)
    assert other[2:] == pytest.approx(full[2:], rel=LOSS_RTOL)


def _config_sections(rank, world, out, use_autotp):
    """DeepSpeed's optimizer and scheduler sections with "auto" values, against the same optimizer given to a
    plain Trainer (AdamW on every parameter, decay included, as DeepSpeed builds it; WarmupDecayLR)."""
    import autotp.hf
    import transformers
    from autotp.optim import WarmupDecayLR

    model = H.tiny_model()
    extra = {"optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                       "weight_decay": "auto"}},
             "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                               "warmup_num_steps": "auto",
                                                               "total_num_steps": "auto"}}}
    if use_autotp:
        args = H.training_args(out, deepspeed=H.ds_config(2, 0, **extra), warmup_steps=2)
        trainer = autotp.hf.Trainer(model=model, args=args, train_dataset=H.TokenDataset())
    else:
        args = H.training_args(out, warmup_steps=2)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
        sched = WarmupDecayLR(opt, total_num_steps=4, warmup_min_lr=0, warmup_max_lr=1e-3, warmup_num_steps=2)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=H.TokenDataset(),
                                       optimizers=(opt, sched))
    trainer.train()
    return H.losses(trainer), [row["learning_rate"] for row in trainer.state.log_history if "loss" in row]


def test_config_optimizer_and_scheduler_auto(tmp_path):
    ref = run_distributed(1, _config_sections, str(tmp_path / "dense"), False)[0]
    got = run_distributed(2, _config_sections, str(tmp_path / "tp"), True)[0]
    assert got[1] == pytest.approx(ref[1], rel=1e-12)  # the same schedule, computed the same way
    assert got[0] == pytest.approx(ref[0], rel=LOSS_RTOL)


def test_mismatch_and_stock_trainer_errors(tmp_path):
    import autotp.hf  # noqa: F401
    import transformers
    from autotp import ConfigError

    args = H.training_args(str(tmp_path), deepspeed=H.ds_config(1, gradient_clipping=0.5))
    with pytest.raises(ConfigError, match=r"TP|tensor parallelism"):
        transformers.Trainer(model=H.tiny_model(), args=args, train_dataset=H.TokenDataset())
    with pytest.raises(ConfigError, match=r"gradient_clipping = 0.5 .* max_grad_norm = 1.0"):
        autotp.hf.Trainer(model=H.tiny_model(), args=args, train_dataset=H.TokenDataset())
    grid = H.ds_config(1)
    grid["tensor_parallel"]["grid"] = [1, 1]  # the Trainer calls the model itself: 2-D TP is refused, not wrong
    args = H.training_args(str(tmp_path / "grid"), deepspeed=grid)
    with pytest.raises(ConfigError, match=r"'tensor_parallel.grid' .* not supported through the HF Trainer"):
        autotp.hf.Trainer(model=H.tiny_model(), args=args, train_dataset=H.TokenDataset())


def _lora(rank, world, out, tp):
    import autotp
    import autotp.hf  # noqa: F401
    import transformers
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(H.tiny_model(), LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,  # lora_B nonzero: both factors train
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    if tp:
        args = H.training_args(out, deepspeed=H.ds_config(tp, 2), per_device_train_batch_size=4 * tp // world)
        trainer = autotp.hf.Trainer(model=model, args=args, train_dataset=H.TokenDataset())
    else:
        args = H.training_args(out)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=H.TokenDataset())
    trainer.train()
    trainer.save_model(out + "/adapter")
    return H.losses(trainer)


@pytest.mark.parametrize("world,tp", [(2, 2), (4, 2)])
def test_peft_lora_through_trainer(tmp_path, world, tp):
    """A PEFT LoRA model through autotp.hf.Trainer (TP=2, TP=2 x DP=2 at ZeRO-2) against the stock Trainer: the
    same losses and the same adapter files (whole lora_A / lora_B)."""
    from safetensors.torch import load_file

    ref = run_distributed(1, _lora, str(tmp_path / "dense"), 0)[0]
    got = run_distributed(world, _lora, str(tmp_path / "tp"), tp)[0]
    assert got == pytest.approx(ref, rel=LOSS_RTOL)
    dense = load_file(str(tmp_path / "dense" / "adapter" / "adapter_model.safetensors"))
    mine = load_file(str(tmp_path / "tp" / "adapter" / "adapter_model.safetensors"))
    assert sorted(mine) == sorted(dense) and all(mine[k].shape == dense[k].shape for k in dense)
    for name, value in dense.items():
        torch.testing.assert_close(mine[name], value, rtol=0, atol=WEIGHT_ATOL, msg=name)


def _fp16(rank, world, out, tp):
    import autotp.hf

    model = H.tiny_model()
    # A first loss scale of 2**24 overflows fp16 gradients: those steps are skipped on every rank, the scale
    # halves each time (hysteresis 1), and the LR schedule does not advance on a skipped step.
    config = H.ds_config(tp, 1, fp16={"enabled": "auto", "initial_scale_power": 24, "hysteresis": 1})
    args = H.training_args(out, deepspeed=config, fp16=True, max_steps=20, per_device_train_batch_size=4 * tp // world,
                           learning_rate=1e-3, lr_scheduler_type="linear")
    trainer = autotp.hf.Trainer(model=model, args=args, train_dataset=H.TokenDataset())
    trainer.train()
    rows = [row for row in trainer.state.log_history if "loss" in row]
    return ([row["loss"] for row in rows], [row.get("grad_norm") for row in rows],
            [row["learning_rate"] for row in rows], trainer._autotp_engine.loss_scaler.scale,
            next(p for p in model.parameters()).dtype)


def test_fp16_loss_scaling_skips_overflow():
    """fp16 as DeepSpeed trains it: fp16 weights, fp32 masters, dynamic loss scale; overflowing steps are skipped
    (no grad_norm logged, learning rate held) and TP=2 follows the same curve as TP=1 (rel 1e-3: fp16 GEMMs summed
    in another order round at 2**-11 relative; the losses seen differed by 2e-5)."""
    import tempfile

    one = run_distributed(1, _fp16, tempfile.mkdtemp(), 1)[0]
    two = run_distributed(2, _fp16, tempfile.mkdtemp(), 2)[0]
    for losses, norms, lrs, scale, dtype in (one, two):
        assert dtype == torch.float16 and scale < 2.0 ** 24
        assert norms[0] is None and any(norm is not None for norm in norms)  # overflow first, then it trains
        for i in range(len(lrs) - 1):  # the logged lr is the one used: held after a skipped step, lower after one
            assert (lrs[i + 1] == lrs[i]) if norms[i] is None else (lrs[i + 1] < lrs[i]), (i, norms, lrs)
    assert [n is None for n in two[1]] == [n is None for n in one[1]]  # every rank skips together, TP or not
    assert two[0] == pytest.approx(one[0], rel=1e-3)
    assert one[0][-1] < one[0][0] - 0.2  # it learned


def _evaluate_only(rank, world, out, tp):
    """No training: evaluate() and predict() on 10 samples (not a multiple of the global eval batch of 4: the last
    batch is padded and the padding dropped), and an object gather."""
    import autotp.hf
    import transformers

    model = H.tiny_model()
    data = H.TokenDataset(10, seed=4)
    # Batches of 2 samples in both runs: eval_loss is a mean of per-batch means, so the batches must be the same
    # (DP=2 x 2 reads samples [0,1] [2,3] | [4,5] [6,7] | [8,9] [padding]).
    if tp:
        args = H.training_args(out, deepspeed=H.ds_config(tp), per_device_eval_batch_size=2)
        trainer = autotp.hf.Trainer(model=model, args=args, eval_dataset=data)
    else:
        args = H.training_args(out, per_device_eval_batch_size=2)
        trainer = transformers.Trainer(model=model, args=args, eval_dataset=data)
    loss = trainer.evaluate()["eval_loss"]
    prediction = trainer.predict(data)
    dp_rank = trainer._autotp_groups.dp_rank if tp else 0
    objects = trainer.accelerator.gather_for_metrics([f"dp{dp_rank}"], use_gather_object=True)
    return loss, torch.as_tensor(prediction.predictions), torch.as_tensor(prediction.label_ids), objects


def test_evaluate_predict_over_dp_with_remainder(tmp_path):
    """TP=2 x DP=2 against the stock Trainer under DDP on 2 processes, the same DP layout: transformers' distributed
    eval_loss differs from its one-process value on this padded last batch (4.674 against 4.859 here), and autotp
    must report what the stock Trainer reports for the same data layout. Predictions and labels equal the one-process
    run's as well."""
    one = run_distributed(1, _evaluate_only, str(tmp_path / "one"), 0)[0]
    ref = run_distributed(2, _evaluate_only, str(tmp_path / "ddp"), 0)[0]
    got = run_distributed(4, _evaluate_only, str(tmp_path / "tp"), 2)
    assert torch.equal(ref[1], one[1]) and torch.equal(ref[2], one[2])
    for rank_result in got:  # every rank reports the same metrics
        assert rank_result[0] == pytest.approx(ref[0], rel=LOSS_RTOL)
        assert rank_result[1].shape == ref[1].shape == (10, H.SEQ, H.VOCAB)
        # atol 1e-5: the same weights (no training), logits differ only by fp32 summation order across TP
        torch.testing.assert_close(rank_result[1], ref[1], rtol=0, atol=1e-5)
        assert torch.equal(rank_result[2], ref[2])
        assert rank_result[3] == ["dp0", "dp1"]  # one entry per DP rank, not one per process
