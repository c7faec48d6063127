"""Batches and metrics of a Trainer over the DP group instead of the whole world.

Every rank of a TP group must read the same batch, and DP ranks disjoint ones. accelerate shards a Trainer's data
loaders over `num_processes` / `process_index` and gathers metrics over all processes; `DPView` is the trainer's
`Accelerator` seen with the DP size and DP rank in their place, so the data loaders (accelerate's own
`prepare_data_loader`, seedable sampler and `skip_first_batches` included) shard over DP exactly as a DP-only run
of the same size would, and `gather_for_metrics` (tensors and, with `eval_use_gather_object`, Python objects) keeps
one copy of each TP group's result.
"""

from __future__ import annotations

import functools

import torch


class DPView:
    """`accelerator` with `num_processes` = DP size and `process_index` = DP rank; `gather` returns each DP rank's
    data once (TP ranks hold the same). Everything else is the accelerator's."""

    def __init__(self, accelerator, groups):
        self._accelerator = accelerator
        self.num_processes = groups.dp_size
        self.process_index = groups.dp_rank
        self._tp_size = groups.tp_size
        self._world = groups.dp_size * groups.tp_size

    def __getattr__(self, name):
        return getattr(self._accelerator, name)

    def _prepare_device_mesh(self):
        return None  # the DP size and rank above already say which ranks share a batch

    def gather(self, data):
        from accelerate.utils import recursively_apply

        gathered = self._accelerator.gather(data)  # rank-major: [rank 0's rows, rank 1's rows, ...]

        def one_per_tp_group(tensor: torch.Tensor) -> torch.Tensor:
            if tensor.dim() == 0:
                return tensor
            per_rank = tensor.reshape(self._world, tensor.shape[0] // self._world, *tensor.shape[1:])
            return per_rank[::self._tp_size].flatten(0, 1)  # ranks r*tp (TP rank 0 of each DP rank)

        return recursively_apply(one_per_tp_group, gathered)

    def gather_object(self, data) -> list:
        """Every DP rank's list of objects, once: TP rank 0's of each DP rank, in DP-rank order."""
        import torch.distributed as dist

        per_rank = [None] * self._world
        dist.all_gather_object(per_rank, data)
        return [item for rank_data in per_rank[::self._tp_size] for item in rank_data]

    def gather_for_metrics(self, data, use_gather_object: bool = False):
        """accelerate's `gather_for_metrics` over DP: tensors through `gather`, other objects through
        `gather_object`, then the padding samples of the last batch dropped (`gradient_state.remainder`)."""
        from accelerate.utils import recursively_apply

        try:
            recursively_apply(lambda x: x, data, error_on_other_type=True)
        except TypeError:
            use_gather_object = True
        gathered = self.gather_object(data) if use_gather_object else self.gather(data)
        state = self._accelerator.gradient_state
        if not state.end_of_dataloader or state.remainder <= 0:  # -1: no length; 0: nothing padded
            return gathered
        if use_gather_object:
            return gathered[:state.remainder]
        return recursively_apply(lambda tensor: tensor[:state.remainder], gathered)


def shard_over_dp(accelerator, groups) -> None:
    """Point `accelerator`'s data-loader preparation and `gather_for_metrics` at the DP group (`DPView`)."""
    view = DPView(accelerator, groups)
    accelerator.prepare_data_loader = functools.partial(type(accelerator).prepare_data_loader, view)
    accelerator.gather_for_metrics = view.gather_for_metrics
