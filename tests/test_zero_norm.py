"""The gradient-norm share computed over merged runs equals the piece-by-piece weighted sum (zero/norm.py).

Reference: sum(weight * g**2) piece by piece in fp32. Tolerance: the multi-tensor norm sums in another order;
over ~10^3 fp32 values the relative difference is ~1e-7, so rtol 1e-6."""

import torch

from autotp.zero.norm import merge_pieces, runs_sumsq, weighted_sumsq


def test_merge_pieces_joins_adjacent_full_weights_and_drops_zeros():
    per_element = torch.full((4,), 0.5)
    pieces = [(0, 5, 1.0), (5, 3, 1.0), (8, 2, 0.0), (10, 4, 1.0), (14, 4, per_element), (18, 2, 0.25), (20, 6, 1.0)]
    runs, weighted = merge_pieces(pieces)
    assert runs == [(0, 8), (10, 14), (20, 26)]
    assert [(s, n) for s, n, _ in weighted] == [(14, 4), (18, 2)]


def test_runs_sumsq_equals_the_piece_by_piece_sum():
    gen = torch.Generator().manual_seed(0)
    flats = [torch.randn(300, generator=gen), torch.randn(257, generator=gen)]
    pieces = [[(0, 100, 1.0), (100, 50, 0.0), (150, 100, 1.0), (250, 40, torch.rand(40, generator=gen)),
               (290, 10, 0.5)],
              [(0, 257, 1.0)]]
    reference = sum(weighted_sumsq(flat[s:s + n], w) for flat, ps in zip(flats, pieces) for s, n, w in ps)
    merged = [merge_pieces(ps) for ps in pieces]
    total = runs_sumsq(flats, [r for r, _ in merged], [w for _, w in merged], "cpu")
    torch.testing.assert_close(total, reference, rtol=1e-6, atol=0)
