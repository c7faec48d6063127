"""Where every gradient and master weight lives under ZeRO: flat buckets split evenly over the DP group.

Pure bookkeeping (integers only), so the layout is testable without a process group and identical on every rank.
Parameters are laid out in backward order (reverse registration order, the order autograd finishes them), one
bucket list per (optimizer param group, dtype) key, each bucket at most `bucket_size` elements unless a single
parameter is larger. A bucket is padded to a multiple of `dp * align` so that each DP rank owns one equal,
aligned slice: collectives stay even and every partition starts on a 256-byte boundary for bf16 (align 128).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable, Sequence

# 128 elements: 256 B for bf16, 512 B for fp32, NCCL's preferred alignment for full-bandwidth transfers.
DEFAULT_ALIGN = 128


@dataclass(frozen=True)
class Segment:
    """The part of one parameter that falls inside one rank's partition of a bucket."""

    param: int
    """Index into the planner's parameter list."""
    param_start: int
    """Offset into the parameter's flattened elements."""
    partition_start: int
    """Offset into the rank's partition of the bucket."""
    length: int


@dataclass
class Bucket:
    index: int
    key: Hashable
    """(optimizer param group index, dtype) shared by every parameter in the bucket."""
    params: list[int] = field(default_factory=list)
    """Parameter indices in the order their gradients are expected (backward order)."""
    offsets: list[int] = field(default_factory=list)
    """Start of each parameter in the flat bucket."""
    numel: int = 0
    """Elements used; `padded` - `numel` trailing elements are padding (always zero)."""
    padded: int = 0
    dp: int = 1

    @property
    def partition_numel(self) -> int:
        return self.padded // self.dp

    def partition_range(self, dp_rank: int) -> tuple[int, int]:
        start = dp_rank * self.partition_numel
        return start, start + self.partition_numel

    def segments(self, dp_rank: int, numels: Sequence[int]) -> list[Segment]:
        """The parameters (or pieces of them) inside `dp_rank`'s partition, in flat order."""
        lo, hi = self.partition_range(dp_rank)
        out = []
        for param, offset in zip(self.params, self.offsets):
            start, end = max(lo, offset), min(hi, offset + numels[param])
            if start < end:
                out.append(Segment(param, start - offset, start - lo, end - start))
        return out


class LaunchTracker:
    """Which buckets may be launched as gradients arrive: strictly in index order, so every rank issues the same
    collectives in the same order whatever order its gradients arrive in. (The C++ twin in csrc/bucket_plan.h
    is used when the extension is built.)"""

    def __init__(self, buckets: Sequence[Bucket], num_params: int):
        self._bucket_of = [-1] * num_params
        for bucket in buckets:
            for param in bucket.params:
                self._bucket_of[param] = bucket.index
        self._expected = [len(b.params) for b in buckets]
        self.reset()

    def reset(self) -> None:
        self._count = [0] * len(self._expected)
        self._arrived = set()
        self.next_launch = 0

    def arrive(self, param: int) -> list[int]:
        if param not in self._arrived:
            self._arrived.add(param)
            self._count[self._bucket_of[param]] += 1
        ready = []
        while self.next_launch < len(self._expected) and self._count[self.next_launch] == self._expected[
                self.next_launch]:
            ready.append(self.next_launch)
            self.next_launch += 1
        return ready

    def flush(self) -> list[int]:
        rest = list(range(self.next_launch, len(self._expected)))
        self.next_launch = len(self._expected)
        return rest

    def launched(self, bucket: int) -> bool:
        return bucket < self.next_launch


def _planner():
    try:
        from .. import _ext

        return _ext.load("planner")
    except ImportError:
        return None


def make_tracker(buckets: Sequence[Bucket], num_params: int):
    """The C++ LaunchTracker when the extension is available, else the Python one (same behaviour)."""
    planner = _planner()
    if planner is None:
        return LaunchTracker(buckets, num_params)
    return planner.LaunchTracker([list(b.params) for b in sorted(buckets, key=lambda b: b.index)], num_params)


def plan(numels: Sequence[int], keys: Sequence[Hashable], bucket_size: int, dp: int,
         align: int = DEFAULT_ALIGN) -> list[Bucket]:
    """`plan_buckets`, computed by the C++ planner (csrc/bucket_plan.cpp) when the extension is available."""
    planner = _planner()
    if planner is None:
        return plan_buckets(numels, keys, bucket_size, dp, align)
    ids: dict = {}
    key_ids = [ids.setdefault(k, len(ids)) for k in keys]
    key_of = {v: k for k, v in ids.items()}
    return [Bucket(index=b.index, key=key_of[b.key], params=list(b.params), offsets=list(b.offsets), numel=b.numel,
                   padded=b.padded, dp=b.dp)
            for b in planner.plan_buckets(list(numels), key_ids, bucket_size, dp, align)]


def _round_up(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple


def plan_buckets(numels: Sequence[int], keys: Sequence[Hashable], bucket_size: int, dp: int,
                 align: int = DEFAULT_ALIGN) -> list[Bucket]:
    """Buckets for parameters `0..n-1` (registration order) with element counts `numels` and bucket `keys`.

    All parameters of a bucket share its key, so a bucket maps to one optimizer param group and dtype. Buckets
    are numbered in the order they complete during backward (when their last parameter arrives): with interleaved
    keys (decayed weights and undecayed norms of every layer) a small bucket that fills only at the end must not
    hold back the launch of the buckets that completed before it.
    """
    if bucket_size < 1 or dp < 1 or align < 1:
        raise ValueError(f"bucket_size ({bucket_size}), dp ({dp}) and align ({align}) must be >= 1")
    buckets: list[Bucket] = []
    open_bucket: dict = {}
    for param in reversed(range(len(numels))):
        key, numel = keys[param], numels[param]
        bucket = open_bucket.get(key)
        if bucket is not None and bucket.numel and bucket.numel + numel > bucket_size:
            bucket = None
        if bucket is None:
            bucket = Bucket(index=len(buckets), key=key, dp=dp)
            buckets.append(bucket)
            open_bucket[key] = bucket
        bucket.params.append(param)
        bucket.offsets.append(bucket.numel)
        bucket.numel += numel
    completes_at = {id(b): -b.params[-1] for b in buckets}  # backward position of the last parameter
    buckets.sort(key=lambda b: completes_at[id(b)])
    for index, bucket in enumerate(buckets):
        bucket.index = index
        bucket.padded = _round_up(max(bucket.numel, 1), dp * align)
    return buckets
