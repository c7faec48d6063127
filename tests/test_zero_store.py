"""Both ZeRO stores are `zero.ZeroStore`s: every member the engine and checkpoints rely on, with the Protocol's
parameters. Built in one process (DP 1, no process group), which is all the interface check needs."""

from __future__ import annotations

import inspect

import pytest
import torch

from autotp.config import ZeroConfig
from autotp.groups import ParallelGroups
from autotp.zero import ZeroStore
from autotp.zero.partitioned import PartitionedState
from autotp.zero.replicated import ReplicatedState


def _store(stage: int):
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    named = list(model.named_parameters())
    params, names = [p for _, p in named], [n for n, _ in named]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    groups = ParallelGroups(None, None, 1, 0, 1, 0)
    if stage == 0:
        return ReplicatedState(params, names, optimizer, groups, bucket_size=1000, mixed_precision=False)
    return PartitionedState(params, names, optimizer, groups, ZeroConfig(stage=stage), stage, 1, torch.device("cpu"))


def _protocol_methods() -> dict:
    return {name: member for name, member in vars(ZeroStore).items()
            if callable(member) and not name.startswith("_")}


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_store_is_a_zero_store(stage):
    store = _store(stage)
    assert isinstance(store, ZeroStore)
    assert store.stage == stage and len(store.params) == len(store.names) == 4
    methods = _protocol_methods()
    assert len(methods) == 12, sorted(methods)
    for name, member in methods.items():
        expected = list(inspect.signature(member).parameters)[1:]  # without self
        assert list(inspect.signature(getattr(store, name)).parameters) == expected, name


def test_an_object_missing_a_member_is_not_a_zero_store():
    store = _store(0)
    del store.hooks
    assert not isinstance(store, ZeroStore)
