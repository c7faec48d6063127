"""The README's install and commands are what CI runs, and the documented CPU path needs no kernel package."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

from dist_utils import run_distributed

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _readme_block(name: str) -> list[str]:
    spec = importlib.util.spec_from_file_location("readme_block", ROOT / ".ci" / "readme_block.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.block((ROOT / "README.md").read_text(), name)


def test_ci_runs_the_readme_blocks_and_nothing_else():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "run_block install" in ci and "run_block commands" in ci
    # An install line of CI's own would let CI pass where the README's lines fail (how triton hid before).
    assert "pip install" not in ci and "pytest" not in ci


def test_readme_install_and_commands():
    install = _readme_block("install")
    assert any(line.startswith("pip install -e \".[test]\"") for line in install), install
    commands = [line.split("#")[0].strip() for line in _readme_block("commands")]
    assert commands == ["autotp-train", "python3 -m pytest -q tests"]


def test_pyproject_declares_what_runs_and_tests():
    text = (ROOT / "pyproject.toml").read_text()
    for requirement in ('"triton;', '"transformers', '"ninja"', '"pybind11"',
                        'test = ["pytest", "accelerate", "peft", "trl"]', 'hf = ["accelerate", "peft", "trl"]'):
        assert requirement in text, requirement


class _NoTriton:
    """A meta-path finder that makes `import triton` fail, as on a machine without it."""

    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ModuleNotFoundError(f"No module named '{name}'", name=name)
        return None


def _tp_forward_without_triton(rank, world_size):
    sys.meta_path.insert(0, _NoTriton())
    for name in [n for n in sys.modules if n == "triton" or n.startswith(("triton.", "autotp_kernels"))]:
        del sys.modules[name]
    import autotp
    from families import tiny_model

    model = autotp.parallelize(tiny_model("llama"), tp_size=world_size, kernels="auto")
    ids = __import__("torch").arange(12).reshape(2, 6)
    model(input_ids=ids, labels=ids).loss.backward()
    return sorted(n for n in sys.modules if n.startswith(("triton", "autotp_kernels")))


def test_cpu_tp_with_kernels_auto_never_imports_the_kernels():
    """`kernels: auto` at TP=2 on the CPU once imported autotp_kernels (and so triton) on every forward."""
    for loaded in run_distributed(2, _tp_forward_without_triton, timeout_s=180):
        assert loaded == []
