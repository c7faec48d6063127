"""Training checkpoints: `engine.save_checkpoint` / `engine.load_checkpoint` (DeepSpeed's signatures).

A checkpoint is a directory `save_dir/<tag>/`:
  manifest.json               every file below with its byte size (written last, checked first on load)
  engine.pt                   counters, loss scaler, LR scheduler, client state, parameter layouts (rank 0)
  model_tp{t}.pt              the module state of TP rank t (local shards), written by its DP rank 0
  optim_tp{t}_dp{d}.pt        the fp32 master weights and per-element optimizer state this rank owns, keyed
                              by parameter name and range; per-group scalar state; param group settings
  rng_rank{r}.pt              every RNG state of global rank r (and its per-TP-rank dropout stream)

Atomicity: every rank writes into `save_dir/.<tag>.partial/`; once all files exist and the manifest is written,
rank 0 renames the directory into place (an older directory of the same tag is moved aside first and removed
last) and only then replaces `latest`. A crash at any point leaves the previous checkpoint and `latest` whole.

Resharding: parameters are stored by name with their TP layout. On load, a rank that needs a piece of a
parameter assembles it from whichever files hold it: same TP size, from its own TP rank's files; another TP
size, by unsharding the old TP shards and cutting the new one. So a checkpoint saved at (tp, dp, stage) loads
at any (tp', dp', stage') whose TP size divides the model, optimizer state included.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from typing import Optional

import torch
import torch.distributed as dist

from .checkpoint import _global_rank, _raise_everywhere
from .shard import Block, ShardLayout, local_shape, shard_tensor, unshard_tensor

logger = logging.getLogger("autotp")

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LATEST = "latest"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, damaged, or does not fit this model; the message names the file or key."""


def _all_ranks(value) -> list:
    """Every rank's `value`, in rank order (all_gather_object; just [value] without a process group)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write(obj, path: str) -> int:
    """torch.save to a temporary name, flushed to disk, then renamed: the file is either whole or absent."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    return os.path.getsize(path)


def _write_text(text: str, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _layout_to_data(layout: ShardLayout) -> dict:
    return dict(dim=layout.dim, tp_size=layout.tp_size, view=list(layout.view) if layout.view else None,
                blocks=[[b.size, b.pieces, b.unit] for b in layout.blocks])


def _layout_from_data(data: dict) -> ShardLayout:
    return ShardLayout(dim=data["dim"], tp_size=data["tp_size"], view=tuple(data["view"]) if data["view"] else None,
                       blocks=tuple(Block(*b) for b in data["blocks"]))


def _rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    try:
        import numpy

        state["numpy"] = numpy.random.get_state()
    except ImportError:
        pass
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if "numpy" in state:
        import numpy

        numpy.random.set_state(state["numpy"])


def _same_everywhere(value, what: str):
    values = _all_ranks(value)
    if any(v != values[0] for v in values):
        raise CheckpointError(f"{what} differs between ranks: {values}; pass the same value on every rank")
    return values[0]


def _split_state(state: dict, numel: int) -> tuple[dict, dict]:
    """(per-element tensors, everything else) of one optimizer tensor's state."""
    elements, scalars = {}, {}
    for key, value in state.items():
        if torch.is_tensor(value) and value.numel() == numel and value.ndim > 0:
            elements[key] = value
        else:
            scalars[key] = value
    return elements, scalars


# ---- save ------------------------------------------------------------------------------------------------

def save_checkpoint(engine, save_dir: str, tag: Optional[str] = None, client_state: Optional[dict] = None,
                    save_latest: bool = True) -> str:
    """Collective over all ranks. Returns the checkpoint directory."""
    tag = str(tag) if tag is not None else f"global_step{engine.global_steps}"
    tag = _same_everywhere(tag, "checkpoint tag")
    if os.sep in tag or tag in (LATEST, "", ".", ".."):
        raise CheckpointError(f"checkpoint tag {tag!r} must be a plain directory name")
    final = os.path.join(save_dir, tag)
    partial = os.path.join(save_dir, f".{tag}.partial")
    error = None
    if _global_rank() == 0:
        try:
            os.makedirs(save_dir, exist_ok=True)
            for name in os.listdir(save_dir):  # left behind by crashed saves: never loadable, only space
                if name.startswith(".") and name.endswith((".partial", ".old")):
                    shutil.rmtree(os.path.join(save_dir, name), ignore_errors=True)
            os.makedirs(partial)
        except OSError as err:
            error = f"save_checkpoint: cannot create '{partial}': {err}"
    _raise_everywhere(error)

    sizes, error = {}, None
    try:
        for name, obj in _files_of_this_rank(engine, client_state or {}):
            sizes[name] = _write(obj, os.path.join(partial, name))
    except Exception as err:  # every rank learns of it below instead of waiting at the next collective
        error = f"save_checkpoint on rank {_global_rank()} failed writing into '{partial}': {err!r}"
    gathered = _all_ranks((error, sizes))
    _raise_everywhere(next((e for e, _ in gathered if e), None))

    error = None
    if _global_rank() == 0:
        try:
            files = {}
            for _, rank_sizes in gathered:
                files.update(rank_sizes)
            manifest = dict(format=FORMAT_VERSION, tag=tag, files=files)
            _write_text(json.dumps(manifest, indent=1, sort_keys=True), os.path.join(partial, MANIFEST))
            _fsync_dir(partial)
            old = None
            if os.path.exists(final):
                old = os.path.join(save_dir, f".{tag}.old")
                shutil.rmtree(old, ignore_errors=True)
                os.rename(final, old)
            os.rename(partial, final)
            if save_latest:
                _write_text(tag, os.path.join(save_dir, LATEST))
            _fsync_dir(save_dir)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except OSError as err:
            error = f"save_checkpoint: cannot commit '{final}': {err}"
    _raise_everywhere(error)
    return final


def _files_of_this_rank(engine, client_state: dict):
    groups, store = engine.groups, engine.store
    tp_rank, dp_rank = groups.tp_rank, groups.dp_rank
    if dp_rank == 0:
        model = {}
        for name, tensor in engine.module.state_dict(keep_vars=True).items():
            model[name] = tensor.detach().cpu()
        yield f"model_tp{tp_rank:02d}.pt", model
    if store.writes_optimizer_file():
        yield f"optim_tp{tp_rank:02d}_dp{dp_rank:02d}.pt", _optimizer_payload(engine)
    rng = _rng_state()
    if getattr(engine.module, "autotp_rng", None) is not None:
        rng["tp_dropout"] = engine.module.autotp_rng.state_dict()
    yield f"rng_rank{_global_rank():05d}.pt", rng
    if _global_rank() == 0:
        yield "engine.pt", _engine_payload(engine, client_state)


def _optimizer_payload(engine) -> dict:
    optimizer, store = engine.optimizer, engine.store
    slices = []
    for name, start, length, tensor, offset in store.optimizer_slices():
        elements, _ = _split_state(optimizer.state.get(tensor, {}), tensor.numel())
        values = {"master": tensor.detach().reshape(-1)[offset:offset + length].cpu().clone()}
        for key, value in elements.items():
            values[key] = value.detach().reshape(-1)[offset:offset + length].cpu().clone()
        slices.append((name, start, length, values))
    scalars, element_keys, settings = [], [], []
    for group in optimizer.param_groups:
        first = next((p for p in group["params"] if p in optimizer.state), None)
        elements, scalar = _split_state(optimizer.state[first], first.numel()) if first is not None else ({}, {})
        scalars.append(scalar)
        element_keys.append(sorted(elements))
        settings.append({k: v for k, v in group.items() if k != "params"})
    return dict(slices=slices, scalars=scalars, element_keys=element_keys, param_groups=settings)


def _engine_payload(engine, client_state: dict) -> dict:
    layouts = {}
    for name, tensor in engine.module.state_dict(keep_vars=True).items():
        layout = getattr(tensor, "autotp_layout", None)
        if layout is not None:
            layouts[name] = dict(layout=_layout_to_data(layout), full_shape=list(tensor.autotp_full_shape))
    return dict(
        format=FORMAT_VERSION, tp_size=engine.groups.tp_size, dp_size=engine.groups.dp_size,
        zero_stage=engine.store.stage, global_steps=engine.global_steps, micro_steps=engine.micro_steps,
        skipped_steps=engine.skipped_steps, layouts=layouts,
        loss_scaler=engine.loss_scaler.state_dict() if engine.loss_scaler else None,
        lr_scheduler=engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None,
        client_state=client_state)


# ---- load ------------------------------------------------------------------------------------------------

class _Reader:
    """Opens checkpoint files lazily (memory-mapped) and names the file in every failure."""

    def __init__(self, path: str, manifest: dict):
        self.path = path
        self.manifest = manifest
        self._open: dict = {}

    def __call__(self, name: str):
        if name not in self._open:
            if name not in self.manifest["files"]:
                raise CheckpointError(f"checkpoint '{self.path}' has no file '{name}' (saved with another "
                                      "layout?)")
            full = os.path.join(self.path, name)
            try:
                self._open[name] = torch.load(full, map_location="cpu", mmap=True, weights_only=False)
            except Exception as err:
                raise CheckpointError(f"checkpoint file '{full}' cannot be read: {err}") from None
        return self._open[name]


def _check_files(path: str) -> dict:
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint directory '{path}' does not exist")
    if not os.path.isfile(manifest_path):
        raise CheckpointError(f"checkpoint '{path}' has no '{MANIFEST}': incomplete or not an autotp checkpoint")
    try:
        with open(manifest_path) as handle:
            manifest = json.load(handle)
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"checkpoint file '{manifest_path}' is damaged: {err}") from None
    for name, size in sorted(manifest["files"].items()):
        full = os.path.join(path, name)
        if not os.path.isfile(full):
            raise CheckpointError(f"checkpoint file '{full}' is missing")
        actual = os.path.getsize(full)
        if actual != size:
            raise CheckpointError(f"checkpoint file '{full}' is damaged: {actual} bytes, the manifest says {size}")
    return manifest


def _resolve_tag(load_dir: str, tag: Optional[str]) -> Optional[str]:
    if tag is not None:
        return str(tag)
    latest = os.path.join(load_dir, LATEST)
    if not os.path.isfile(latest):
        return None
    with open(latest) as handle:
        return handle.read().strip()


def load_checkpoint(engine, load_dir: str, tag: Optional[str] = None, load_module_strict: bool = True,
                    load_optimizer_states: bool = True, load_lr_scheduler_states: bool = True,
                    load_module_only: bool = False):
    """Collective over all ranks. Returns (checkpoint path, client_state), or (None, None) when `load_dir`
    has no `latest` and no tag is given (nothing saved yet), as DeepSpeed does."""
    tag = _same_everywhere(_resolve_tag(load_dir, tag), "checkpoint tag")
    if tag is None:
        logger.warning("autotp: no '%s' file in '%s'; nothing loaded", LATEST, load_dir)
        return None, None
    path = os.path.join(load_dir, tag)
    error, meta = None, None
    try:
        reader = _Reader(path, _check_files(path))
        meta = reader("engine.pt")
        _load_module(engine, reader, meta, load_module_strict)
        if load_optimizer_states and not load_module_only:
            _load_optimizer(engine, reader, meta)
        else:
            engine.store.load_masters_from_model()
    except (CheckpointError, KeyError, ValueError, RuntimeError) as err:
        error = str(err) if isinstance(err, CheckpointError) else f"loading checkpoint '{path}': {err!r}"
    _raise_everywhere(error)

    if not load_module_only:
        engine.global_steps = meta["global_steps"]
        engine.micro_steps = meta["micro_steps"]
        engine.skipped_steps = meta["skipped_steps"]
        if engine.loss_scaler is not None and meta["loss_scaler"] is not None:
            engine.loss_scaler.load_state_dict(meta["loss_scaler"])
        if load_lr_scheduler_states and engine.lr_scheduler is not None and meta["lr_scheduler"] is not None:
            engine.lr_scheduler.load_state_dict(meta["lr_scheduler"])
        same_layout = (meta["tp_size"], meta["dp_size"]) == (engine.groups.tp_size, engine.groups.dp_size)
        if same_layout:
            rng = reader(f"rng_rank{_global_rank():05d}.pt")
            _set_rng_state(rng)
            if "tp_dropout" in rng and getattr(engine.module, "autotp_rng", None) is not None:
                engine.module.autotp_rng.load_state_dict(rng["tp_dropout"])
        else:
            logger.warning("autotp: checkpoint saved at TP %d x DP %d, loaded at TP %d x DP %d: model and "
                           "optimizer resharded; RNG states not restored", meta["tp_size"], meta["dp_size"],
                           engine.groups.tp_size, engine.groups.dp_size)
    return path, meta["client_state"]


def _load_module(engine, reader: _Reader, meta: dict, strict: bool) -> None:
    old_tp, new_tp, tp_rank = meta["tp_size"], engine.groups.tp_size, engine.groups.tp_rank
    own = reader(f"model_tp{tp_rank:02d}.pt" if old_tp == new_tp else "model_tp00.pt")
    state = engine.module.state_dict(keep_vars=True)
    missing = sorted(set(state) - set(own))
    if strict and missing:
        raise CheckpointError(f"checkpoint '{reader.path}' lacks module key '{missing[0]}' "
                              f"({len(missing)} missing)")
    unexpected = sorted(set(own) - set(state))
    if strict and unexpected:
        raise CheckpointError(f"checkpoint '{reader.path}' has module key '{unexpected[0]}' this model lacks")
    with torch.no_grad():
        for name, tensor in state.items():
            if name not in own:
                continue
            if _stored_as_here(name, meta, tensor, new_tp):
                value = own[name]
            else:
                value = _reshard(name, meta, tensor, engine.groups.tp_rank,
                                 lambda r: reader(f"model_tp{r:02d}.pt")[name])
            if tuple(value.shape) != tuple(tensor.shape):
                raise CheckpointError(f"checkpoint '{reader.path}': module key '{name}' has shape "
                                      f"{tuple(value.shape)}, this model's shard is {tuple(tensor.shape)}")
            tensor.copy_(value)


def _stored_as_here(name: str, meta: dict, target: torch.Tensor, tp_size: int) -> bool:
    """Whether a TP rank's saved copy of `name` is this model's shard as it stands: the same TP size and the same
    layout (or replicated in both). A checkpoint saved with another sharding of a tensor (e.g. the embedding
    without `vocab_parallel_loss`) is resharded instead, so it does not depend on that flag."""
    if meta["tp_size"] != tp_size:
        return False
    info = meta["layouts"].get(name)
    layout = getattr(target, "autotp_layout", None)
    if info is None or layout is None:
        return info is None and layout is None
    return _layout_to_data(layout) == info["layout"]


def _reshard(name: str, meta: dict, target: torch.Tensor, tp_rank: int, old_shard) -> torch.Tensor:
    """`tp_rank`'s shard of `name` in the layout of `target` (this model's tensor), from `old_shard(r)` of every
    old TP rank (a tensor saved replicated: from `old_shard(0)`)."""
    info = meta["layouts"].get(name)
    if info is None:
        full = old_shard(0).reshape(getattr(target, "autotp_full_shape", target.shape))
    else:
        old_layout, full_shape = _layout_from_data(info["layout"]), info["full_shape"]
        shards = [old_shard(r).reshape(local_shape(old_layout, full_shape, r)) for r in range(meta["tp_size"])]
        full = unshard_tensor(shards, old_layout, full_shape)
    layout = getattr(target, "autotp_layout", None)
    return shard_tensor(full, layout, tp_rank) if layout is not None else full


def _load_optimizer(engine, reader: _Reader, meta: dict) -> None:
    old_tp, old_dp, tp_rank = meta["tp_size"], meta["dp_size"], engine.groups.tp_rank
    old_dp_files = old_dp if meta["zero_stage"] > 0 else 1

    def files_of(old_tp_rank: int):
        return [reader(f"optim_tp{old_tp_rank:02d}_dp{d:02d}.pt") for d in range(old_dp_files)]

    index: dict = {}  # (old tp rank, name) -> [(start, length, values)]
    indexed: set = set()

    def pieces(old_tp_rank: int, name: str):
        if old_tp_rank not in indexed:
            for payload in files_of(old_tp_rank):
                for pname, start, length, values in payload["slices"]:
                    index.setdefault((old_tp_rank, pname), []).append((start, length, values))
            indexed.add(old_tp_rank)
        found = index.get((old_tp_rank, name))
        if not found:
            raise CheckpointError(f"checkpoint '{reader.path}' holds no optimizer state for parameter '{name}'")
        return found

    def old_flat(old_tp_rank: int, name: str, numel: int) -> dict:
        out = {}
        if numel == 0:  # an empty shard (a TP rank holding no head) has no slice in any optimizer file
            return out
        for start, length, values in pieces(old_tp_rank, name):
            for key, value in values.items():
                out.setdefault(key, torch.empty(numel, dtype=value.dtype))[start:start + length] = value
        return out

    cache: dict = {}
    optimizer, store = engine.optimizer, engine.store
    param_of = dict(zip(store.names, store.params))

    def fetch(name: str, numel: int) -> dict:
        if name not in cache:
            cache.clear()  # one parameter at a time: slices of a parameter are consecutive
            target = param_of[name]
            if _stored_as_here(name, meta, target, engine.groups.tp_size):
                cache[name] = old_flat(tp_rank, name, numel)
            else:
                info = meta["layouts"].get(name)
                if info is None:  # saved replicated: old TP rank 0 holds it whole (`_reshard` reads only that)
                    full_shape = getattr(target, "autotp_full_shape", target.shape)
                    per_rank = [old_flat(0, name, int(torch.Size(full_shape).numel()))]
                else:
                    old_layout, full_shape = _layout_from_data(info["layout"]), info["full_shape"]
                    per_rank = [old_flat(r, name, int(torch.Size(local_shape(old_layout, full_shape, r)).numel()))
                                for r in range(old_tp)]
                dtypes = {key: value.dtype for flat in per_rank for key, value in flat.items()}
                cache[name] = {key: _reshard(name, meta, target, tp_rank,
                                             lambda r, k=key, d=dtype: per_rank[r].get(k, torch.empty(0, dtype=d))
                                             ).reshape(-1) for key, dtype in dtypes.items()}
        values = cache[name]
        if values["master"].numel() != numel:
            raise CheckpointError(f"checkpoint '{reader.path}': parameter '{name}' has {values['master'].numel()} "
                                  f"elements in this rank's shard, the model has {numel}")
        return values

    numel_of = {n: p.numel() for n, p in param_of.items()}
    saved_groups = reader(f"optim_tp{0:02d}_dp{0:02d}.pt")
    if len(saved_groups["param_groups"]) != len(optimizer.param_groups):
        raise CheckpointError(f"checkpoint '{reader.path}' has {len(saved_groups['param_groups'])} optimizer "
                              f"param groups, this optimizer has {len(optimizer.param_groups)}")
    with torch.no_grad():
        for name, start, length, tensor, offset in store.optimizer_slices():
            if length == 0:  # an empty shard: its element state is created empty below
                continue
            values = fetch(name, numel_of[name])
            state = optimizer.state[tensor]
            tensor.view(-1)[offset:offset + length].copy_(values["master"][start:start + length])
            for key, flat in values.items():
                if key == "master":
                    continue
                if key not in state:
                    state[key] = torch.zeros(tensor.numel(), dtype=flat.dtype, device=tensor.device).view_as(tensor)
                state[key].view(-1)[offset:offset + length].copy_(flat[start:start + length])
        for group, settings, scalars, element_keys in zip(optimizer.param_groups, saved_groups["param_groups"],
                                                          saved_groups["scalars"], saved_groups["element_keys"]):
            group.update({k: v for k, v in settings.items() if k in group})
            for tensor in group["params"]:
                for key in element_keys:  # a partition of pure padding received no slice above
                    if key not in optimizer.state[tensor]:
                        optimizer.state[tensor][key] = torch.zeros_like(tensor)
                for key, value in scalars.items():
                    if torch.is_tensor(value):
                        value = value.clone()
                        if key == "step" and (group.get("fused") or group.get("capturable")):
                            # torch's fused and capturable Adam keep the step count on the parameter's device.
                            value = value.to(device=tensor.device, dtype=torch.float32)
                    optimizer.state[tensor][key] = value
    store.after_load()
