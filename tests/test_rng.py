"""Dropout RNG streams under TP (CPU, gloo, TP=2, GPT-2 with every dropout at 0.5).

Every call of torch's dropout is recorded with its keep-mask. Attention-probability dropout (4-D, heads sharded
over TP) must draw different masks on the two ranks; dropout on replicated hidden states (3-D: embeddings,
residual branches) identical masks, so the replicas stay equal. Under sequence parallelism the residual dropouts run on sequence
shards inside the decoder stack and must differ too, while the embedding dropout before the stack stays
identical. Resume of the per-rank stream is covered by tests/test_resume.py (attention dropout
inside the TP region, bit-exact losses after a restart).
"""

from __future__ import annotations

import torch

from dist_utils import run_distributed
from families import batch, tiny_model


def _masks(rank, world, sequence_parallel):
    import torch.distributed as dist
    import torch.nn.functional as F

    import autotp

    calls = []
    original = F.dropout

    def recording(x, p=0.5, training=True, inplace=False):
        if training and p > 0:  # the keep-mask itself: the same draw on ones, then replayed for the real call
            state = torch.get_rng_state()
            calls.append((x.dim(), (original(torch.ones_like(x), p) != 0).to(torch.int8)))
            torch.set_rng_state(state)
        return original(x, p, training, inplace)

    torch.nn.functional.dropout = recording
    model = tiny_model("gpt2", attn_pdrop=0.5, resid_pdrop=0.5, embd_pdrop=0.5)
    config = {"train_micro_batch_size_per_gpu": 2,
              "tensor_parallel": {"autotp_size": world, "sequence_parallel": sequence_parallel},
              "optimizer": {"type": "SGD", "params": {"lr": 0.0}}}
    engine, _, _, _ = autotp.initialize(model=model, config=config)
    engine.train()
    torch.manual_seed(7)  # the default stream: the same on every rank, as after any common seeding
    engine(input_ids=batch(seed=3, batch_size=2, seq=8))
    result = []
    for dim, mask in calls:
        gathered = [torch.empty_like(mask) for _ in range(world)]
        dist.all_gather(gathered, mask.contiguous())
        result.append((dim, tuple(mask.shape), all(torch.equal(g, gathered[0]) for g in gathered)))
    return result


def test_tp_local_dropout_differs_per_rank_and_replicated_dropout_agrees():
    calls = run_distributed(2, _masks, False)[0]
    attention = [same for dim, _, same in calls if dim == 4]
    hidden = [same for dim, _, same in calls if dim == 3]
    assert attention and hidden  # 2 layers: 2 attention-prob dropouts; embedding + 2 x (attn, mlp) residuals
    assert not any(attention), calls
    assert all(hidden), calls


def test_sequence_parallel_runs_the_whole_stack_on_the_per_rank_stream():
    calls = run_distributed(2, _masks, True)[0]
    embedding, *stack = [(shape, same) for dim, shape, same in calls if dim == 3]
    assert embedding[1], calls  # before the stack: replicated
    assert stack and all(shape[1] == 4 for shape, _ in stack), calls  # sequence 8 split over 2 ranks
    assert not any(same for _, same in stack), calls
    assert not any(same for dim, _, same in calls if dim == 4), calls
