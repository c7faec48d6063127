"""Plot bench_zero_reduce_scatter.py results: gradient-sync time per provider/backend and per-bucket bandwidth.

    python bench/plot_zero_rs.py bench/results/zero_rs.csv bench/results/zero_rs_buckets.csv OUT.png
"""

from __future__ import annotations

import csv
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(summary_csv: str, buckets_csv: str, out: str) -> None:
    rows = list(csv.DictReader(open(summary_csv)))
    buckets = list(csv.DictReader(open(buckets_csv)))
    fig, (ax_sync, ax_bw) = plt.subplots(1, 2, figsize=(14, 4.5))
    labels = [f"TP{r['tp']}xDP{r['dp']}\n{r['backend']}" for r in rows]
    exposed = [float(r["exposed_ms"]) for r in rows]
    standalone = [float(r["standalone_comm_ms"] or 0) for r in rows]
    x = range(len(rows))
    ax_sync.bar([i - 0.2 for i in x], standalone, width=0.4, label="standalone reduce-scatter (all buckets)",
                color="tab:gray")
    ax_sync.bar([i + 0.2 for i in x], exposed, width=0.4, label="exposed after backward", color="tab:red")
    ax_sync.set_xticks(list(x), labels, fontsize=7)
    ax_sync.set(ylabel="ms per step", title="ZeRO-2 gradient sync, Llama-3-8B x 8 layers, seq 4096, bf16")
    ax_sync.legend(fontsize=8)
    for key in sorted({(r["tp"], r["backend"]) for r in buckets}):
        sel = [r for r in buckets if (r["tp"], r["backend"]) == key and int(r["elements"]) > 1_000_000]
        ax_bw.scatter([int(r["elements"]) * 2 / 2 ** 20 for r in sel], [float(r["ours_busbw"]) for r in sel], s=12,
                      label=f"TP{key[0]} {key[1]}")
    plain = [r for r in buckets if r["backend"] == "torch" and int(r["elements"]) > 1_000_000]
    ax_bw.scatter([int(r["elements"]) * 2 / 2 ** 20 for r in plain], [float(r["nccl_busbw"]) for r in plain],
                  marker="x", color="black", label="plain NCCL (torch.distributed)")
    ax_bw.set(xscale="log", xlabel="bucket MB (bf16)", ylabel="bus GB/s", title="reduce-scatter bus bandwidth per bucket")
    ax_bw.legend(fontsize=7)
    first = rows[0]
    fig.suptitle(f"{first['gpu']} x {first['world']}, torch {first['torch']}, {first['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main(*sys.argv[1:4])
