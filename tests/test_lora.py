"""PEFT LoRA on a TP-sharded model (`autotp/lora.py`) against the dense LoRA model in one process.

Reference: the same random-init model wrapped by `peft.get_peft_model` with the same seed, trained by plain torch
AdamW on the concatenation of every DP rank's micro-batches. LoRA is created with `init_lora_weights=False`, so
lora_B is not zero and every path (forward, the input gradient through lora_A and lora_B, both adapters' weight
gradients) counts from the first step.

Tolerances: the TP run sums the same fp32 products in another order (TP partial sums, the one all-reduce of
base + adapter, DP means). Losses: ~1e-7 relative apart, checked at rtol 1e-5. Weights after AdamW: a gradient
error d moves a weight by up to lr * d / eps per step (eps 1e-3, as tests/test_engine.py, so a coordinate whose
gradient is rounding noise is not normalised up to a full step: lr / eps = 10). The dense model's own fp32
gradients are off their fp64 values by up to ~3e-6 of the largest adapter gradient (0.12 here): d ~ 3.6e-7, so
3 steps may differ by 3 * 10 * 3.6e-7 ~ 1e-5: atol 1e-5 (at most 1.4e-6 measured), rtol 1e-5. What crosses no
rank (the saved file against the consolidated adapter) is compared bit-exact.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from dist_utils import run_distributed
from families import batch, tiny_model

MICRO, STEPS, SEQ, LR = 2, 3, 10, 1e-2
LOSS_TOLERANCE, WEIGHT_TOLERANCE = dict(rtol=1e-5, atol=0.0), dict(rtol=1e-5, atol=1e-5)  # module docstring
ATTENTION_MLP = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _lora_model(family: str, targets=ATTENTION_MLP, **lora):
    from peft import LoraConfig, get_peft_model

    model = tiny_model(family)
    torch.manual_seed(11)  # the adapters' initial weights
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=lora.pop("lora_dropout", 0.0),
                        init_lora_weights=False, **lora)
    return get_peft_model(model, config)


def _global_batch(step: int, dp: int):
    return batch(seed=200 + step, batch_size=MICRO * dp, seq=SEQ).view(dp, MICRO, SEQ)


def _optimizer(model):
    # Built on every parameter, frozen base included, as a plain PEFT script does.
    return torch.optim.AdamW(model.parameters(), lr=LR, eps=1e-3, weight_decay=0.01)


def _dense_run(family: str, dp: int, save_dir: str) -> dict:
    model = _lora_model(family)
    optimizer = _optimizer(model)
    losses = []
    for step in range(STEPS):
        ids = _global_batch(step, dp).reshape(-1, SEQ)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.save_pretrained(save_dir)
    adapter = {name: value.clone() for name, value in model.state_dict().items() if "lora_" in name}
    merged = model.merge_and_unload()
    ids = _global_batch(STEPS, 1)[0]
    with torch.no_grad():
        merged_loss = merged(input_ids=ids, labels=ids).loss.item()
    return dict(losses=losses, adapter=adapter, merged=merged.state_dict(), merged_loss=merged_loss)


def _train_tp(rank, world_size, family, tp, stage, save_dir):
    import autotp

    model = _lora_model(family)
    frozen = {id(p) for p in model.parameters() if not p.requires_grad}
    dp = world_size // tp
    config = {"train_batch_size": MICRO * dp, "train_micro_batch_size_per_gpu": MICRO,
              "zero_optimization": {"stage": stage}, "tensor_parallel": {"autotp_size": tp}}
    engine, optimizer, _, _ = autotp.initialize(model=model, optimizer=_optimizer(model), config=config)
    out = {"losses": []}
    for step in range(STEPS):
        ids = _global_batch(step, dp)[engine.dp_rank]
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        out["losses"].append(loss.item())

    # Frozen base weights: no master, no optimizer state, and not even a reference from the optimizer.
    trainable = [p for p in engine.module.parameters() if p.requires_grad]
    held = [p for group in optimizer.param_groups for p in group["params"]]
    out["store_names_lora"] = all("lora_" in name for name in engine.store.names)
    out["frozen_in_optimizer"] = sum(id(p) in frozen for p in held)
    def local(tensor):  # ZeRO-3's masters and state are DTensors: numel() would be the global size
        return tensor.to_local() if hasattr(tensor, "to_local") else tensor

    out["optimizer_numel"] = sum(local(p).numel() for p in held)
    out["state_numel"] = sum(local(t).numel() for state in optimizer.state.values() for t in state.values()
                             if t.dim())
    out["trainable_numel"] = sum(p.numel() for p in trainable)
    out["buckets"] = len(getattr(engine.store, "buckets", ()))  # ZeRO-1/2: each pads its slice by < 128

    out["adapter"] = autotp.consolidated_adapter_state_dict(model)
    engine.save_pretrained(save_dir)  # collective; rank 0 writes the adapter files
    try:
        model.save_pretrained(save_dir + "-shards")  # this rank's shards: refused
        out["plain_save"] = None
    except RuntimeError as err:
        out["plain_save"] = str(err)
    if stage == 3:  # FSDP2 units hold peft's wrappers: merge from the saved adapter instead (README)
        return out
    merged = model.merge_and_unload()  # each rank merges its shards; the base layers then do their own collectives
    ids = _global_batch(STEPS, 1)[0]
    with torch.no_grad():
        out["merged_loss"] = merged(input_ids=ids, labels=ids).loss.item()
    out["merged"] = autotp.consolidated_state_dict(merged)
    return out


def _safetensors(directory: str) -> dict:
    from safetensors.torch import load_file

    return load_file(os.path.join(directory, "adapter_model.safetensors"))


@pytest.mark.parametrize("family,tp,world,stage", [("llama", 2, 2, 0), ("qwen3", 2, 4, 2), ("llama", 4, 4, 1),
                                                    ("llama", 2, 4, 3)])
def test_lora_training_matches_dense(tmp_path, family, tp, world, stage):
    """TP=2 at ZeRO-0; TP=2 x DP=2 at ZeRO-2 (Qwen3's q/k norms, marked for a gradient sum over TP, are frozen
    here); TP=4 at ZeRO-1, where the 2 KV heads are replicated on 2 ranks each, and so are the rows of k/v's
    lora_B."""
    dp = world // tp
    results = run_distributed(world, _train_tp, family, tp, stage, str(tmp_path / "tp"))
    dense = _dense_run(family, dp, str(tmp_path / "dense"))
    losses = [sum(r["losses"][s] for r in results) / world for s in range(STEPS)]  # DP mean, TP ranks equal
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(dense["losses"]), **LOSS_TOLERANCE)

    for result in results:
        assert result["store_names_lora"] and result["frozen_in_optimizer"] == 0
        # fp32 ZeRO-0 holds the trainable parameters themselves; ZeRO-1/2 a padded 1/dp slice of them
        assert result["optimizer_numel"] <= -(-result["trainable_numel"] // dp) + 128 * result["buckets"], result
        assert result["state_numel"] == 2 * result["optimizer_numel"], result  # exp_avg, exp_avg_sq
        assert "autotp.save_pretrained" in result["plain_save"]
        if stage < 3:
            assert result["merged_loss"] == pytest.approx(dense["merged_loss"], rel=LOSS_TOLERANCE["rtol"])
    first = results[0]
    assert all(r["adapter"] is None and r.get("merged") is None for r in results[1:]), "rank 0 only"
    assert set(first["adapter"]) == set(dense["adapter"])
    for name, expected in dense["adapter"].items():
        torch.testing.assert_close(first["adapter"][name], expected, **WEIGHT_TOLERANCE, msg=name)

    saved, dense_saved = _safetensors(str(tmp_path / "tp")), _safetensors(str(tmp_path / "dense"))
    assert set(saved) == set(dense_saved) and len(saved) == 2 * 7 * 2  # lora_A and lora_B, 7 targets, 2 layers
    for name, value in first["adapter"].items():  # peft writes the adapter without its name ("default")
        assert torch.equal(saved[name.replace(".default.", ".")], value), name
    configs = []
    for run in ("tp", "dense"):
        with open(tmp_path / run / "adapter_config.json") as config_file:
            configs.append(json.load(config_file))
            configs[-1]["target_modules"] = set(configs[-1]["target_modules"])  # a set: written in hash order
    assert configs[0] == configs[1]
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")], "temporary directory left behind"

    if stage == 3:
        return
    assert set(first["merged"]) == set(dense["merged"])
    for name, expected in dense["merged"].items():
        torch.testing.assert_close(first["merged"][name], expected, **WEIGHT_TOLERANCE, msg=name)


def _gradients(model, group=None) -> dict:
    """Every trainable parameter's gradient, whole (TP shards gathered; collective when they are sharded)."""
    from autotp.checkpoint import gather_full
    from autotp.shard import layout_of

    grads = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            shard = layout_of(param)
            grads[name] = param.grad if shard is None else gather_full(param.grad, *shard, group)
    return grads


# (family, LoRA targets and options, parallelize options): how each base layer's plan reaches its adapters
LAYOUTS = {
    # HF tp_plan: qkv and gate_up gather their output, o and down split their input: adapters stay whole
    "phi3_tp_plan": ("phi3", dict(targets=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]), {}),
    # preset: fused [q | k | v] blocks and packed [gate | up] halves, each split: lora_B's rows follow the blocks
    "phi3_preset": ("phi3", dict(targets=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]),
                    dict(preset_model="phi3")),
    # Conv1D bases ([in, out] weights), peft's fan_in_fan_out
    "gpt2": ("gpt2", dict(targets=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True), {}),
    # HF tp_plan: LoRA on the LM head, split with its output gathered: the adapter stays whole
    "llama_head": ("llama", dict(targets=["q_proj", "down_proj", "lm_head"]), dict(vocab_parallel=False)),
    # preset: the LM head and the embedding kept whole, and so are their adapters
    "llama_preset": ("llama", dict(targets=["q_proj", "down_proj", "lm_head", "embed_tokens"]),
                     dict(preset_model="llama")),
}


def _layouts(rank, world_size):
    import autotp
    from autotp.shard import layout_of

    out = {}
    ids = batch(seed=5, batch_size=2, seq=SEQ)
    for case, (family, lora, options) in LAYOUTS.items():
        dense, model = (_lora_model(family, lora["targets"], **{k: v for k, v in lora.items() if k != "targets"})
                        for _ in range(2))
        dense.eval(), model.eval()  # GPT-2's own dropout off: the same model on every rank and in the reference
        autotp.parallelize(model, tp_size=2, **options)
        dense(input_ids=ids, labels=ids).loss.backward()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        split = sorted(name.split(".")[-4] + "." + name.split(".")[-3] for name, param in model.named_parameters()
                       if layout_of(param) is not None and "lora_" in name)
        out[case] = (loss.item(), _gradients(model, model.autotp_state.groups.tp_group), _gradients(dense),
                     dense(input_ids=ids, labels=ids).loss.item(), sorted(set(split)))
    out["dropout"] = _dropout_masks()
    return out


def _dropout_masks():
    """Which elements each LoRA dropout zeroed on this rank (p = 0.5, training mode), and the replicated RNG
    stream's state after the forward."""
    import autotp

    model = _lora_model("llama", ["q_proj", "o_proj"], lora_dropout=0.5)
    autotp.parallelize(model, tp_size=2)
    masks = {}

    def record(name):
        def hook(module, args, output):
            masks[name] = (output == 0) & (args[0] != 0)
        return hook

    for name, module in model.named_modules():
        if name.endswith("lora_dropout.default"):
            module.register_forward_hook(record(name))
    ids = batch(seed=6, batch_size=2, seq=SEQ)
    model(input_ids=ids, labels=ids).loss.backward()
    return masks, torch.get_rng_state()


def test_lora_layouts_follow_the_plan():
    """Loss and every adapter gradient against the dense model: fp32 gradients carry ~3e-6 of their largest entry
    of rounding error (the dense model's own, against fp64), so 1e-5 of it."""
    results = run_distributed(2, _layouts)
    split = {"phi3_tp_plan": [], "phi3_preset": ["down_proj.lora_A", "gate_up_proj.lora_B", "o_proj.lora_A",
                                                  "qkv_proj.lora_B"],
             "gpt2": ["c_attn.lora_B", "c_fc.lora_B", "c_proj.lora_A"], "llama_head": ["down_proj.lora_A",
                                                                                      "q_proj.lora_B"]}
    split["llama_preset"] = split["llama_head"]
    for result in results:
        for case in LAYOUTS:
            loss, grads, dense_grads, dense_loss, split_adapters = result[case]
            assert split_adapters == split[case], (case, split_adapters)
            assert loss == pytest.approx(dense_loss, rel=1e-5), case
            assert set(grads) == set(dense_grads) and grads, case
            for name, expected in dense_grads.items():
                scale = float(expected.abs().max())
                torch.testing.assert_close(grads[name], expected, rtol=0, atol=1e-5 * scale, msg=f"{case}: {name}")
    (masks_0, rng_0), (masks_1, rng_1) = (result["dropout"] for result in results)
    column = [name for name in masks_0 if ".q_proj." in name]
    row = [name for name in masks_0 if ".o_proj." in name]
    assert column and row
    for name in column:  # a replicated input: the same mask on every TP rank, as the dense model draws one
        assert torch.equal(masks_0[name], masks_1[name]) and masks_0[name].any(), name
    for name in row:  # each rank's own input slice, its own mask
        assert masks_0[name].shape[-1] == 32 and not torch.equal(masks_0[name], masks_1[name]), name
    assert torch.equal(rng_0, rng_1), "the replicated RNG stream diverged across TP ranks"


def _unsupported(rank, world_size):
    import autotp
    from autotp import PlanError
    from peft import IA3Config, get_peft_model

    cases = {
        "dora": (lambda: _lora_model("llama", ["q_proj"], use_dora=True), {}),
        "embedding": (lambda: _lora_model("llama", ["q_proj", "embed_tokens"]), dict(vocab_parallel=True)),
        "vocab_head": (lambda: _lora_model("llama", ["lm_head"]), dict(vocab_parallel=True)),
        "sequence_parallel": (lambda: _lora_model("llama", ["q_proj"]), dict(sequence_parallel=True)),
        "ia3": (lambda: get_peft_model(tiny_model("llama"), IA3Config(target_modules=["k_proj", "down_proj"],
                                                                        feedforward_modules=["down_proj"])), {}),
    }
    out = {}
    for case, (build, options) in cases.items():
        model = build()
        try:
            autotp.parallelize(model, tp_size=2, **options)
            out[case] = None
        except PlanError as err:
            out[case] = str(err)
        # peft's layers are back in place after the error: the same model parallelizes with a plan that keeps
        # the offending layer whole (here: no vocabulary-parallel head)
        if case == "vocab_head":
            autotp.parallelize(model, tp_size=2, vocab_parallel=False)
            out["vocab_head_then_whole"] = type(model.base_model.model.lm_head).__module__
    return out


def test_unsupported_adapters_raise_on_every_rank():
    results = run_distributed(2, _unsupported)
    assert results[0] == results[1], "every rank raises the same error"
    errors = results[0]
    layer = "base_model.model.model.layers.0"
    assert f"'{layer}.self_attn.q_proj'" in errors["dora"] and "DoRA" in errors["dora"]
    assert "'base_model.model.model.embed_tokens'" in errors["embedding"] and "Embedding" in errors["embedding"]
    assert "'base_model.model.lm_head'" in errors["vocab_head"] and "vocab_parallel_loss" in errors["vocab_head"]
    assert "sequence parallelism" in errors["sequence_parallel"]
    assert f"'{layer}.self_attn.k_proj'" in errors["ia3"] and "only LoRA" in errors["ia3"]
    assert errors["vocab_head_then_whole"].startswith("peft.")
