"""2-D tensor parallelism through `autotp.initialize` (`tensor_parallel.grid`): a tiny Llama on a 2 x 2 grid
(world 4) and on two 2 x 2 grids with ZeRO stages 0, 1 and 2 over DP (world 8) trains like single-process AdamW on
the global batch, with gradient clipping and accumulation: per-step gradient norms, and every parameter after three steps
(consolidated by the engine). Tolerance: fp32, the same sums in other orders (gathered blocks, reduce-scattered
partials, the DP mean), carried through three AdamW steps whose eps (1e-3) keeps the update's sensitivity to a
gradient's last bits low: rtol 1e-5 / atol 1e-6 on the norms, 1e-5 / 1e-5 on the weights.

Also: a family the grid does not support falls back to 1-D with one log line, and the config's refusals."""

from __future__ import annotations

import pytest
import torch

from dist_utils import run_distributed
from families import batch, dense_run, tiny_model

MICRO, STEPS, SEQ = 4, 3, 10
LLAMA = dict(vocab_size=104, attention_bias=True, mlp_bias=True)  # the grid's columns split the head's vocabulary;
# biases: column blocks shared by the grid's rows, their gradients summed over them


def _micro_batches(step: int, dp: int, gas: int):
    ids = batch(seed=200 + step, batch_size=MICRO * dp * gas, seq=SEQ)
    return ids.view(gas, dp, MICRO, -1)


def _reference(dp: int, gas: int, clip: float):
    model = tiny_model("llama", **LLAMA)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, eps=1e-3, weight_decay=0.01)
    return dense_run(model, optimizer, [_micro_batches(step, dp, gas).reshape(-1, SEQ) for step in range(STEPS)],
                     clip)


def _train_grid(rank, world, grid, gas, clip, stage):
    import autotp

    tp = grid[0] * grid[1]
    dp = world // tp
    config = {"train_batch_size": MICRO * gas * dp, "train_micro_batch_size_per_gpu": MICRO,
              "gradient_clipping": clip, "zero_optimization": {"stage": stage},
              "tensor_parallel": {"autotp_size": tp, "grid": list(grid)},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "eps": 1e-3, "weight_decay": 0.01}}}
    engine, _, _, _ = autotp.initialize(model=tiny_model("llama", **LLAMA), config=config)
    assert engine.module.autotp_grid.rows == grid[0] and (engine.tp_world_size, engine.dp_world_size) == (tp, dp)
    norms, losses = [], []
    for step in range(STEPS):
        micro = _micro_batches(step, dp, gas)
        for m in range(gas):
            ids = micro[m, engine.dp_rank]  # the TP group's batch: the engine gives each grid row its half
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            engine.step()
            losses.append(float(loss))
        norms.append(engine.get_global_grad_norm())
    with pytest.raises(autotp.config.ConfigError, match="save_checkpoint does not support 2-D"):
        engine.save_checkpoint("/nonexistent")
    return engine.consolidated_state_dict(), norms, losses


@pytest.mark.parametrize("world,gas,clip,stage", [(4, 1, 0.5, 0), (8, 2, 1.0, 0), (8, 1, 1.0, 1), (8, 2, 0.5, 2)])
def test_a_grid_trains_like_one_process_on_the_global_batch(world, gas, clip, stage):
    results = run_distributed(world, _train_grid, (2, 2), gas, clip, stage)
    want_state, want_losses, want_norms = _reference(world // 4, gas, clip)
    state, norms, losses = results[0]
    if world == 4:  # one micro-batch a step: the engine's loss is the global batch's
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(want_losses), rtol=1e-5, atol=0)
    assert all(r[0] is None for r in results[1:])  # consolidated on global rank 0 only
    torch.testing.assert_close(torch.tensor(norms), torch.tensor(want_norms), rtol=1e-5, atol=1e-6)
    assert set(state) == set(want_state)
    for name, value in want_state.items():
        torch.testing.assert_close(state[name], value, rtol=1e-5, atol=1e-5, msg=name)
    assert all(r[1] == norms for r in results)  # every rank reports the same norm


def _fallback(rank, world):
    import logging

    import autotp

    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    logging.getLogger("autotp").addHandler(Keep())
    config = {"train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "SGD", "params": {"lr": 0.1}},
              "tensor_parallel": {"autotp_size": 2, "grid": [1, 2]}}
    engine, _, _, _ = autotp.initialize(model=tiny_model("gpt2"), config=config)
    ids = batch(seed=5, batch_size=2, seq=8)
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()
    return getattr(engine.module, "autotp_grid", None) is None, [m for m in seen if "tensor_parallel.grid" in m]


def test_an_unsupported_family_falls_back_to_1d_with_one_log_line():
    (one_d, lines), (one_d_1, lines_1) = run_distributed(2, _fallback)
    assert one_d and one_d_1
    assert len(lines) == 1 and "Llama-style causal LMs" in lines[0] and "1-D tensor parallelism" in lines[0]
    assert lines_1 == []  # rank 0 only


@pytest.mark.parametrize("section,zero,match", [
    ({"autotp_size": 4, "grid": [2, 3]}, 0, "is 6 ranks, but tensor_parallel.autotp_size is 4"),
    ({"autotp_size": 4, "grid": [4]}, 0, "must be \\[rows, cols\\]"),
    ({"autotp_size": 2, "grid": [1, 2], "sequence_parallel": True}, 0, "does not combine with"),
    ({"autotp_size": 2, "grid": [2, 1]}, 3, "stages 0-2 are supported, not 3 yet"),
])
def test_the_config_refuses_a_grid_it_cannot_run(section, zero, match):
    from autotp.config import ConfigError, parse_config

    with pytest.raises(ConfigError, match=match):
        parse_config({"train_micro_batch_size_per_gpu": 2, "tensor_parallel": section,
                      "zero_optimization": {"stage": zero}}, 4)


def _round_trip(rank, world, directory):
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    import autotp

    def engine_for(model, grid):
        section = {"autotp_size": 4, **({"grid": grid} if grid else {})}
        config = {"train_micro_batch_size_per_gpu": 4, "tensor_parallel": section,
                  "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "eps": 1e-3}}}
        return autotp.initialize(model=model, config=config)[0]

    ids = batch(seed=9, batch_size=4, seq=SEQ)
    losses = []
    engine = engine_for(tiny_model("llama", **LLAMA), None)  # 1-D TP=4: train a step, save, load on a grid
    for what, grid in (("1d", [2, 2]), ("2d", None)):
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
        losses.append(float(engine(input_ids=ids, labels=ids).loss))
        path = f"{directory}/{what}"
        engine.save_pretrained(path)
        dist.barrier()
        engine = engine_for(AutoModelForCausalLM.from_pretrained(path), grid)
        losses.append(float(engine(input_ids=ids, labels=ids).loss))
    return losses


def test_a_1d_save_loads_on_a_grid_and_back(tmp_path):
    """1-D TP=4 trains a step and saves; the saved model on a 2 x 2 grid gives the same loss, trains a step and
    saves; that loads at 1-D TP=4 with the same loss again (fp32: a few ulps of reordered sums)."""
    losses = run_distributed(4, _round_trip, str(tmp_path))[0]
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=0)
    torch.testing.assert_close(losses[3], losses[2], rtol=1e-5, atol=0)
    assert losses[2] != losses[1]  # the grid trained


def _padded(rank, world):
    import autotp

    ids = batch(seed=31, batch_size=4, seq=SEQ)
    labels = ids.clone()
    labels[0, 2:] = -100  # grid row 0 holds 11 labelled tokens, row 1 holds 18: unequal shares of the mean
    labels[1, 5:] = -100
    dense = tiny_model("llama", **LLAMA)
    dense_loss = dense(input_ids=ids, labels=labels).loss
    dense_loss.backward()
    config = {"train_micro_batch_size_per_gpu": 4, "tensor_parallel": {"autotp_size": 2, "grid": [2, 1]},
              "optimizer": {"type": "SGD", "params": {"lr": 1.0}}}
    engine, _, _, _ = autotp.initialize(model=tiny_model("llama", **LLAMA), config=config)
    loss = engine(input_ids=ids, labels=labels).loss
    as_tuple = engine(input_ids=ids, labels=labels, return_dict=False)[0]
    engine.backward(loss)
    engine.step()
    after = engine.consolidated_state_dict()
    with torch.no_grad():
        want = {name: p - 1.0 * p.grad for name, p in dense.named_parameters()}  # one SGD step, lr 1
    return float(loss), float(as_tuple), float(dense_loss), after, want


def test_padded_rows_weigh_as_in_the_dense_model():
    """Rows with different numbers of labelled tokens: the engine's loss (also from a tuple output) and the SGD
    step equal the dense model's on the whole batch, not a mean of the rows' means."""
    loss, as_tuple, dense_loss, after, want = run_distributed(2, _padded)[0]
    assert loss == pytest.approx(dense_loss, rel=1e-5) and as_tuple == pytest.approx(dense_loss, rel=1e-5)
    for name, value in want.items():
        torch.testing.assert_close(after[name], value, rtol=1e-5, atol=1e-6, msg=name)
