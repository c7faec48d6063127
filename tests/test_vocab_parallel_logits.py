"""`outputs.logits` of a labelled forward under the vocab-parallel loss (gloo, TP 2 and 4): the full logits,
gathered only when read, against the dense model.

Reference: the dense model's logits and gradients on the same batch (fp32). Tolerances as in
tests/test_vocab_parallel.py: the hidden states reaching the LM head went through row-parallel all-reduces (a
different summation order), and the loss sums exp() in TP pieces, so values and gradients agree to ~1e-7
relative; rtol 1e-5 (atol 1e-5 on logits of magnitude ~1, 1e-6 on gradients).
"""

from __future__ import annotations

import copy

import pytest
import torch

from dist_utils import run_distributed
from families import VOCAB, batch, tiny_model


def _full_grads(model) -> dict:
    """Every parameter's full (unsharded) gradient under its original name, on global rank 0."""
    import autotp

    saved = {}
    for param in model.parameters():
        if param.grad is not None and id(param) not in saved:
            saved[id(param)] = param.data
            param.data = param.grad  # consolidated_state_dict gathers `.data` by each parameter's layout
    full = autotp.consolidated_state_dict(model)
    for param in model.parameters():
        if id(param) in saved:
            param.data = saved.pop(id(param))
    return full


def _labelled_logits(rank, world_size):
    import autotp
    from autotp import comm

    gathered_vocab = []  # shapes of full-vocabulary tensors built by the TP all-gather
    all_gather_raw = comm.all_gather_raw

    def counting_all_gather(*args, **kwargs):
        out = all_gather_raw(*args, **kwargs)
        if out.shape[-1] == VOCAB:
            gathered_vocab.append(tuple(out.shape))
        return out

    comm.all_gather_raw = counting_all_gather
    dense = tiny_model("llama")  # train mode; Llama has no dropout, so both models are deterministic
    model = copy.deepcopy(dense)
    autotp.parallelize(model, tp_size=world_size, verbose=False, vocab_parallel=True)
    ids = batch(seed=5, batch_size=3, seq=11)
    labels = ids.clone()
    labels[0, 3:6] = -100
    result = {}

    # (3) A step that reads only the loss (every way the HF Trainer does) gathers nothing.
    out = model(input_ids=ids, labels=labels)
    losses = (out.loss, out["loss"], out[0], out.get("loss"))
    out.loss.backward()
    result["unread_gathers"] = list(gathered_vocab)
    result["repr"] = repr(out)  # printing on one rank must not gather either
    result["unread_loss_paths_equal"] = all(loss is out.loss for loss in losses)
    model.zero_grad()

    # (1), (2) Read logits: full and equal to the dense model's; backprop through loss + a function of them.
    weights = torch.linspace(-1.0, 1.0, VOCAB)

    def aux(logits):  # mixes the whole vocabulary per token, so every rank's slice gets gradient through it
        return (logits.log_softmax(-1) * weights).sum() / logits.shape[0] / logits.shape[1]

    out = model(input_ids=ids, labels=labels)
    logits = out.logits
    (out.loss + aux(logits)).backward()
    result["read_gathers"] = len(gathered_vocab)
    result["cached"] = out.logits is logits and out["logits"] is logits
    ref = dense(input_ids=ids, labels=labels)
    (ref.loss + aux(ref.logits)).backward()
    result.update(logits=logits.detach(), ref_logits=ref.logits.detach(), loss=out.loss.detach(),
                  ref_loss=ref.loss.detach(), grads=_full_grads(model),
                  ref_grads={n: p.grad for n, p in dense.named_parameters() if p.grad is not None})
    model.zero_grad()

    # (4) Each read path on a fresh output: dict items / values (Trainer.prediction_step), to_tuple, slices.
    paths = {
        "items": lambda o: tuple(v for k, v in o.items() if k not in ["loss"])[0],
        "values": lambda o: list(o.values())[1],
        "to_tuple": lambda o: o.to_tuple()[1],
        "slice": lambda o: o[1:][0],
        "index": lambda o: o[1],
        "key": lambda o: o["logits"],
        "dict": lambda o: dict(o)["logits"],
    }
    result["paths"] = {name: read(model(input_ids=ids, labels=labels)).detach() for name, read in paths.items()}
    result["paths"]["return_dict=False"] = model(input_ids=ids, labels=labels, return_dict=False)[1].detach()

    # Eval mode / no_grad: gathered in the forward, so one rank may read alone (rank 0 only, here).
    before = len(gathered_vocab)
    with torch.no_grad():
        out = model(input_ids=ids, labels=labels)
    result["no_grad_gathered_at_forward"] = len(gathered_vocab) - before
    if rank == 0:
        result["no_grad_logits"] = out.logits
    model.eval()
    out = model(input_ids=ids, labels=labels)
    result["eval_type"] = type(out).__name__
    result["eval_logits"] = out.logits.detach() if rank == 0 else None
    model.train()

    # full_logits still gathers in the LM head, and the engine's outputs behave like the model's.
    with autotp.full_logits(model):
        out = model(input_ids=ids, labels=labels)
    result["full_logits_ctx"] = (type(out).__name__, out.logits.detach(), out.loss.detach())
    dense.zero_grad()  # the engine's model starts without gradients
    config = {"train_micro_batch_size_per_gpu": 3, "optimizer": {"type": "SGD", "params": {"lr": 0.1}},
              "tensor_parallel": {"autotp_size": world_size}}  # vocab_parallel_loss: auto
    engine, _, _, _ = autotp.initialize(model=copy.deepcopy(dense), config=config)
    before = len(gathered_vocab)
    out = engine(input_ids=ids, labels=labels)
    engine.backward(out.loss)
    result["engine_unread_gathers"] = len(gathered_vocab) - before
    result["engine_logits"] = out.logits.detach()
    engine.step()
    comm.all_gather_raw = all_gather_raw
    return result


@pytest.mark.parametrize("world_size", [2, 4])
def test_labelled_forward_logits_are_full_when_read(world_size):
    results = run_distributed(world_size, _labelled_logits)
    result = results[0]
    assert result["unread_gathers"] == [], result["unread_gathers"]
    assert "gathered when read" in result["repr"] and result["unread_loss_paths_equal"]
    assert result["read_gathers"] == 1 and result["cached"]  # one gather, for the one read
    assert result["logits"].shape == (3, 11, VOCAB)
    torch.testing.assert_close(result["logits"], result["ref_logits"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(result["loss"], result["ref_loss"], rtol=1e-5, atol=0)
    assert set(result["grads"]) >= set(result["ref_grads"])
    for name, expected in result["ref_grads"].items():
        torch.testing.assert_close(result["grads"][name], expected, rtol=1e-5, atol=1e-6, msg=name)
    for name, logits in result["paths"].items():
        torch.testing.assert_close(logits, result["ref_logits"], rtol=1e-5, atol=1e-5, msg=name)
    assert result["no_grad_gathered_at_forward"] == 1
    torch.testing.assert_close(result["no_grad_logits"], result["ref_logits"], rtol=1e-5, atol=1e-5)
    assert result["eval_type"] == "CausalLMOutputWithPast"  # an ordinary output: nothing deferred
    torch.testing.assert_close(result["eval_logits"], result["ref_logits"], rtol=1e-5, atol=1e-5)
    ctx_type, ctx_logits, ctx_loss = result["full_logits_ctx"]
    assert ctx_type == "CausalLMOutputWithPast"
    torch.testing.assert_close(ctx_logits, result["ref_logits"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ctx_loss, result["ref_loss"], rtol=1e-5, atol=0)
    for rank_result in results:
        assert rank_result["engine_unread_gathers"] == 0
        torch.testing.assert_close(rank_result["engine_logits"], result["ref_logits"], rtol=1e-5, atol=1e-5)
