"""Run a function in `world_size` real processes over gloo (CPU) and collect each rank's return value.

Public tests call `run_distributed(world_size, fn, *args)`; `fn(rank, world_size, *args)` runs in each
process with torch.distributed initialised. An exception on any rank fails the test with that rank's
traceback; a rank that hangs is killed after `timeout_s`.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
import traceback

import torch.multiprocessing as mp


def _entry(rank, world_size, rendezvous_file, fn, args, queue):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size))
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        # A file rendezvous, private to this test: a probed free port can be taken by another job before the
        # store binds it (EADDRINUSE, then a 300 s hang).
        dist.init_process_group("gloo", init_method=f"file://{rendezvous_file}", rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        # Serialise here: tensors sent through the queue as-is would share memory with a process that exits.
        buffer = io.BytesIO()
        torch.save(result, buffer)
        queue.put((rank, "ok", buffer.getvalue()))
    except BaseException:  # report every failure to the parent, including assertion errors
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# Fresh processes per test, forked from a forkserver that has imported torch and transformers once: each
# spawned rank used to re-import them (~4.7 s of CPU per process on the 2-core CI machine, world 2-8 per test).
_START_METHOD = os.environ.get("AUTOTP_TEST_START_METHOD", "forkserver")
_PRELOAD = ["torch", "torch.distributed", "transformers", "transformers.models.llama.modeling_llama", "autotp"]


def _context():
    ctx = mp.get_context(_START_METHOD)
    if _START_METHOD == "forkserver":
        ctx.set_forkserver_preload(_PRELOAD)  # takes effect when the server starts (the first test)
    return ctx


def run_distributed(world_size: int, fn, *args, timeout_s: float = 300.0) -> list:
    ctx = _context()
    queue = ctx.Queue()
    rendezvous_dir = tempfile.mkdtemp(prefix="autotp-test-rdzv-")
    rendezvous_file = os.path.join(rendezvous_dir, "store")
    procs = [ctx.Process(target=_entry, args=(r, world_size, rendezvous_file, fn, args, queue))
             for r in range(world_size)]
    for proc in procs:
        proc.start()
    import queue as queue_module
    import time

    results, errors, reported = [None] * world_size, [], set()
    deadline = time.monotonic() + timeout_s
    try:
        while len(reported) < world_size:
            try:
                rank, status, payload = queue.get(timeout=1.0)
            except queue_module.Empty:
                dead = [r for r, p in enumerate(procs) if r not in reported and p.exitcode not in (None, 0)]
                if dead:
                    errors.append(f"ranks {dead} died without reporting (exit codes "
                                  f"{[procs[r].exitcode for r in dead]})")
                    break
                if time.monotonic() > deadline:
                    errors.append(f"timed out after {timeout_s}s; ranks {sorted(set(range(world_size)) - reported)} "
                                  "never finished (a hang)")
                    break
                continue
            reported.add(rank)
            if status == "ok":
                import torch

                results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
            else:
                errors.append(f"rank {rank}:\n{payload}")
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
        shutil.rmtree(rendezvous_dir, ignore_errors=True)
    if errors:
        raise AssertionError("distributed test failed:\n" + "\n".join(errors))
    return results
