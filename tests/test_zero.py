"""ZeRO stages 0/1/2 under TP x DP (world 4, gloo) against single-process AdamW on the global batch.

Reference: plain torch in one process on the concatenation of every DP rank's micro-batches, torch's
clip_grad_norm_, AdamW with the same two param groups (decay / no decay). Tolerances: fp32 sums in another
order (TP partial products, reduce-scatter, accumulation over micro-steps) agree to ~1e-7 relative; AdamW
runs with eps=1e-3 so coordinates whose gradient is pure rounding noise are not amplified to a full step.
"""

from __future__ import annotations

import pytest
import torch

from dist_utils import run_distributed
from families import batch, dense_run, losses_and_scales, tiny_model

MICRO, STEPS, SEQ = 2, 3, 10
CLIP, LR = 0.5, 1e-2
# Small buckets so that every stage runs several buckets, padding, and params split across partitions.
BUCKET = 3000


def _micro_batches(step: int, dp: int, gas: int):
    ids = batch(seed=100 + step, batch_size=MICRO * dp * gas, seq=SEQ)
    return ids.view(gas, dp, MICRO, -1)


def _param_groups(model):
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    return [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]


def _reference(family: str, dp: int, gas: int, overrides: dict = None):
    model = tiny_model(family, **(overrides or {}))
    optimizer = torch.optim.AdamW(_param_groups(model), lr=LR, eps=1e-3)
    state, _, norms = dense_run(model, optimizer,
                                [_micro_batches(step, dp, gas).reshape(-1, SEQ) for step in range(STEPS)], CLIP)
    return state, norms


def _train(family: str, tp: int, dp: int, stage: int, gas: int, tp_options: dict = None, overrides: dict = None,
           fused: bool = None):
    import autotp

    model = tiny_model(family, **(overrides or {}))
    optimizer = torch.optim.AdamW(_param_groups(model), lr=LR, eps=1e-3, fused=fused)
    config = {"train_batch_size": MICRO * gas * dp, "train_micro_batch_size_per_gpu": MICRO,
              "gradient_clipping": CLIP, "tensor_parallel": {"autotp_size": tp, **(tp_options or {})},
              "zero_optimization": {"stage": stage, "reduce_bucket_size": BUCKET, "allgather_bucket_size": 1000}}
    engine, _, _, _ = autotp.initialize(model=model, optimizer=optimizer, config=config)
    norms = []
    for step in range(STEPS):
        micro = _micro_batches(step, dp, gas)
        for m in range(gas):
            ids = micro[m, engine.dp_rank].to(engine.device)
            engine.backward(engine(input_ids=ids, labels=ids).loss)
            engine.step()
        norms.append(engine.get_global_grad_norm())
    return engine, optimizer, norms


def _state_numel(optimizer) -> int:
    """Elements of per-element optimizer state (AdamW: exp_avg and exp_avg_sq) held by this rank."""
    return sum(v.numel() for state in optimizer.state.values() for k, v in state.items()
               if torch.is_tensor(v) and v.ndim > 0)


def _matrix(rank, world_size, family, tp, fused):
    dp = world_size // tp
    out = {}
    for stage in (0, 1, 2):
        for gas in (1, 2):
            engine, optimizer, norms = _train(family, tp, dp, stage, gas, fused=fused)
            local = sum(p.numel() for p in engine.module.parameters() if p.requires_grad)
            padding = engine.store.padding_numel() if stage else 0
            buckets = len(engine.store.buckets) if stage else 0
            out[(stage, gas)] = dict(full=engine.consolidated_state_dict(), norms=norms, local=local,
                                     state=_state_numel(optimizer), padding=padding, buckets=buckets,
                                     ranks=(engine.tp_rank, engine.dp_rank))
    return out


# TP=2 runs torch's fused AdamW (the reference keeps the default one): the clipping is then folded into the
# optimizer's step as its grad_scale (`step.takes_grad_scale`) instead of multiplying the gradients.
@pytest.mark.parametrize("tp,fused", [(2, True), (1, None), (4, None)])
def test_zero_stages_match_single_process_adamw(tp, fused):
    family, world = "qwen3", 4
    dp = world // tp
    results = run_distributed(world, _matrix, family, tp, fused)
    for stage in (0, 1, 2):
        for gas in (1, 2):
            runs = [r[(stage, gas)] for r in results]
            ref_state, ref_norms = _reference(family, dp, gas)
            assert min(ref_norms) > CLIP, "clipping must be active for this test to check it"
            torch.testing.assert_close(torch.tensor(runs[0]["norms"]), torch.tensor(ref_norms), rtol=1e-5, atol=0,
                                       msg=f"stage {stage} gas {gas} norms")
            for name, expected in ref_state.items():
                torch.testing.assert_close(runs[0]["full"][name], expected, rtol=1e-5, atol=1e-6,
                                           msg=f"stage {stage} gas {gas}: {name}")
            # Optimizer state: stage 0 holds the whole TP shard on every DP rank; stages 1/2 hold 1/dp of it
            # plus the padding that makes every bucket split evenly over DP (< dp * 128 elements per bucket).
            members_of = {}
            for run in runs:
                members_of.setdefault(run["ranks"][0], []).append(run)
            for members in members_of.values():
                padding = sum(m["padding"] for m in members)
                for run in members:
                    if stage == 0:
                        assert run["state"] == 2 * run["local"]
                    else:
                        assert run["state"] * dp == 2 * (run["local"] + padding), (run["state"], run["local"])
                        assert padding < run["buckets"] * dp * 128, (padding, run["buckets"])


def _overflow(rank, world_size, stage):
    import autotp

    model = tiny_model("llama")
    config = {"train_micro_batch_size_per_gpu": 2, "tensor_parallel": {"autotp_size": 2},
              "fp16": {"enabled": True, "initial_scale_power": 18, "hysteresis": 1},
              "zero_optimization": {"stage": stage, "reduce_bucket_size": BUCKET},
              "gradient_clipping": 1.0, "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}}}
    engine, optimizer, _, _ = autotp.initialize(model=model, config=config)
    masters = {str(p.dtype) for g in optimizer.param_groups for p in g["params"]}
    ids = batch(seed=3 + engine.dp_rank, batch_size=2)
    losses, scales = losses_and_scales(engine, ids)
    return dict(losses=losses, scales=scales, skipped=engine.skipped_steps, masters=masters,
                dtype=str(next(engine.module.parameters()).dtype))


@pytest.mark.parametrize("stage", [1, 2])
def test_fp16_overflow_skips_everywhere(stage):
    # Scale 2**18 overflows fp16 gradients (max 65504) on some rank: every rank of TP2 x DP2 skips the same
    # steps and halves the scale (hysteresis 1) until the gradients fit, then training proceeds.
    results = run_distributed(4, _overflow, stage)
    for result in results:
        assert result["dtype"] == "torch.float16" and result["masters"] == {"torch.float32"}
        assert result["skipped"] >= 1 and result["scales"][0] == 2.0 ** 17
        assert result["scales"] == results[0]["scales"] and result["skipped"] == results[0]["skipped"]
        assert result["losses"][-1] < result["losses"][result["skipped"]], result["losses"]
