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
