"""Plot a ZeRO comparison run (bench/run_zero_gpu.sh): loss curves and peak memory / throughput per provider.

    python bench/plot_zero.py RESULTS_DIR OUT.png
RESULTS_DIR holds train.csv and zero_losses.csv of one run.
"""

from __future__ import annotations

import csv
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(folder: str, out: str) -> None:
    with open(os.path.join(folder, "zero_losses.csv")) as handle:
        losses = list(csv.DictReader(handle))
    with open(os.path.join(folder, "train.csv")) as handle:
        runs = list(csv.DictReader(handle))
    curves: dict = {}
    for row in losses:
        curves.setdefault(f"{row['provider']} ZeRO-{row['zero']}", []).append(float(row["loss"]))
    fig, (ax_loss, ax_mem, ax_tok) = plt.subplots(1, 3, figsize=(15, 4.2))
    for label, values in curves.items():
        ax_loss.plot(range(1, len(values) + 1), values, lw=1, label=label,
                     ls="--" if label.startswith("deepspeed") else "-")
    ax_loss.set(xlabel="step", ylabel="loss", title="loss, same data (bf16)")
    ax_loss.legend(fontsize=8)
    labels = [f"{r['provider']}\nZeRO-{r['zero']}" for r in runs]
    colors = ["tab:blue" if r["provider"] == "autotp" else "tab:gray" for r in runs]
    ax_mem.bar(labels, [float(r["peak_mem_gb"]) for r in runs], color=colors)
    ax_mem.set(ylabel="GB", title="peak memory per GPU")
    ax_tok.bar(labels, [float(r["tokens_per_s_per_gpu"]) for r in runs], color=colors)
    ax_tok.set(ylabel="tokens/s/GPU", title="throughput (median step)")
    first = runs[0]
    fig.suptitle(f"Llama-3-8B shape, {first['layers']} layers, seq {first['seq']}, TP{first['tp']} x DP{first['dp']}, "
                 f"{first['gpu']}, torch {first['torch']}, {first['date']}", fontsize=10)
    for ax in (ax_mem, ax_tok):
        ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
