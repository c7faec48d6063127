"""Tied weights (an input embedding and LM head sharing one matrix) stay tied: split the same way in every module
that holds them, or the plan is refused."""

from __future__ import annotations

import logging
import re

import torch.nn as nn

from .plan import Action, ModelDims, PlanError, Rule, Target, layout_for

logger = logging.getLogger("autotp")


def weight_owners(model: nn.Module) -> dict[int, list[str]]:
    """id(weight parameter) -> names of every module holding it as its `weight` (tied weights: several)."""
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        weight = module._parameters.get("weight")
        if weight is not None and name not in owners.get(id(weight), []):
            owners.setdefault(id(weight), []).append(name)
    return owners


def keep_ties(model: nn.Module, actions: dict[str, Action], targets: list[Target], dims: ModelDims, tp: int):
    """A weight shared by several modules (tied input embedding and LM head) must be split the same way in all of
    them. When the plan splits one side only, the vocabulary split is extended to the other (a head split over
    the vocabulary with its output gathered, an embedding split over the vocabulary: both exact); any other
    mismatch raises. Before, the head became a (vocab/tp, hidden) shard beside a whole embedding and the pair
    silently came apart after the first step."""
    by_name = {target.name: target for target in targets}

    def split(name):
        action = actions.get(name)
        return action is not None and action.layout is not None

    for names in weight_owners(model).values():
        if len(names) < 2 or all(split(n) for n in names) or not any(split(n) for n in names):
            continue
        done = [n for n in names if split(n)]
        for name in (n for n in names if not split(n)):
            target, other = by_name.get(name), actions[done[0]]
            wanted = {"embedding": "vocab", "linear": "column"}.get(target.kind if target else "")
            extended = None
            if wanted and other.style in ("vocab", "column") and other.weight_dim == 0:
                rule = Rule(re.escape(name), wanted, {}, f"tied to {done[0]}", "full")
                layout, weight_dim, replicas = layout_for(target, rule, dims, tp)
                if layout == other.layout:
                    extended = Action(target, wanted, rule.source, layout, weight_dim, gather_output=wanted == "column",
                                      kv_replicas=replicas)
            if extended is None:
                raise PlanError(f"layers {names} share one weight (tied), but the plan splits '{done[0]}' "
                                f"({other.style}, {other.source}) and leaves '{name}' whole; split both the same way "
                                "(e.g. both over the vocabulary: vocab_parallel_loss) or neither, or untie them "
                                "(config.tie_word_embeddings = False)")
            actions[name] = extended
            logger.info("autotp: '%s' shares its weight with '%s' and is split the same way (%s)", name, done[0],
                        extended.style)
