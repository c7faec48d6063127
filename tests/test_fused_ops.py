"""When autotp binds liger-kernel's fused RMSNorm / SwiGLU / RoPE (autotp/fused_ops.py): CUDA only, the families
listed, never with AUTOTP_FUSED_OPS=off. (The kernels themselves run on the H200: tests/gpu/parity_check.py.)"""

import torch

from autotp.fused_ops import apply_fused_ops, liger_patch_for
from dist_utils import run_distributed
from families import tiny_model


def test_only_on_cuda_for_listed_families(monkeypatch):
    llama, gpt2 = tiny_model("llama"), tiny_model("gpt2")
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert liger_patch_for(llama, cuda) == "apply_liger_kernel_to_llama"
    assert liger_patch_for(llama, cpu) is None and liger_patch_for(gpt2, cuda) is None
    monkeypatch.setenv("AUTOTP_FUSED_OPS", "off")
    assert liger_patch_for(llama, cuda) is None


def test_cpu_model_is_left_alone():
    model = tiny_model("llama")
    forward = model.model.layers[0].mlp.forward
    assert apply_fused_ops(model, torch.device("cpu")) is None
    assert model.model.layers[0].mlp.forward == forward


def _zero_head_rank(rank, world_size):
    import autotp

    model = autotp.parallelize(tiny_model("llama", num_attention_heads=3, num_key_value_heads=1, hidden_size=48),
                               tp_size=world_size, verbose=False)
    return liger_patch_for(model, torch.device("cuda", 0)), liger_patch_for(tiny_model("llama"), torch.device("cuda", 0))


def test_not_with_a_rank_without_heads():
    """3 query / 1 KV heads over 2 ranks leave rank 1 without heads: no Liger on any rank."""
    for empty, plain in run_distributed(2, _zero_head_rank):
        assert empty is None and plain == "apply_liger_kernel_to_llama"
