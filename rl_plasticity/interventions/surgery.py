"""Helpers that re-initialise parts of a network and the matching optimizer state.

Shared by the resets, shrink-and-perturb, ReDo and continual backprop, so that "re-initialise with the
layer's own initialiser" and "forget Adam's moments of what was touched" mean one thing everywhere.
"""

from __future__ import annotations

import torch as th
from torch import nn

from agents.hooks import PlasticAgent


def fresh_parameters(agent: PlasticAgent, layer: nn.Module) -> dict[str, th.Tensor]:
    """A new initialisation of ``layer`` by the agent's own initialiser, leaving ``layer`` as it was.

    The layer itself is re-initialised and then restored (not a copy of it): PPO's initialiser picks the
    gain by which part of the policy the layer belongs to, which a copy is not.
    """
    saved = {name: p.detach().clone() for name, p in layer.named_parameters()}
    agent.init_layer(layer)
    fresh = {name: p.detach().clone() for name, p in layer.named_parameters()}
    with th.no_grad():
        for name, p in layer.named_parameters():
            p.copy_(saved[name])
    return fresh


def forget_optimizer_state(optimizer: th.optim.Optimizer, params: list[nn.Parameter]) -> None:
    """Drop the optimizer state of ``params``: Adam's moments and step count start afresh for them."""
    for p in params:
        optimizer.state.pop(p, None)


def zero_optimizer_entries(optimizer: th.optim.Optimizer, param: nn.Parameter, mask: th.Tensor) -> None:
    """Zero the per-entry optimizer state (e.g. Adam's ``exp_avg`` and ``exp_avg_sq``) where ``mask`` is true.

    The step count is shared by the whole tensor, so it is left alone.
    """
    state = optimizer.state.get(param)
    if not state:
        return
    for value in state.values():
        if isinstance(value, th.Tensor) and value.shape == param.shape:
            value[mask] = 0.0
