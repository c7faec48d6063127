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

This module runs the two collectives; the files themselves are `resume_files.py` (writes, manifest, commit,
reads), resharding is `reshard.py`, optimizer state `resume_optim.py`.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from typing import Optional

import torch
import torch.distributed as dist

from .checkpoint import _global_rank
from .collective_errors import raise_on_every_rank
from .reshard import layout_to_data, reshard, stored_as_here
from .resume_files import (FORMAT_VERSION, LATEST, CheckpointError, Reader, check_files, commit_directory,
                           resolve_tag, write_file)
from .resume_optim import load_optimizer, optimizer_payload
from .shard import layout_of
from .zero.dp_shards import dp_local_part, gather_dp

logger = logging.getLogger("autotp")


def _all_ranks(value) -> list:
    """Every rank's `value`, in rank order (all_gather_object; just [value] without a process group)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


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
            error = RuntimeError(f"save_checkpoint: cannot create '{partial}': {err}")
    raise_on_every_rank(error)

    sizes, error = {}, None
    try:
        for name, obj in _files_of_this_rank(engine, client_state or {}):
            sizes[name] = write_file(obj, os.path.join(partial, name))
    except Exception as err:  # every rank learns of it below instead of waiting at the next collective
        error = RuntimeError(f"save_checkpoint on rank {_global_rank()} failed writing into '{partial}': {err!r}")
    raise_on_every_rank(error)
    sizes_of_ranks = _all_ranks(sizes)

    error = None
    if _global_rank() == 0:
        try:
            commit_directory(partial, final, {name: size for ranks in sizes_of_ranks for name, size in ranks.items()},
                             tag, save_latest)
        except OSError as err:
            error = RuntimeError(f"save_checkpoint: cannot commit '{final}': {err}")
    raise_on_every_rank(error)
    return final


def _files_of_this_rank(engine, client_state: dict):
    groups, store = engine.groups, engine.store
    tp_rank, dp_rank = groups.tp_rank, groups.dp_rank
    # ZeRO-3: every DP rank takes part in gathering a tensor's DP shards (`gather_dp`, one tensor at a time so
    # the whole TP shard never exists at once); at stages 0-2 it is the tensor itself and only DP rank 0 looks.
    sharded = store.stage == 3
    if dp_rank == 0 or sharded:
        model = {}
        for name, tensor in engine.module.state_dict(keep_vars=True).items():
            value = gather_dp(tensor) if sharded else tensor.detach()
            if dp_rank == 0:
                model[name] = value.cpu()
        if dp_rank == 0:
            yield f"model_tp{tp_rank:02d}.pt", model
    if store.writes_optimizer_file():
        yield f"optim_tp{tp_rank:02d}_dp{dp_rank:02d}.pt", optimizer_payload(engine)
    rng = _rng_state()
    if getattr(engine.module, "autotp_rng", None) is not None:
        rng["tp_dropout"] = engine.module.autotp_rng.state_dict()
    yield f"rng_rank{_global_rank():05d}.pt", rng
    if _global_rank() == 0:
        yield "engine.pt", _engine_payload(engine, client_state)


def _engine_payload(engine, client_state: dict) -> dict:
    layouts = {}
    for name, tensor in engine.module.state_dict(keep_vars=True).items():
        layout, full_shape = layout_of(tensor) or (None, None)
        if layout is not None:
            layouts[name] = dict(layout=layout_to_data(layout), full_shape=list(full_shape))
    return dict(
        format=FORMAT_VERSION, tp_size=engine.groups.tp_size, dp_size=engine.groups.dp_size,
        zero_stage=engine.store.stage, global_steps=engine.global_steps, micro_steps=engine.micro_steps,
        skipped_steps=engine.skipped_steps, layouts=layouts,
        loss_scaler=engine.loss_scaler.state_dict() if engine.loss_scaler else None,
        lr_scheduler=engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None,
        client_state=client_state)


# ---- load ------------------------------------------------------------------------------------------------

def load_checkpoint(engine, load_dir: str, tag: Optional[str] = None, load_module_strict: bool = True,
                    load_optimizer_states: bool = True, load_lr_scheduler_states: bool = True,
                    load_module_only: bool = False):
    """Collective over all ranks. Returns (checkpoint path, client_state), or (None, None) when `load_dir`
    has no `latest` and no tag is given (nothing saved yet), as DeepSpeed does."""
    tag = _same_everywhere(resolve_tag(load_dir, tag), "checkpoint tag")
    if tag is None:
        logger.warning("autotp: no '%s' file in '%s'; nothing loaded", LATEST, load_dir)
        return None, None
    path = os.path.join(load_dir, tag)
    error, meta = None, None
    try:
        reader = Reader(path, check_files(path))
        meta = reader("engine.pt")
        _load_module(engine, reader, meta, load_module_strict)
        if load_optimizer_states and not load_module_only:
            load_optimizer(engine, reader, meta)
        else:
            engine.store.load_masters_from_model()
    except (CheckpointError, KeyError, ValueError, RuntimeError) as err:
        # A CheckpointError stays one on every rank (README: "fails on every rank with a CheckpointError").
        error = err if isinstance(err, CheckpointError) else RuntimeError(f"loading checkpoint '{path}': {err!r}")
    raise_on_every_rank(error)

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


def _load_module(engine, reader: Reader, meta: dict, strict: bool) -> None:
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
            if stored_as_here(name, meta, tensor, new_tp):
                value = own[name]
            else:
                value = reshard(name, meta, tensor, engine.groups.tp_rank,
                                 lambda r: reader(f"model_tp{r:02d}.pt")[name])
            if tuple(value.shape) != tuple(tensor.shape):
                raise CheckpointError(f"checkpoint '{reader.path}': module key '{name}' has shape "
                                      f"{tuple(value.shape)}, this model's shard is {tuple(tensor.shape)}")
            target, value = dp_local_part(tensor, value)  # ZeRO-3: this DP rank's rows of the TP shard
            target.copy_(value)

