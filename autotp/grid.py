"""The 2-D tensor-parallel grid: the TP chapter's third layout, weights on r x c ranks (Optimus, arXiv 2104.05343).

TP rank t of a grid sits at row i = t // c, column j = t % c. Two families of process groups:
  row group    (same i, c ranks): splits the features of activations ([B/r, S, H/c] on rank (i, j)), so a
               linear layer all-gathers its input's features and reduce-scatters its input gradient over it;
  column group (same j, r ranks): splits the batch of activations and the K dimension of weights, so a linear
               layer all-gathers its weight's K blocks and reduce-scatters its weight gradient over it.
A weight A [N, K] (nn.Linear layout) is held as A_ij = A[j-th N/c block, i-th K/r block]: each rank keeps 1/(r c)
of it, and the traffic per rank grows as 1/r + 1/c of the layer's, where 1-D TP of the same r c ranks all-reduces
whole activations (`layers2d.bytes_sent`). Grids tile the world in order, one per data-parallel rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist


@dataclass(frozen=True)
class Grid:
    rows: int
    cols: int
    i: int          # this rank's row
    j: int          # this rank's column
    row_group: object  # the c ranks of row i (None when c == 1)
    col_group: object  # the r ranks of column j (None when r == 1)

    @property
    def size(self) -> int:
        return self.rows * self.cols


def make_grid(rows: int, cols: int) -> Grid:
    """This rank's grid, the world split into world / (rows x cols) consecutive grids. Collective: every rank
    creates every group, in the same order."""
    if rows < 1 or cols < 1:
        raise ValueError(f"tensor_parallel.grid: [{rows}, {cols}] needs two positive sizes")
    world, me = dist.get_world_size(), dist.get_rank()
    if world % (rows * cols):
        raise ValueError(f"tensor_parallel.grid: [{rows}, {cols}] is {rows * cols} ranks, which does not divide the "
                         f"world of {world}")
    row_group = col_group = None
    for base in range(0, world, rows * cols):
        for i in range(rows):
            ranks = [base + i * cols + j for j in range(cols)]
            group = dist.new_group(ranks) if cols > 1 else None
            if me in ranks:
                row_group = group
        for j in range(cols):
            ranks = [base + i * cols + j for i in range(rows)]
            group = dist.new_group(ranks) if rows > 1 else None
            if me in ranks:
                col_group = group
    i, j = divmod(me % (rows * cols), cols)
    return Grid(rows, cols, i, j, row_group, col_group)
