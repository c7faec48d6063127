"""bench/bench_train.py's CSV bookkeeping (no GPU): rows appended to a file written before a column existed."""

from __future__ import annotations

import csv
import importlib.util
import os

_SPEC = importlib.util.spec_from_file_location(
    "bench_train", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench", "bench_train.py"))
bench_train = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bench_train)


def test_a_new_column_widens_the_file_instead_of_shifting_values(tmp_path):
    path = str(tmp_path / "train.csv")
    bench_train._append_row(path, {"provider": "single", "step_s": 0.16})
    bench_train._append_row(path, {"provider": "autotp", "step_s": 0.09, "host_s": 0.05})
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert rows == [{"provider": "single", "step_s": "0.16", "host_s": ""},
                    {"provider": "autotp", "step_s": "0.09", "host_s": "0.05"}]


def test_median_is_the_upper_middle():
    assert bench_train._median([0.3, 0.1, 0.2]) == 0.2
    assert bench_train._median([0.4, 0.1, 0.3, 0.2]) == 0.3
