"""Loading autotp's C++ extensions (sources in `csrc/`).

Three modules: `autotp._planner` (the ZeRO bucket planner and launch tracker, pybind11 only, builds anywhere),
`autotp._nccl` (the NCCL communicator, needs CUDA torch and NCCL headers) and `autotp._fused` (the fused GEMM +
collective ops' host path and slot reduction, needs CUDA torch and nvcc). `pip install .` / `setup.py`
builds them ahead of time when torch is importable at build time; otherwise the first use compiles them with
ninja into a cache (a source checkout is needed for that). `import autotp` never needs them.

Environment variables:
  AUTOTP_EXT_DIR      cache directory for just-in-time builds (default ~/.cache/autotp/ext/<torch>-<cuda>)
  AUTOTP_EXT_JIT=0    never compile at run time; a module that was not built ahead of time is unavailable
  AUTOTP_EXT_VERBOSE=1  show the compiler's output
  NCCL_HOME           where include/nccl.h and lib/libnccl.so live (default: the nvidia-nccl wheel torch uses,
                      then the system)
  AUTOTP_BUILD_EXT=0  (setup.py) skip the ahead-of-time build
"""

from __future__ import annotations

import glob
import importlib
import os
import sys
from typing import Optional

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
PLANNER_SOURCES = ["bucket_plan.cpp", "planner_module.cpp"]
NCCL_SOURCES = ["nccl_comm.cpp", "nccl_module.cpp"]
FUSED_SOURCES = ["fused_issue.cpp", "fused_reduce.cu", "fused_module.cpp"]
SOURCES = {"planner": PLANNER_SOURCES, "nccl": NCCL_SOURCES, "fused": FUSED_SOURCES}
_loaded: dict = {}
_errors: dict = {}


def nccl_paths() -> tuple[Optional[str], Optional[str]]:
    """(include dir, shared library file) of NCCL: NCCL_HOME, then the nvidia-nccl wheel next to torch (the
    library torch itself loads), then the system. The library is linked by file name, since the wheel ships
    only libnccl.so.2."""
    candidates = []
    if os.environ.get("NCCL_HOME"):
        candidates.append(os.environ["NCCL_HOME"])
    for entry in sys.path:
        candidates += glob.glob(os.path.join(entry, "nvidia", "nccl")) + glob.glob(os.path.join(entry, "nvidia", "cu*"))
    candidates += ["/usr", "/usr/local", "/usr/local/cuda"]
    for base in candidates:
        include = os.path.join(base, "include")
        if not os.path.isfile(os.path.join(include, "nccl.h")):
            continue
        for lib_dir in (os.path.join(base, "lib"), os.path.join(base, "lib64"), "/usr/lib/x86_64-linux-gnu"):
            libs = sorted(glob.glob(os.path.join(lib_dir, "libnccl.so*")))
            if libs:
                return include, libs[0]
        return include, None
    return None, None


def _cache_dir(name: str) -> str:
    tag = f"torch{torch.__version__.split('+')[0]}-{torch.version.cuda or 'cpu'}-py{sys.version_info[0]}{sys.version_info[1]}"
    base = os.environ.get("AUTOTP_EXT_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "autotp", "ext", tag)
    path = os.path.join(base, name)
    os.makedirs(path, exist_ok=True)
    return path


def _jit(name: str, sources: list[str], cuda: bool):
    from torch.utils import cpp_extension

    missing = [s for s in sources if not os.path.isfile(os.path.join(CSRC, s))]
    if missing:
        raise ImportError(f"autotp extension '{name}' was not built ahead of time and its sources are not here "
                          f"({os.path.join(CSRC, missing[0])}); reinstall autotp with torch present, or use a "
                          "source checkout")
    kwargs = dict(name=f"autotp_{name}", sources=[os.path.join(CSRC, s) for s in sources],
                  build_directory=_cache_dir(name), extra_cflags=["-O2"],
                  verbose=os.environ.get("AUTOTP_EXT_VERBOSE") == "1", with_cuda=cuda)
    if cuda:
        kwargs["extra_cuda_cflags"] = ["-O3"]
    if name == "nccl":
        include, lib = nccl_paths()
        if include is None or lib is None:
            raise ImportError(f"autotp extension 'nccl': nccl.h or libnccl.so not found (include: {include}, "
                              f"library: {lib}); set NCCL_HOME")
        kwargs.update(extra_include_paths=[include],
                      extra_ldflags=[lib, f"-Wl,-rpath,{os.path.dirname(lib)}"])
    return cpp_extension.load(**kwargs)


def load(name: str):
    """The extension module `name` ('planner', 'nccl' or 'fused'); raises ImportError saying why it is
    unavailable."""
    if name in _loaded:
        return _loaded[name]
    if name in _errors:
        raise ImportError(_errors[name])
    try:
        try:
            module = importlib.import_module(f"autotp._{name}")
        except ImportError:
            if os.environ.get("AUTOTP_EXT_JIT", "1") == "0":
                raise ImportError(f"autotp extension '{name}' was not built ahead of time and AUTOTP_EXT_JIT=0 "
                                  "forbids building it now") from None
            if name != "planner" and not (torch.cuda.is_available() and torch.version.cuda):
                raise ImportError(f"autotp extension '{name}' needs CUDA torch and a GPU") from None
            module = _jit(name, SOURCES[name], cuda=name != "planner")
    except Exception as err:  # a compiler error is as much a reason as a missing file
        message = str(err) if isinstance(err, ImportError) else f"building autotp extension '{name}' failed: {err}"
        _errors[name] = message
        raise ImportError(message) from None
    _loaded[name] = module
    return module
