"""Tokens/s/GPU per configuration and provider from bench_train CSV rows, as a grouped bar chart.

    python bench/plot_train.py bench/results/train_peers.csv bench/results/train_peers.png

Configurations are (tp, dp, zero); the one-GPU row is drawn as a dashed line across all groups (the per-GPU
ceiling). When a configuration has several autotp rows (features on and off), the fastest is drawn.
"""

from __future__ import annotations

import csv
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PROVIDERS = ["deepspeed", "dtensor", "autotp"]


def load(path):
    rows = list(csv.DictReader(open(path)))
    single = [float(r["tokens_per_s_per_gpu"]) for r in rows if r["provider"] == "single"]
    best = {}
    for r in rows:
        if r["provider"] == "single":
            continue
        key = (int(r["tp"]), int(r["dp"]), int(r["zero"]))
        value = float(r["tokens_per_s_per_gpu"])
        best[(key, r["provider"])] = max(value, best.get((key, r["provider"]), 0.0))
    return best, (max(single) if single else None), rows[0] if rows else {}


def plot(best, single, meta, out):
    configs = sorted({key for key, _ in best})
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(PROVIDERS)
    for i, provider in enumerate(PROVIDERS):
        xs = [c + i * width for c in range(len(configs))]
        ys = [best.get((key, provider), 0.0) for key in configs]
        bars = ax.bar(xs, ys, width, label=provider)
        ax.bar_label(bars, labels=[f"{y / 1e3:.1f}k" if y else "" for y in ys], fontsize=7)
    if single:
        ax.axhline(single, linestyle="--", color="gray", label=f"1 GPU, no TP ({single / 1e3:.1f}k)")
    ax.set_xticks([c + width for c in range(len(configs))])
    ax.set_xticklabels([f"TP{tp} x DP{dp}\nZeRO-{zero}" for tp, dp, zero in configs])
    ax.set_ylabel("tokens / s / GPU")
    ax.set_title(f"Llama-3-8B shape, {meta.get('layers', '?')} layers, seq {meta.get('seq', '?')}, bf16 - "
                 f"{meta.get('gpu', '')}, {meta.get('date', '')}", fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


if __name__ == "__main__":
    best_rows, single_row, first = load(sys.argv[1])
    plot(best_rows, single_row, first, sys.argv[2])
