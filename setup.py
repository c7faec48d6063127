"""Ahead-of-time build of autotp's C++ extensions (see autotp/_ext.py; everything else is in pyproject.toml).

When torch is importable at build time (`pip install --no-build-isolation .`), builds `autotp._planner`, with CUDA
torch `autotp._fused`, and with NCCL headers too `autotp._nccl`. Without torch (an isolated build) or with AUTOTP_BUILD_EXT=0 it
installs the pure Python package; the extensions then compile on first use.
"""

import os

from setuptools import setup


def extensions():
    if os.environ.get("AUTOTP_BUILD_EXT", "1") == "0":
        return {}, []
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        return {}, []
    flags = {"cxx": ["-O2"]}
    modules = [CppExtension("autotp._planner", ["csrc/bucket_plan.cpp", "csrc/planner_module.cpp"],
                            extra_compile_args=flags)]
    if torch.version.cuda:
        modules.append(CUDAExtension(
            "autotp._fused", ["csrc/fused_issue.cpp", "csrc/fused_reduce.cu", "csrc/fused_module.cpp"],
            extra_compile_args={**flags, "nvcc": ["-O3"]}))
    if torch.version.cuda and os.environ.get("AUTOTP_BUILD_NCCL", "1") != "0":
        import importlib.util
        import sys

        spec = importlib.util.spec_from_file_location("autotp_ext_paths", os.path.join("autotp", "_ext.py"))
        paths = importlib.util.module_from_spec(spec)
        sys.modules["autotp_ext_paths"] = paths
        spec.loader.exec_module(paths)
        include, lib = paths.nccl_paths()
        if include is not None and lib is not None:
            modules.append(CUDAExtension(
                "autotp._nccl", ["csrc/nccl_comm.cpp", "csrc/nccl_module.cpp"], include_dirs=[include],
                extra_link_args=[lib, f"-Wl,-rpath,{os.path.dirname(lib)}"],
                extra_compile_args={**flags, "nvcc": ["-O2"]}))
    class OptionalBuildExtension(BuildExtension):
        """A failed build (no compiler, no NCCL) leaves a working pure-Python install: the extensions are
        optional and compile on first use instead (autotp/_ext.py), where the error is reported by name."""

        def run(self):
            try:
                super().run()
            except Exception as err:  # the compiler's own output is above this line
                print(f"autotp: building the C++ extensions failed ({err}); installing without them")

    return {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}, modules


cmdclass, ext_modules = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
