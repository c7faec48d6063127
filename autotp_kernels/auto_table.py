"""Where `kernels: auto` fuses: a per-shape decision from a measured table, never a guess.

`fused_table.csv` (beside this file) holds rows written by `bench/bench_tp_overlap.py --write-table` on the GPU
machines: op (AR, RS, AG), world, the local GEMM's M x K x N, and the slowest rank's median ms of cuBLAS then
NCCL (`seq_ms`) and of the fused op (`fused_ms`). `fuses(op, world, M, K, N)` takes the measured row of the same
op and world nearest to the shape (log distance over the GEMM's flops and the output's size, the two things the
op's two halves scale with) and fuses only where that row's fused op beat the sequential one by MARGIN. No row
for the op and world: not fused, so a step with `auto` is never slower than with `torch` on a shape nobody
measured.
"""

from __future__ import annotations

import csv
import functools
import math
import os

TABLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fused_table.csv")
COLUMNS = ("op", "world", "M", "K", "N", "seq_ms", "fused_ms")
MARGIN = 0.97
"""Fused must be at least 3% faster than sequential where measured. Single bench cases vary more than that run to
run (up to ~20% on 2 x H200, bench/results/README.md), so the committed table is several runs merged
conservatively (the slowest fused time against the fastest sequential one) and the margin comes on top."""
MAX_DISTANCE = math.log(4.0)
"""A shape more than 4x away (in flops or output size) from every measured row of its op is not judged."""


@functools.lru_cache(maxsize=4)
def load(path: str = TABLE) -> tuple:
    """The table's rows as tuples of COLUMNS (numbers parsed); a missing file is an empty table."""
    if not os.path.exists(path):
        return ()
    rows = []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or ())]
        if missing:
            raise ValueError(f"{path}: the fused-kernel table lacks the columns {missing}")
        for line, row in enumerate(reader, start=2):
            try:
                rows.append((row["op"], int(row["world"]), int(row["M"]), int(row["K"]), int(row["N"]),
                             float(row["seq_ms"]), float(row["fused_ms"])))
            except ValueError as error:
                raise ValueError(f"{path} line {line}: {error}") from None
    return tuple(rows)


def nearest(op: str, world: int, M: int, K: int, N: int, rows=None):
    """The measured row of `op` at `world` ranks nearest to the GEMM M x K x N, and its distance."""
    rows = load() if rows is None else rows
    best, best_d = None, math.inf
    for row in rows:
        if row[0] != op or row[1] != world:
            continue
        d = math.hypot(math.log(M * K * N) - math.log(row[2] * row[3] * row[4]),
                       math.log(M * N) - math.log(row[2] * row[4]))
        if d < best_d:
            best, best_d = row, d
    return best, best_d


@functools.lru_cache(maxsize=4096)
def fuses(op: str, world: int, M: int, K: int, N: int) -> bool:
    if min(M, K, N) <= 0:
        return False
    row, d = nearest(op, world, M, K, N)
    return row is not None and d <= MAX_DISTANCE and row[6] <= MARGIN * row[5]
