"""Bar chart of tokens/s/GPU (and peak memory) for the rows of a bench_train CSV, labelled by provider and
optimizer, with each row's ratio to the one-GPU row.

    python3 bench/plot_train_rows.py bench/results/train_optimizer.csv bench/results/train_optimizer.png
"""

import csv
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(path: str, out: str) -> None:
    with open(path) as handle:
        rows = list(csv.DictReader(handle))
    single = next((float(r["tokens_per_s_per_gpu"]) for r in rows if r["provider"] == "single"), None)
    labels = [r["provider"] if r["provider"] == "single" else
              f"{r['provider']} TP{r['tp']}{' DP' + r['dp'] if r.get('dp', '1') != '1' else ''} Z{r['zero']}"
              f"{' SP' if r.get('sequence_parallel') == '1' else ''}\n"
              f"{r.get('optimizer') or ''} {r.get('version') or ''}".rstrip()
              + (f"\n{r['kernels']}" if r.get("kernels") and r["provider"] == "autotp" else "")
              + (f" job {r['job']}" if r.get("job") else "")
              for r in rows]
    tokens = [float(r["tokens_per_s_per_gpu"]) for r in rows]
    fig, ax = plt.subplots(figsize=(1.8 * len(rows) + 2, 4))
    bars = ax.bar(range(len(rows)), tokens, tick_label=labels, color=["#888" if r["provider"] == "single" else "#3a7" for r in rows])
    for bar, value, row in zip(bars, tokens, rows):
        ratio = f"\n{value / single:.2f}x" if single else ""
        ax.text(bar.get_x() + bar.get_width() / 2, value, f"{value:,.0f}{ratio}\n{row['peak_mem_gb']} GB",
                ha="center", va="bottom", fontsize=8)
    first = rows[0]
    ax.set(ylabel="tokens/s per GPU", ylim=(0, max(tokens) * 1.3),
           title=f"{first['gpu']}, {first['shape']} {first['layers']} layers, seq {first['seq']}, "
                 f"torch {first['torch']}, {first['date']}")
    ax.title.set_fontsize(9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main(*sys.argv[1:3])
