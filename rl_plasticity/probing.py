"""Run the probe functions on an SB3 agent: the one place that knows how to get tensors out of SB3 models.

:func:`probe_batch` takes an agent, a batch (a fixed probe set or a training batch) and probe names, fills
:class:`~rl_plasticity.probes.ProbeInputs` from the agent (its probed network, value-head features,
activations, neural-collapse classes, loss, Gram inputs, value network) and runs the registered probes on
them, which return flat ``"<tag>/<layer>"`` values plus tensors for histograms. The probes themselves
(:mod:`rl_plasticity.probes`, one module each, registered there) are pure and know nothing of SB3.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch as th
from torch import nn

from agents.hooks import PlasticAgent
from rl_plasticity.probes import ProbeInputs, ProbeResult, loss_curvature
from rl_plasticity.probes.registry import run_probes
from rl_plasticity.recording import activation_outputs

__all__ = ["ProbeResult", "greedy_labels", "probe_batch", "probed_module"]


def probed_module(agent: PlasticAgent) -> nn.Module:
    """The network the probes look at: the agent's online network (DQN's Q-network, PPO's actor-critic policy)."""
    return agent.online_network()


def greedy_labels(agent: PlasticAgent, obs: th.Tensor, features: th.Tensor) -> tuple[th.Tensor, th.Tensor | None]:
    """Neural-collapse classes and classifier (:meth:`PlasticAgent.nc_classes`): DQN's greedy action with the Q head
    as classifier, PPO's actor mode."""
    return agent.nc_classes(obs, features)


def _gram_inputs(agent: PlasticAgent, batch: NamedTuple) -> tuple[Any, Any, th.Tensor | None]:
    """For the Gram probe: inputs, the scalar output per sample, and the loss curvature D (docs/reference/metrics.md)
    of the agent's :meth:`~PlasticAgent.gram_inputs` (``None``: D = 1)."""
    g = agent.gram_inputs(batch)
    curvature = None if g.loss is None else loss_curvature(g.loss, g.outputs, g.targets)
    return g.inputs, g.output, curvature


def probe_batch(
    agent: PlasticAgent, batch: NamedTuple, probes: Sequence[str], settings: Mapping[str, Any] | None = None
) -> ProbeResult:
    """The named probes on one batch, in registry order (:data:`~rl_plasticity.probes.PROBES`).

    :param agent: the agent (:class:`~agents.hooks.PlasticAgent`).
    :param batch: SB3 replay or rollout samples (what the agent's ``training_loss`` takes).
    :param probes: probe names, light or heavy (``rlp list probes``); ``weights`` is the monitor's own, skipped.
    :param settings: the probes' parameters by name, e.g. ``dormant_tau``, ``hessian_order`` (the monitor
        config's keys); a missing one keeps the probe's published default.
    """
    module = probed_module(agent)
    obs = batch.observations
    with th.no_grad(), activation_outputs(module) as acts:
        features = agent.value_features(obs)
        labels, classifier = greedy_labels(agent, obs, features)

    def gram_inputs(n: int) -> tuple[Any, Any, th.Tensor | None]:
        return _gram_inputs(agent, type(batch)(*(x[:n] if isinstance(x, th.Tensor) else x for x in batch)))

    inputs = ProbeInputs(
        module=module,
        observations=obs,
        features=features,
        activations=acts,
        labels=labels,
        classifier=classifier,
        batch=batch,
        loss=lambda b: agent.training_loss(b)[0],
        gram_inputs=gram_inputs,
        value_model=agent.value_model,
    )
    return run_probes(inputs, probes, settings)
