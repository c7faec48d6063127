"""End-to-end checks of the `autotp-train` job and the first example, each run as a real subprocess.

Reference for the saved model: plain transformers (`AutoModelForCausalLM.from_pretrained`, no autotp import
needed); it must load every weight and give finite logits. A bad --model must fail in the parent, before any
worker starts, so it has to be fast (< 30 s includes importing torch and transformers).
"""

import csv
import os
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "PYTHONPATH": ROOT}
for torchrun_var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
    ENV.pop(torchrun_var, None)  # the job must take its own spawn path even if pytest runs under torchrun


def _run(args, timeout_s):
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=timeout_s)


def test_train_cli_writes_loadable_model(tmp_path):
    from transformers import AutoModelForCausalLM

    output = tmp_path / "run"
    result = _run(["-m", "autotp.train", "--steps", "3", "--seq-len", "32", "--output", str(output)], 120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "loss" in result.stdout and str(output / "model") in result.stdout

    model = AutoModelForCausalLM.from_pretrained(output / "model").eval()
    input_ids = torch.tensor([list(b"Bridges carry load by bending.")])
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
    assert logits.shape == (1, input_ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()

    assert (output / "loss.png").stat().st_size > 0
    with open(output / "losses.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    assert all(float(r["loss"]) > 0 for r in rows)


@pytest.mark.parametrize("bad_args, expected", [
    (["--model", "/nonexistent"], "/nonexistent"),
    (["--config", "/nonexistent.json"], "/nonexistent.json"),
])
def test_train_cli_bad_arguments_fail_fast(tmp_path, bad_args, expected):
    start = time.monotonic()
    result = _run(["-m", "autotp.train", "--steps", "1", "--output", str(tmp_path), *bad_args], 60)
    assert result.returncode != 0
    assert expected in result.stderr
    assert time.monotonic() - start < 30, "a bad argument must be rejected before spawning workers"


def test_example_01_toy_mlp():
    result = _run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "examples/01_toy_mlp.py"],
                  120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("output matches the dense MLP") == 2


def test_example_05_2d_tensor_parallel():
    result = _run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4",
                   "examples/05_2d_tensor_parallel.py"], 180)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("= dense") == 3 and result.stdout.count("q_proj block (32, 32)") == 4


def test_example_hf_trainer_as_in_readme(tmp_path):
    """The README's `autotp.hf` section: its script, launched as written (fewer steps), trains and saves plain HF
    files."""
    from transformers import AutoModelForCausalLM

    output = tmp_path / "hf"
    result = _run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "examples/hf_trainer.py",
                   "--steps", "6", "--output", str(output)], 180)
    assert result.returncode == 0, result.stdout + result.stderr
    assert '"backend": "autotp"' in result.stdout and '"tp": 2' in result.stdout
    model = AutoModelForCausalLM.from_pretrained(output / "final")
    assert model.config.num_hidden_layers == 4


def _losses(output):
    with open(output / "losses.csv") as handle:
        return [(int(r["step"]), r["loss"]) for r in csv.DictReader(handle)]


def test_train_cli_zero2_checkpoint_resume(tmp_path):
    # 4 steps with a checkpoint every 2, then --resume up to 6, against 6 steps without stopping: the resumed
    # curve equals the uninterrupted one digit for digit (exact resume: data order follows the step counter).
    # The LR schedule must not depend on --steps (the default cosine does), so the config sets WarmupLR.
    config = tmp_path / "ds.json"
    config.write_text('{"scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 3, "warmup_max_lr": 0.002}}}')
    common = ["-m", "autotp.train", "--nproc", "4", "--tp", "2", "--zero", "2", "--seq-len", "32",
              "--config", str(config)]
    stopped, through = tmp_path / "stopped", tmp_path / "through"
    outputs = []
    for args in (["--steps", "4", "--save-every", "2", "--output", str(stopped)],
                 ["--steps", "6", "--resume", "--save-every", "2", "--output", str(stopped)],
                 ["--steps", "6", "--output", str(through)]):
        result = _run(common + args, 180)
        assert result.returncode == 0, result.stdout + result.stderr
        outputs.append(result.stdout)
    assert "resumed from" in outputs[1] and "at step 4" in outputs[1], outputs[1]
    assert sorted(os.listdir(stopped / "checkpoints")) == ["global_step2", "global_step4", "global_step6", "latest"]
    assert _losses(stopped) == _losses(through)
    assert [step for step, _ in _losses(stopped)] == [1, 2, 3, 4, 5, 6]


def test_train_cli_worker_failure_is_one_clear_last_line(tmp_path):
    """A failure inside a worker (here: a model directory with a config and no weights, which only the workers'
    from_pretrained finds out) prints that worker's traceback once, then names the rank and the error last."""
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                num_hidden_layers=1).save_pretrained(tmp_path / "no_weights")
    result = _run(["-m", "autotp.train", "--steps", "1", "--nproc", "2", "--output", str(tmp_path / "run"),
                   "--model", str(tmp_path / "no_weights")], 120)
    assert result.returncode != 0
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert lines[-1].startswith("autotp-train: rank ") and "failed: OSError" in lines[-1], lines[-3:]
    assert result.stderr.count("Traceback") == 1, result.stderr
