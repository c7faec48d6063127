"""The ZeRO bucket planner: pure integers, identical on every rank."""

from __future__ import annotations

import pytest

from autotp.zero.buckets import plan_buckets


def test_backward_order_sizes_and_padding():
    numels = [10, 300, 7, 500, 40]
    buckets = plan_buckets(numels, ["a"] * 5, bucket_size=600, dp=2, align=4)
    assert [b.params for b in buckets] == [[4, 3, 2], [1, 0]]  # reverse registration order, greedy fill
    assert [b.offsets for b in buckets] == [[0, 40, 540], [0, 300]]
    assert [(b.numel, b.padded) for b in buckets] == [(547, 552), (310, 312)]  # multiples of dp * align
    assert all(b.padded % (2 * 4) == 0 for b in buckets)


def test_oversized_parameter_gets_its_own_bucket():
    buckets = plan_buckets([5, 1000, 5], ["a"] * 3, bucket_size=100, dp=4, align=1)
    assert [b.params for b in buckets] == [[2], [1], [0]]
    assert buckets[1].padded == 1000


def test_keys_never_share_a_bucket_and_numbering_follows_completion():
    # Interleaved keys (decayed weights "w", undecayed norms "n"): the norm bucket completes last (its last
    # parameter, index 0, arrives last), so it is numbered last and never holds back the weight buckets.
    keys = ["n", "w", "n", "w", "n", "w"]
    buckets = plan_buckets([4, 100, 4, 100, 4, 100], keys, bucket_size=150, dp=1, align=1)
    assert [(b.key, b.params) for b in buckets] == [("w", [5]), ("w", [3]), ("w", [1]), ("n", [4, 2, 0])]
    assert [b.index for b in buckets] == list(range(len(buckets)))
    assert buckets[-1].key == "n"


def test_segments_cover_every_element_once():
    numels = [13, 29, 3, 50]
    dp = 3
    for bucket in plan_buckets(numels, ["k"] * 4, bucket_size=60, dp=dp, align=2):
        covered = {}
        for rank in range(dp):
            lo, hi = bucket.partition_range(rank)
            assert hi - lo == bucket.padded // dp
            for seg in bucket.segments(rank, numels):
                assert 0 <= seg.partition_start and seg.partition_start + seg.length <= hi - lo
                for i in range(seg.length):
                    key = (seg.param, seg.param_start + i)
                    assert key not in covered
                    covered[key] = rank
        expected = {(p, i) for p in bucket.params for i in range(numels[p])}
        assert set(covered) == expected


@pytest.mark.parametrize("kwargs", [dict(bucket_size=0, dp=1), dict(bucket_size=10, dp=0)])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError, match="must be >= 1"):
        plan_buckets([1], ["k"], **kwargs)
