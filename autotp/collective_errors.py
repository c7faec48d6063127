"""Agree on errors across ranks, so a failure on one rank is raised on every rank instead of leaving the others
waiting in the next collective.

Each rank passes its own exception, or None; one `all_gather_object` over the group tells every rank all of
them, and every rank raises the first one in rank order: the same type and message everywhere. The rank that
raised it first re-raises its own exception object (its traceback intact); the others raise a new one of that
type. Call it at a point every rank of the group reaches, whatever happened locally: it is a collective.
"""

from __future__ import annotations

import pickle
from typing import Optional

import torch.distributed as dist


def _portable(error: BaseException) -> tuple:
    """(exception class, message), with a class another process cannot unpickle replaced by RuntimeError."""
    kind = type(error)
    try:
        if pickle.loads(pickle.dumps(kind)) is not kind:
            kind = RuntimeError
    except Exception:  # a class defined inside a function, or one pickle cannot name
        kind = RuntimeError
    return kind, str(error)


def _rebuild(kind: type, message: str) -> BaseException:
    try:
        return kind(message)
    except Exception:  # a constructor that does not take one message
        return RuntimeError(message)


def first_error(error: Optional[BaseException], group=None) -> Optional[BaseException]:
    """The first rank's error in rank order over `group` (default: all ranks), on every rank of it; None when no
    rank has one. Without a process group (or with one rank) it is `error` itself."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return error
    reports = [None] * dist.get_world_size(group)
    dist.all_gather_object(reports, None if error is None else _portable(error), group=group)
    first = next((index for index, report in enumerate(reports) if report is not None), None)
    if first is None:
        return None
    if first == dist.get_rank(group):
        return error
    return _rebuild(*reports[first])


def raise_on_every_rank(error: Optional[BaseException], group=None) -> None:
    """Raise the first rank's error (same type and message) on every rank of `group` if any rank has one."""
    agreed = first_error(error, group)
    if agreed is not None:
        raise agreed
