"""Plot bench/bench_tp_overlap.py results: per case at M=8192, the time of cuBLAS then NCCL, torch's symm_mem
fused op (where one applies), autotp fused, and the floor max(GEMM alone, collective alone).

    python bench/plot_tp_overlap.py OUT.png tp_overlap_w4.csv [tp_overlap_w2.csv ...]
One panel per CSV (one world size each).
"""

from __future__ import annotations

import csv
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SERIES = [("seq_ms", "cuBLAS then NCCL", "tab:gray"), ("symm_ms", "torch symm_mem fused", "tab:orange"),
          ("fused_ms", "autotp fused", "tab:blue")]


def main(out: str, paths: list) -> None:
    fig, axes = plt.subplots(len(paths), 1, figsize=(14, 4.2 * len(paths)), squeeze=False)
    for ax, path in zip(axes[:, 0], paths):
        with open(path) as handle:
            rows = [r for r in csv.DictReader(handle) if r["M"] == "8192"]
        labels = [f"{r['model'].split('-')[-1]} {r['proj']}\n{r['op']}" for r in rows]
        width = 0.26
        for i, (key, name, color) in enumerate(SERIES):
            values = [float(r[key]) if r.get(key) else 0.0 for r in rows]
            ax.bar([x + (i - 1) * width for x in range(len(rows))], values, width, label=name, color=color)
        floor = [max(float(r["gemm_ms"]), float(r["coll_ms"])) for r in rows]
        ax.scatter(range(len(rows)), floor, marker="_", s=400, color="black", zorder=3,
                   label="max(GEMM, collective) alone")
        ax.set_xticks(range(len(rows)), labels, fontsize=8)
        first = rows[0]
        ax.set(ylabel="ms (slowest rank, median)",
               title=f"{first['gpu']} x {first['world']}, M=8192 bf16, torch {first['torch']}, triton "
                     f"{first['triton']}, NCCL {first['nccl']}, {first['date']}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
