"""Summarise a torch-profiler trace of one training step into where the GPU time goes.

Categories, by kernel name: GEMM, attention, collectives, optimizer, other. For the collectives the table also
gives the exposed part: time when a collective kernel runs and no compute kernel does (the part overlap has not
hidden). Used by bench/bench_train.py --profile; `summarise` takes plain (name, start_us, end_us) tuples so it
is tested without a GPU.
"""

from __future__ import annotations

import re

CATEGORIES = [
    ("collectives", re.compile(r"nccl|reduce_chunks|all_gather|reduce_scatter|allreduce|cross_device|wait_kernel|"
                               r"signal_kernel", re.I)),
    ("attention", re.compile(r"flash|fmha|attention|sdpa|softmax", re.I)),
    ("optimizer", re.compile(r"adam|multi_tensor|foreach|clip|_amp_", re.I)),
    ("GEMM", re.compile(r"gemm|xmma|cutlass|nvjet|matmul|sm90_|cublas|splitk", re.I)),
]


def category(name: str) -> str:
    for label, pattern in CATEGORIES:
        if pattern.search(name):
            return label
    return "other"


def _union(intervals):
    merged = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return merged


def _length(intervals) -> float:
    return sum(end - start for start, end in intervals)


def _minus(a, b) -> float:
    """Length of union(a) not covered by union(b)."""
    a, b = _union(a), _union(b)
    total, j = 0.0, 0
    for start, end in a:
        covered = 0.0
        while j < len(b) and b[j][1] <= start:
            j += 1
        k = j
        while k < len(b) and b[k][0] < end:
            covered += min(end, b[k][1]) - max(start, b[k][0])
            k += 1
        total += (end - start) - covered
    return total


def summarise(kernels, step_us: float) -> list[dict]:
    """kernels: (name, start_us, end_us) of every GPU kernel in one step; step_us: the step's wall time.

    Rows: category, kernel time (summed), share of the step, and for collectives the exposed time."""
    by_cat: dict = {}
    for name, start, end in kernels:
        by_cat.setdefault(category(name), []).append((start, end))
    compute = [iv for cat, ivs in by_cat.items() if cat != "collectives" for iv in ivs]
    rows = []
    for cat in ["GEMM", "attention", "collectives", "optimizer", "other"]:
        ivs = by_cat.get(cat, [])
        busy = sum(end - start for start, end in ivs)
        row = {"category": cat, "kernel_ms": round(busy / 1e3, 3), "share_of_step": round(busy / step_us, 3)}
        if cat == "collectives":
            exposed = _minus(ivs, compute)
            row["exposed_ms"] = round(exposed / 1e3, 3)
            row["exposed_share"] = round(exposed / step_us, 3)
        rows.append(row)
    busy_any = _length(_union([iv for ivs in by_cat.values() for iv in ivs]))
    rows.append({"category": "GPU idle", "kernel_ms": round((step_us - busy_any) / 1e3, 3),
                 "share_of_step": round((step_us - busy_any) / step_us, 3)})
    return rows


def top_kernels(kernels, count: int | None = 15, width: int | None = 90) -> list[dict]:
    """The `count` kernels (None: all) with the most summed time: name (cut to `width` characters; None: whole),
    calls, ms, category."""
    by_name: dict = {}
    for name, start, end in kernels:
        calls, busy = by_name.get(name, (0, 0.0))
        by_name[name] = (calls + 1, busy + end - start)
    ranked = sorted(by_name.items(), key=lambda item: -item[1][1])[:count]
    return [{"kernel": name[:width], "calls": calls, "ms": round(busy / 1e3, 3), "category": category(name)}
            for name, (calls, busy) in ranked]


def format_top(rows) -> str:
    lines = ["| kernel | calls | ms | category |", "|---|---|---|---|"]
    lines += [f"| `{r['kernel']}` | {r['calls']} | {r['ms']} | {r['category']} |" for r in rows]
    return "\n".join(lines)


def kernels_of(profiler) -> list:
    """(name, start_us, end_us) of the GPU kernels a torch.profiler.profile recorded."""
    out = []
    for event in profiler.events():
        if str(getattr(event, "device_type", "")).endswith("CUDA") and event.time_range.end > event.time_range.start:
            out.append((event.name, event.time_range.start, event.time_range.end))
    return out


def format_table(rows) -> str:
    lines = ["| category | kernel ms | share of step | exposed ms |", "|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['category']} | {row['kernel_ms']} | {row['share_of_step']:.1%} | "
                     f"{row.get('exposed_ms', '')} |")
    return "\n".join(lines)
