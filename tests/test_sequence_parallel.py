"""Sequence parallelism (gloo, worlds 2 and 4) against the dense model, alone and with the vocab-parallel loss.

Tolerances as tests/test_families.py: fp32, sums over TP and sequence shards in another order, rtol 1e-5 with
atol 1e-6 for parameters after an SGD step. Sequence lengths 12 and 11 (even and uneven shards).
"""

from __future__ import annotations

import copy

import pytest
import torch

from dist_utils import run_distributed
from families import batch, tiny_model
from test_families import sgd_step

FAMILIES = ["llama", "qwen3", "gemma2", "gpt2"]


def _compare(rank, world_size, family, seq, vocab_parallel):
    import autotp

    dense = tiny_model(family).eval()
    model = copy.deepcopy(dense)
    autotp.parallelize(model, tp_size=world_size, verbose=False, sequence_parallel=True,
                       vocab_parallel=vocab_parallel)
    ids = batch(seed=9, batch_size=2, seq=seq)
    labels = ids.clone()
    labels[1, 2:4] = -100
    shapes = []

    def record(module, args, kwargs):
        shapes.append(tuple((args[0] if args else kwargs["hidden_states"]).shape))

    norm_hook = model.get_decoder().layers[1].register_forward_pre_hook(record, with_kwargs=True) \
        if hasattr(model, "get_decoder") and hasattr(model.get_decoder(), "layers") else None
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    ref = dense(input_ids=ids, labels=labels)
    ref.loss.backward()
    if norm_hook is not None:
        norm_hook.remove()
    sgd_step(dense, model)
    return dict(loss=out.loss.detach(), ref=ref.loss.detach(), shapes=shapes,
                full=autotp.consolidated_state_dict(model), dense=dense.state_dict())


CASES = [(seq, vocab_parallel) for seq in (12, 11) for vocab_parallel in (False, True)]


def _all_cases(rank, world_size, family):
    return [_compare(rank, world_size, family, seq, vocab_parallel) for seq, vocab_parallel in CASES]


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("family", FAMILIES)
def test_sequence_parallel_matches_dense(family, world_size):
    results = run_distributed(world_size, _all_cases, family)
    for index, (seq, vocab_parallel) in enumerate(CASES):
        first = results[0][index]
        case = f"seq {seq}, vocab_parallel {vocab_parallel}"
        torch.testing.assert_close(first["loss"], first["ref"], rtol=1e-5, atol=0, msg=case)
        for name, expected in first["dense"].items():
            torch.testing.assert_close(first["full"][name], expected, rtol=1e-5, atol=1e-6, msg=f"{case}: {name}")
        if first["shapes"]:  # a middle decoder layer sees only this rank's part of the sequence
            local = [r[index]["shapes"][0][1] for r in results]
            assert sum(local) == seq and max(local) <= -(-seq // world_size), (case, local)


def _engine_runs(rank, world_size, ckpt_dir):
    from test_zero import _train

    out = {}
    options = {"sequence_parallel": True, "vocab_parallel_loss": True}
    for stage in (1, 2):
        engine, _, norms = _train("llama", 2, 2, stage, 2, options)
        out[stage] = (engine.consolidated_state_dict(), norms)
    engine.save_checkpoint(ckpt_dir)  # saved with sequence and vocab parallelism on ...
    plain, _, _ = _train("llama", 2, 2, 2, 2)
    plain.load_checkpoint(ckpt_dir)  # ... loads into a model without either
    out["reloaded"] = plain.consolidated_state_dict()
    return out


def test_engine_zero_and_accumulation_with_sequence_parallel(tmp_path):
    from test_zero import CLIP, _reference

    results = run_distributed(4, _engine_runs, str(tmp_path))[0]
    ref_state, ref_norms = _reference("llama", 2, 2)
    assert min(ref_norms) > CLIP
    for stage in (1, 2):
        full, norms = results[stage]
        torch.testing.assert_close(torch.tensor(norms), torch.tensor(ref_norms), rtol=1e-5, atol=0)
        for name, expected in ref_state.items():
            torch.testing.assert_close(full[name], expected, rtol=1e-5, atol=1e-6, msg=f"stage {stage}: {name}")
    for name, value in results[2][0].items():  # a checkpoint does not depend on the flags
        assert torch.equal(results["reloaded"][name], value), name
