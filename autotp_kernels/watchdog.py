"""Turns a fused collective that never completes into an error instead of a hung job.

The fused ops synchronise ranks with stream waits (`cuda_driver.wait_value`), which have no timeout. Each op
registers the event that marks its end; one daemon thread per process polls the oldest pending event. If an op
is still pending `timeout_s` after it was issued, the thread calls its `on_timeout`: the workspace records the
error and releases every stream wait on this rank (its flags are set past any epoch), so the queued work drains
with meaningless data and the next `symm.check_errors()` (the engine calls it every step) raises FusedCommError.
The peers of a rank that died time out the same way, so every surviving rank raises.

The timer starts when the host issues the op, so it also counts the time the GPU spends on earlier queued
work: keep `timeout_s` far above a step's length (default 300 s, like NCCL's own watchdog at minutes).
"""

from __future__ import annotations

import collections
import sys
import threading
import time
from typing import Callable

POLL_S = 0.02  # 20 ms between looks at the oldest pending op: negligible host time, and a timeout is minutes


class Watchdog:
    def __init__(self, poll_s: float = POLL_S, clock: Callable[[], float] = time.monotonic):
        self._pending: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread = None
        self.poll_s = poll_s
        self.clock = clock

    def watch(self, done, timeout_s: float, on_timeout: Callable[[float], None]) -> None:
        """`done` has .query() (a CUDA event); `on_timeout(waited_s)` runs on the watchdog thread, once."""
        with self._lock:
            self._pending.append((done, self.clock() + timeout_s, timeout_s, on_timeout))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="autotp-fused-watchdog", daemon=True)
                self._thread.start()
        self._wake.set()

    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def poll(self) -> None:
        """Retire finished ops in issue order; fire `on_timeout` for the oldest one past its deadline."""
        while True:
            with self._lock:
                if not self._pending:
                    return
                done, deadline, timeout_s, on_timeout = self._pending[0]
            if done.query():
                with self._lock:
                    self._pending.popleft()
                continue
            if self.clock() < deadline:
                return
            with self._lock:
                self._pending.popleft()
            on_timeout(timeout_s)
            return  # ops queued behind it were waiting on the same released flags: give them a poll to finish

    def _run(self) -> None:
        while True:
            if not self.pending():
                self._wake.wait()
                self._wake.clear()
            time.sleep(self.poll_s)
            try:
                self.poll()
            except Exception as error:  # noqa: BLE001 - a dead watchdog would turn the next stall into a hang
                print(f"autotp fused-collective watchdog: {type(error).__name__}: {error}", file=sys.stderr,
                      flush=True)


WATCHDOG = Watchdog()
