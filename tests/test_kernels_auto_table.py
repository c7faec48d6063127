"""`kernels: auto`'s per-shape decision (`autotp_kernels.auto_table`) and the committed table it reads.

The decision must follow the measurements: fuse a shape only where the nearest measured row of the same op and
world had the fused op at least MARGIN faster than cuBLAS then NCCL, never for an op, world or size nobody
measured. The layers must ask with the GEMM they will actually run (rows x K x N, per op)."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("triton")

from autotp_kernels import auto_table  # noqa: E402

ROWS = (("AR", 2, 8192, 2048, 4096, 0.435, 0.349),   # fused faster: fuse
        ("AR", 2, 4096, 7168, 4096, 0.446, 0.440),   # within the margin: do not fuse
        ("RS", 2, 8192, 2048, 4096, 0.351, 0.229),
        ("AG", 4, 8192, 4096, 1536, 0.40, 0.50))     # fused slower: do not fuse


@pytest.fixture
def table(monkeypatch):
    monkeypatch.setattr(auto_table, "load", lambda path=auto_table.TABLE: ROWS)
    auto_table.fuses.cache_clear()
    yield
    auto_table.fuses.cache_clear()


def test_fuses_where_the_nearest_measured_row_was_faster(table):
    assert auto_table.fuses("AR", 2, 8192, 2048, 4096)
    assert auto_table.fuses("AR", 2, 6144, 2048, 4096)  # nearer to the fast row than to the tie
    assert not auto_table.fuses("AR", 2, 4096, 7168, 4096)  # 1.3% faster is not past the 3% margin
    assert auto_table.fuses("RS", 2, 8192, 2048, 4096)
    assert not auto_table.fuses("AG", 4, 8192, 4096, 1536)


def test_never_fuses_what_nobody_measured(table):
    assert not auto_table.fuses("AR", 4, 8192, 2048, 4096)  # no row at this world size
    assert not auto_table.fuses("AG", 2, 8192, 4096, 1536)  # no row of this op at this world size
    assert not auto_table.fuses("RS", 2, 512, 2048, 4096)  # 16x fewer rows than any measured: too far
    assert not auto_table.fuses("AR", 2, 0, 2048, 4096)


def test_nearest_weighs_flops_and_output_size(table):
    row, d = auto_table.nearest("AR", 2, 8192, 2048, 4096)
    assert row == ROWS[0] and d == 0.0
    row, d = auto_table.nearest("AR", 2, 4096, 6144, 4096)
    assert row == ROWS[1] and math.isclose(d, abs(math.log(6144 / 7168)))


def test_the_committed_table_parses_and_names_every_op_it_measured():
    rows = auto_table.load()
    assert rows, f"{auto_table.TABLE} is empty: `auto` would never fuse"
    assert {r[0] for r in rows} <= {"AR", "RS", "AG"} and all(r[1] >= 2 and r[5] > 0 and r[6] > 0 for r in rows)


def test_a_table_without_a_column_is_refused_by_name(tmp_path):
    bad = tmp_path / "table.csv"
    bad.write_text("op,world,M,K,N,seq_ms\nAR,2,1,1,1,0.1\n")
    with pytest.raises(ValueError, match="fused_ms"):
        auto_table.load(str(bad))
    bad.write_text("op,world,M,K,N,seq_ms,fused_ms\nAR,two,1,1,1,0.1,0.1\n")
    with pytest.raises(ValueError, match="line 2"):
        auto_table.load(str(bad))


def _asked(rank, world, sequence_parallel):
    import autotp
    from autotp_kernels import auto_table, fused
    from families import engine_losses, tiny_model

    fused.TUNING.emulate, fused.TUNING.always = True, False
    asked = set()

    def record(op, tp, M, K, N):
        asked.add((op, tp, M, K, N))
        return True

    auto_table.fuses = record
    model = tiny_model("llama")  # hidden 64, 4 heads of 16 (2 KV heads), MLP 96, vocab 103
    config = {"train_micro_batch_size_per_gpu": 2,
              "tensor_parallel": {"autotp_size": 2, "kernels": "auto", "sequence_parallel": sequence_parallel,
                                  "vocab_parallel_loss": False},
              "optimizer": {"type": "SGD", "params": {"lr": 0.1}}}
    engine, _, _, _ = autotp.initialize(model=model, config=config)
    engine_losses(engine, steps=1)
    return sorted(asked)


@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_layers_ask_the_table_with_the_gemms_they_run(sequence_parallel):
    """A tiny Llama at TP=2, 2 x 8 tokens: each fused op's local GEMM, and with sequence parallelism the fused op
    its backward then runs too (a fused reduce-scatter's backward is a fused all-gather and the reverse)."""
    from dist_utils import run_distributed

    asked = run_distributed(2, _asked, sequence_parallel)[0]
    M = 16
    if sequence_parallel:
        expected = {("RS", 2, M, 32, 64), ("AG", 2, M, 64, 32),     # o: [M, 64/2] @ [32, 64]; backward dy @ W
                    ("RS", 2, M, 48, 64), ("AG", 2, M, 64, 48),     # down: [M, 96/2] @ [48, 64]
                    ("AG", 2, M, 64, 64), ("RS", 2, M, 64, 64),     # q, k, v entry: [M, 64] @ [64, 32+16+16]
                    ("AG", 2, M, 64, 96), ("RS", 2, M, 96, 64)}     # gate, up entry: [M, 64] @ [64, 48+48]
    else:
        # q and o forward (M, 32, 64); k, v dgrad (M, 16, 64); gate, up dgrad and down forward (M, 48, 64). The LM
        # head gathers its logits (no vocab-parallel loss here): no fused op.
        expected = {("AR", 2, M, 32, 64), ("AR", 2, M, 16, 64), ("AR", 2, M, 48, 64)}
    assert set(asked) == expected, sorted(set(asked) ^ expected)
