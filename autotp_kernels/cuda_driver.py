"""CUDA driver stream memory operations, called through ctypes (no compiled extension needed).

  write_value(stream, addr, value)   when the stream reaches it: fence, then *addr = value (any mapped address,
                                     a peer's symmetric memory included)
  wait_value(stream, addr, value)    the stream waits until (int32)(*addr - value) >= 0
  copy(stream, dst, src, nbytes)     cuMemcpyDtoDAsync: the copy engine, peer addresses included
  memset32(stream, addr, value, n)   cuMemsetD32Async
  Event                              cuEventCreate/Record/Query, cuStreamWaitEvent on raw handles

These are what lets the fused collectives synchronise ranks without a spinning kernel: a wait holds no SM, so it
can never keep a GEMM (or a lazily loaded kernel) from running, which is how the spinning design stalled on H200
(bench/results/fused_notes.md). A stream wait cannot time out by itself: `watchdog` turns a stall into an error.
One ctypes call costs ~1 us of host time against 5-10 us for a torch copy_ (dispatcher and TensorIterator) and
~4 us for a torch.cuda.Event record or wait: at W=4 an all-reduce chunk issues about 25 of them, so the host path
is what bounds the fused op's time (bench/results/fused_notes.md: ~150 us of host time per chunk before).
"""

from __future__ import annotations

import ctypes
import functools

_WAIT_GEQ = 0x0  # CU_STREAM_WAIT_VALUE_GEQ: cyclic signed comparison, so epochs may wrap
_WRITE_DEFAULT = 0x0  # CU_STREAM_WRITE_VALUE_DEFAULT: earlier writes of the stream are visible first


class DriverError(RuntimeError):
    """A CUDA driver call failed; the message names the call and the error."""


@functools.lru_cache(maxsize=None)
def _lib():
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError as error:
        raise DriverError(f"the fused TP collectives need the CUDA driver library libcuda.so.1: {error}") from None
    u64, u32, uint = ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint
    fns = {}
    for name, alternatives, argtypes in (
            ("write", ("cuStreamWriteValue32_v2", "cuStreamWriteValue32"), [ctypes.c_void_p, u64, u32, uint]),
            ("wait", ("cuStreamWaitValue32_v2", "cuStreamWaitValue32"), [ctypes.c_void_p, u64, u32, uint]),
            ("copy", ("cuMemcpyDtoDAsync_v2", "cuMemcpyDtoDAsync"), [u64, u64, ctypes.c_size_t, ctypes.c_void_p]),
            ("memset", ("cuMemsetD32Async",), [u64, u32, ctypes.c_size_t, ctypes.c_void_p]),
            ("event_create", ("cuEventCreate",), [ctypes.POINTER(ctypes.c_void_p), uint]),
            ("event_destroy", ("cuEventDestroy_v2", "cuEventDestroy"), [ctypes.c_void_p]),
            ("event_record", ("cuEventRecord",), [ctypes.c_void_p, ctypes.c_void_p]),
            ("event_query", ("cuEventQuery",), [ctypes.c_void_p]),
            ("stream_wait_event", ("cuStreamWaitEvent",), [ctypes.c_void_p, ctypes.c_void_p, uint]),
            ("error_name", ("cuGetErrorName",), [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)])):
        fn = next((getattr(lib, n) for n in alternatives if hasattr(lib, n)), None)
        if fn is None:
            raise DriverError(f"libcuda.so.1 has none of {alternatives}: driver too old for the fused collectives")
        fn.argtypes, fn.restype = argtypes, ctypes.c_int
        fns[name] = fn
    return fns


def _check(code: int, what) -> None:
    """`what` is a callable naming the call: the message is only formatted on failure (host time per call)."""
    if code != 0:
        name = ctypes.c_char_p()
        _lib()["error_name"](code, ctypes.byref(name))
        raise DriverError(f"{what()} failed: {(name.value or b'CUDA error').decode()} ({code})")


def write_value(stream: int, addr: int, value: int) -> None:
    code = _lib()["write"](stream, addr, value & 0xFFFFFFFF, _WRITE_DEFAULT)
    if code:
        _check(code, lambda: f"cuStreamWriteValue32({addr:#x})")


def wait_value(stream: int, addr: int, value: int) -> None:
    code = _lib()["wait"](stream, addr, value & 0xFFFFFFFF, _WAIT_GEQ)
    if code:
        _check(code, lambda: f"cuStreamWaitValue32({addr:#x})")


def copy(stream: int, dst: int, src: int, nbytes: int) -> None:
    if nbytes:
        code = _lib()["copy"](dst, src, nbytes, stream)
        if code:
            _check(code, lambda: f"cuMemcpyDtoDAsync({nbytes} bytes {src:#x} -> {dst:#x})")


def memset32(stream: int, addr: int, value: int, count: int) -> None:
    code = _lib()["memset"](addr, value & 0xFFFFFFFF, count, stream)
    if code:
        _check(code, lambda: f"cuMemsetD32Async({addr:#x}, {count})")


_EVENT_DISABLE_TIMING = 0x2  # no timestamps: cheaper records, and these events only order streams
_NOT_READY = 600  # CUDA_ERROR_NOT_READY from cuEventQuery: the event's work is still pending


class Event:
    """A driver event on the current context, for ordering streams on the hot path (a torch.cuda.Event costs
    ~4 us per record or wait through the dispatcher, this ~1 us). Re-recording is safe once the waits on the
    previous record are enqueued: a wait captures the record that preceded it."""

    def __init__(self):
        handle = ctypes.c_void_p()
        _check(_lib()["event_create"](ctypes.byref(handle), _EVENT_DISABLE_TIMING), lambda: "cuEventCreate")
        self.handle = handle.value
        self._destroy = _lib()["event_destroy"]

    def record(self, stream: int) -> None:
        code = _lib()["event_record"](self.handle, stream)
        if code:
            _check(code, lambda: "cuEventRecord")

    def wait(self, stream: int) -> None:
        """`stream` waits for this event's last record."""
        code = _lib()["stream_wait_event"](stream, self.handle, 0)
        if code:
            _check(code, lambda: "cuStreamWaitEvent")

    def query(self) -> bool:
        code = _lib()["event_query"](self.handle)
        if code == _NOT_READY:
            return False
        _check(code, lambda: "cuEventQuery")
        return True

    def __del__(self):
        if getattr(self, "handle", None):
            self._destroy(self.handle)
