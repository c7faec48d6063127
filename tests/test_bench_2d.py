"""bench/bench_2d.py runs (gloo, 4 processes, tiny sizes) and its counted bytes equal `layers2d.bytes_sent` for
1-D TP=4 and every 2-D grid of 4 ranks: the numbers the GPU run reports are the formula's, checked."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def test_bench_2d_counts_the_bytes_the_formula_predicts(tmp_path):
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4",
                             "bench/bench_2d.py", "--out", str(tmp_path), "--tokens", "64", "--hidden", "16",
                             "--inter", "32", "--iters", "1"], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    with open(tmp_path / "tp2d_w4.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["layout"] for r in rows] == ["1-D TP=4", "2-D 1x4", "2-D 2x2", "2-D 4x1"]
    assert all(int(r["bytes_sent"]) == int(r["bytes_formula"]) > 0 for r in rows), rows
