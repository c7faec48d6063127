# Sourced by the bench/run_*_gpu.sh scripts: setup steps they share on a fresh device machine.

# DeepSpeed and its pure-Python dependencies from the wheels carried in .whl/ (../shared/GPU.md says how they are
# built); puts them on PYTHONPATH. Does nothing when no wheel was carried.
install_deepspeed_wheels() {
  if ls .whl/deepspeed-*.whl > /dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=$PWD:/tmp/site
  fi
}

# autotp's C++/NCCL extensions, built once outside any time limit: a JIT build inside a timed ZeRO run (DP > 1)
# took the whole 70-150 s limit in three device calls.
build_extensions() {
  python3 -c "from autotp import _ext; _ext.load('nccl'); _ext.load('planner'); _ext.load('fused'); print('extensions built')" 2>&1 | tail -1
}

# PYTHONPATH for one package version in a side-by-side bench: "tree" is the working tree, any other name a
# `git archive` of autotp/ and autotp_kernels/ under .bench_versions/<name> (carried, git-ignored) ahead of it.
version_path() {
  if [ "$1" = tree ]; then echo "$PWD"; else echo "$PWD/.bench_versions/$1:$PWD"; fi
}
