"""Vocabulary-parallel cross-entropy and LM head (gloo, worlds 2 and 4) against the dense model's loss.

Tolerances: fp32 throughout; the sharded loss sums exp() over the vocabulary in TP pieces and all-reduces them,
a different summation order than F.cross_entropy, so per-token losses and gradients agree to ~1e-7 relative;
rtol 1e-5 as in tests/test_families.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from dist_utils import run_distributed
from families import VOCAB, batch, tiny_model
from test_families import sgd_step

FAMILIES = ["llama", "qwen3", "gemma2", "gpt2"]  # gemma2 and gpt2 tie the LM head to the embedding


def _function_level(rank, world_size):
    from autotp import comm
    from autotp.shard import split_sizes
    from autotp.vocab_parallel import vocab_parallel_cross_entropy

    torch.manual_seed(0)
    logits = torch.randn(37, VOCAB) * 4
    target = torch.randint(0, VOCAB, (37,))
    target[::5] = -100
    sizes = split_sizes(VOCAB, world_size)
    start = sum(sizes[:rank])
    shard = logits[:, start:start + sizes[rank]].clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(shard, target, start, torch.distributed.group.WORLD)
    (loss * torch.linspace(0.5, 1.5, 37)).sum().backward()
    grads = comm.all_gather_raw(shard.grad, torch.distributed.group.WORLD, sizes, dim=-1)
    return loss.detach(), grads, logits, target


@pytest.mark.parametrize("world_size", [2, 4])
def test_vocab_parallel_cross_entropy_matches_torch(world_size):
    results = run_distributed(world_size, _function_level)
    loss, grads, logits, target = results[0]
    full = logits.clone().requires_grad_()
    expected = F.cross_entropy(full, target, reduction="none", ignore_index=-100)
    (expected * torch.linspace(0.5, 1.5, 37)).sum().backward()
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads, full.grad, rtol=1e-5, atol=1e-7)
    assert all(torch.equal(r[0], loss) for r in results)  # every rank gets every token's loss
    assert float(loss[::5].abs().max()) == 0.0 and float(full.grad[::5].abs().max()) == 0.0


def _model_level(rank, world_size, family):
    import autotp

    dense = tiny_model(family).eval()  # GPT-2 has dropout; both models must run deterministically
    model = copy.deepcopy(dense)
    autotp.parallelize(model, tp_size=world_size, verbose=False, vocab_parallel=True)
    ids = batch(seed=5, batch_size=3, seq=11)
    labels = ids.clone()
    labels[0, 3:6] = -100  # ignore_index inside a sequence
    largest = []

    def pack(tensor):
        largest.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    ref = dense(input_ids=ids, labels=labels)
    ref.loss.backward()
    # The HF Trainer's path: a sum divided by the number of counted tokens in the whole (accumulated) batch.
    items = torch.tensor(40)
    loss_items = model(input_ids=ids, labels=labels, num_items_in_batch=items).loss.detach()
    ref_items = dense(input_ids=ids, labels=labels, num_items_in_batch=items).loss.detach()
    with autotp.full_logits(model), torch.no_grad():
        gathered = model(input_ids=ids).logits
    sgd_step(dense, model)
    full = autotp.consolidated_state_dict(model)
    return dict(loss=out.loss.detach(), ref=ref.loss.detach(), items=loss_items, ref_items=ref_items,
                logits=out.logits.detach(), saved_vocab=max(s[-1] for s in largest if len(s) > 1),
                saved_with_full_vocab=[s for s in largest if VOCAB in s], gathered=gathered,
                ref_logits=ref.logits.detach(), full=full, dense=dense.state_dict())


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("family", FAMILIES)
def test_model_loss_and_step_match_dense(family, world_size):
    result = run_distributed(world_size, _model_level, family)[0]
    torch.testing.assert_close(result["loss"], result["ref"], rtol=1e-5, atol=0)
    torch.testing.assert_close(result["items"], result["ref_items"], rtol=1e-5, atol=0)
    # outputs.logits of the labelled call reads as the full logits (eval mode: gathered after the loss)
    torch.testing.assert_close(result["logits"], result["ref_logits"], rtol=1e-5, atol=1e-5)
    assert not result["saved_with_full_vocab"], result["saved_with_full_vocab"]  # no full-vocabulary tensor kept
    torch.testing.assert_close(result["gathered"], result["ref_logits"], rtol=1e-5, atol=1e-5)
    for name, expected in result["dense"].items():
        torch.testing.assert_close(result["full"][name], expected, rtol=1e-5, atol=1e-6, msg=name)


def _engine_config(rank, world_size):
    import autotp

    config = {"train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "SGD", "params": {"lr": 0.1}},
              "tensor_parallel": {"autotp_size": 2, "vocab_parallel_loss": True}}
    engine, _, _, _ = autotp.initialize(model=tiny_model("gpt2"), config=config)
    ids = batch(seed=2, batch_size=2)
    out = engine(input_ids=ids, labels=ids)
    engine.backward(out.loss)
    engine.step()
    return out.logits.shape[-1], float(out.loss.detach()), engine.module.lm_head.weight.shape[0]


def test_engine_config_key():
    results = run_distributed(2, _engine_config)
    assert [r[2] for r in results] == [52, 51]  # the LM head: 103 split unevenly
    assert [r[0] for r in results] == [103, 103]  # outputs.logits read after a labelled call: gathered
    assert results[0][1] == results[1][1]


def _auto_default(rank, world_size):
    """The engine's default (`vocab_parallel_loss: auto`) on a causal LM, and on a model whose forward has its
    own cross-entropy."""
    import autotp
    from transformers import AutoModelForSequenceClassification

    from families import tiny_config

    config = {"train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "SGD", "params": {"lr": 0.1}},
              "tensor_parallel": {"autotp_size": 2}}
    dense = tiny_model("llama").eval()
    engine, _, _, _ = autotp.initialize(model=copy.deepcopy(dense), config=config)
    ids = batch(seed=3, batch_size=2)
    with torch.no_grad():
        with_labels = engine(input_ids=ids, labels=ids)
        without = engine(input_ids=ids)  # the caller's own loss or generation: full logits, as on the dense model
        head_widths = []  # the LM head's output features per call
        record = engine.module.lm_head.register_forward_hook(lambda m, a, out: head_widths.append(out.shape[-1]))
        positional = engine.module(ids, None, None, None, None, ids)  # labels passed by position
        record.remove()
        positional_sliced = head_widths == [engine.module.lm_head.weight.shape[0]]  # the pre-hook saw the labels
        ref = dense(input_ids=ids, labels=ids)
    classifier = AutoModelForSequenceClassification.from_config(tiny_config("llama", num_labels=3))
    decided = autotp.parallelize(classifier, tp_size=2, verbose=False, vocab_parallel="auto")
    return dict(labelled=with_labels.logits, loss=with_labels.loss, ref_loss=ref.loss,
                full=without.logits, ref_logits=ref.logits, positional=positional.logits,
                positional_sliced=positional_sliced, head_split=engine.module.lm_head.weight.shape[0],
                embedding_split=engine.module.get_input_embeddings().weight.shape[0],
                classifier_has_head=decided.get_output_embeddings() is not None)


def test_auto_default_turns_it_on_for_causal_lms_only():
    result = run_distributed(2, _auto_default)[0]
    assert result["head_split"] == 52 and result["embedding_split"] == 52 and result["positional_sliced"]
    # labels by keyword or by position: the vocab-parallel loss, and (no_grad) logits gathered after it
    torch.testing.assert_close(result["labelled"], result["ref_logits"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(result["positional"], result["ref_logits"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(result["loss"], result["ref_loss"], rtol=1e-5, atol=0)
    assert result["full"].shape[-1] == VOCAB
    torch.testing.assert_close(result["full"], result["ref_logits"], rtol=1e-5, atol=1e-5)
    assert not result["classifier_has_head"]  # no LM head: auto leaves the model's plan alone, no error


def test_supports_vocab_parallel_loss_needs_the_hf_loss_hook():
    from autotp.vocab_parallel import supports_vocab_parallel_loss

    model = tiny_model("llama")
    assert supports_vocab_parallel_loss(model)

    class OwnLoss(type(model)):
        def forward(self, input_ids=None, labels=None, **kwargs):  # a model with its own cross-entropy
            logits = self.lm_head(self.model(input_ids).last_hidden_state)
            return F.cross_entropy(logits.flatten(0, 1), labels.flatten())

    model.__class__ = OwnLoss
    assert not supports_vocab_parallel_loss(model)
