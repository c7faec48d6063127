"""The C++ extension on CPU: the bucket planner and launch tracker against the Python planner, and the comm
backend selection (auto falls back to torch; nccl_ext without CUDA fails on every rank, naming why)."""

from __future__ import annotations

import random

import pytest

from autotp import _ext
from autotp.zero.buckets import plan, plan_buckets
from dist_utils import run_distributed

planner = _ext.load("planner")  # builds with ninja on first use if setup.py did not


def _as_tuples(buckets):
    return [(b.index, b.key, list(b.params), list(b.offsets), b.numel, b.padded) for b in buckets]


@pytest.mark.parametrize("seed", range(20))
def test_cpp_planner_equals_python(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 40)
    numels = [rng.choice([1, 7, 64, 1000, 4096, 50_000]) for _ in range(n)]
    keys = [rng.randint(0, 2) for _ in range(n)]
    bucket_size, dp, align = rng.choice([1, 500, 5000, 100_000]), rng.randint(1, 8), rng.choice([1, 4, 128])
    expected = plan_buckets(numels, keys, bucket_size, dp, align)
    got = planner.plan_buckets(numels, keys, bucket_size, dp, align)
    assert _as_tuples(got) == _as_tuples(expected)
    for cpp_bucket, py_bucket in zip(got, expected):
        for rank in range(dp):
            cpp = [(s.param, s.param_start, s.partition_start, s.length)
                   for s in planner.bucket_segments(cpp_bucket, rank, numels)]
            py = [(s.param, s.param_start, s.partition_start, s.length) for s in py_bucket.segments(rank, numels)]
            assert cpp == py
    # What the store uses: tuple keys mapped through the C++ planner come back as the same buckets.
    tuple_keys = [("group", k) for k in keys]
    assert _as_tuples(plan(numels, tuple_keys, bucket_size, dp, align)) == \
        _as_tuples(plan_buckets(numels, tuple_keys, bucket_size, dp, align))


def test_launch_tracker_orders_launches():
    buckets = planner.plan_buckets([5, 5, 5, 5], [0, 0, 0, 0], 10, 1, 1)  # {3, 2} then {1, 0}
    tracker = planner.LaunchTracker(buckets, 4)
    assert tracker.arrive(0) == [] and tracker.arrive(1) == []  # bucket 1 complete, but 0 is not
    assert tracker.arrive(3) == [] and tracker.arrive(3) == []  # a repeated arrival counts once
    assert tracker.arrive(2) == [0, 1]
    assert tracker.flush() == [] and tracker.launched(1)
    tracker.reset()
    assert tracker.arrive(2) == [] and tracker.flush() == [0, 1]


def test_planner_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"bucket_size \(0\)"):
        planner.plan_buckets([1], [0], 0, 1, 1)
    with pytest.raises(ValueError, match="numels has 2 entries but keys has 1"):
        planner.plan_buckets([1, 2], [0], 10, 1, 1)
    with pytest.raises(ValueError, match="dp_rank 3"):
        planner.bucket_segments(planner.plan_buckets([4], [0], 10, 2, 1)[0], 3, [4])


def _backend_choice(rank, world_size):
    import torch

    from autotp import ConfigError
    from autotp.zero.backend import make_backend

    auto = make_backend("auto", None, torch.device("cpu")).name
    try:
        make_backend("nccl_ext", None, torch.device("cpu"))
        error = None
    except ConfigError as err:
        error = str(err)
    return auto, error


def test_backend_selection_on_cpu():
    results = run_distributed(2, _backend_choice)
    for auto, error in results:
        assert auto == "torch"
        assert "zero_optimization.comm_backend" in error and "needs CUDA" in error, error
    assert results[0] == results[1]


def test_jit_build_into_a_fresh_cache(tmp_path, monkeypatch):
    # The path a wheel-less checkout takes on first use: compile with ninja into AUTOTP_EXT_DIR.
    monkeypatch.setenv("AUTOTP_EXT_DIR", str(tmp_path))
    module = _ext._jit("planner", _ext.PLANNER_SOURCES, cuda=False)
    assert [b.params for b in module.plan_buckets([3, 4], [0, 0], 100, 1, 1)] == [[1, 0]]
    assert any(name.endswith(".so") for _, _, files in __import__("os").walk(tmp_path) for name in files)


@pytest.mark.parametrize("seed", range(5))
def test_cpp_and_python_trackers_agree(seed):
    from autotp.zero.buckets import LaunchTracker

    rng = random.Random(seed)
    numels = [rng.randint(1, 50) for _ in range(30)]
    buckets = plan_buckets(numels, [rng.randint(0, 1) for _ in numels], 80, 2, 1)
    ours = LaunchTracker(buckets, len(numels))
    cpp = planner.LaunchTracker([b.params for b in buckets], len(numels))
    order = list(range(len(numels)))[::-1]
    rng.shuffle(order[: len(order) // 2])  # mostly backward order, partly shuffled, some repeats
    for param in order[:25] + order[:3]:
        assert ours.arrive(param) == cpp.arrive(param)
    assert ours.flush() == cpp.flush()


def _zero2_both_trackers(rank, world_size):
    import torch

    import autotp.zero.buckets as buckets
    from test_zero import _train

    out = []
    for use_cpp in (True, False):
        original = buckets._planner
        if not use_cpp:
            buckets._planner = lambda: None
        try:
            engine, _, _ = _train("llama", 2, 2, 2, 2)
            module = type(engine.store._tracker).__module__
            assert (module != "autotp.zero.buckets") == use_cpp, module
            out.append(engine.consolidated_state_dict())
        finally:
            buckets._planner = original
    if rank == 0:
        return all(torch.equal(out[0][k], out[1][k]) for k in out[0])
    return True


def test_zero2_same_with_cpp_or_python_bookkeeping():
    assert all(run_distributed(4, _zero2_both_trackers))
