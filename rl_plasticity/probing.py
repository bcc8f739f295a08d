"""Run the probe functions on an SB3 agent: the one place that knows how to get tensors out of SB3 models.

:func:`probe_batch` takes an agent, a batch (a fixed probe set or a training batch) and probe names, fills
:class:`~rl_plasticity.probes.ProbeInputs` from the agent (its probed network, value-head features,
activations, neural-collapse classes, loss, Gram inputs, value network) and runs the registered probes on
them, which return flat ``"<tag>/<layer>"`` values plus tensors for histograms. The probes themselves
(:mod:`rl_plasticity.probes`, one module each, registered there) are pure and know nothing of SB3.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch as th
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.preprocessing import preprocess_obs
from torch import nn

from agents import PlasticDQN
from agents.dqn import TD_LOSSES
from rl_plasticity.probes import ProbeInputs, ProbeResult, loss_curvature
from rl_plasticity.probes.registry import run_probes
from rl_plasticity.recording import activation_outputs

__all__ = ["ProbeResult", "greedy_labels", "probe_batch", "probed_module"]


def probed_module(agent: BaseAlgorithm) -> nn.Module:
    """The network the probes look at: DQN's online Q-network, PPO's whole actor-critic policy."""
    return agent.q_net if isinstance(agent, PlasticDQN) else agent.policy


class _ValueOutput(nn.Module):
    """PPO's value path (critic torso and value head) as a module of its own, so the trainability probe
    can copy and fit it. The policy itself cannot be deep-copied: it caches its last action distribution,
    graph included."""

    def __init__(self, policy: Any) -> None:
        super().__init__()
        self.observation_space = policy.observation_space
        self.normalize_images = policy.normalize_images
        self.features_extractor = policy.vf_features_extractor
        self.mlp_extractor = policy.mlp_extractor
        self.value_net = policy.value_net

    def forward(self, obs: th.Tensor) -> th.Tensor:
        features = self.features_extractor(preprocess_obs(obs, self.observation_space, self.normalize_images))
        return self.value_net(self.mlp_extractor.forward_critic(features))


def greedy_labels(agent: BaseAlgorithm, obs: th.Tensor, features: th.Tensor) -> tuple[th.Tensor, th.Tensor | None]:
    """Neural-collapse classes: DQN's greedy action (with the Q head as classifier), PPO's actor mode."""
    if isinstance(agent, PlasticDQN):
        head = agent.value_head
        return head(features).argmax(dim=1), head.weight
    return agent.policy.get_distribution(obs).mode(), None



def td_loss_fn(agent: PlasticDQN) -> Callable[[th.Tensor, th.Tensor], th.Tensor]:
    """The per-sample TD loss ``agent.training_loss`` averages: ``TD_LOSSES[agent.td_loss]`` ."""
    return TD_LOSSES[agent.td_loss]


def _gram_inputs(agent: BaseAlgorithm, batch: NamedTuple) -> tuple[Any, Any, th.Tensor | None]:
    """For the Gram probe: inputs, the scalar output per sample, and the loss curvature D (docs/reference/metrics.md).

    DQN: ``f_i = Q(s_i, a_i)`` with ``a_i`` the *stored* action of transition ``i``, and ``D_i = l''(f_i)`` of
    the agent's own per-sample TD loss (:func:`td_loss_fn`) at ``f_i - y_i``, ``y_i`` the TD target of the
    same transition (:meth:`PlasticDQN.compute_target`, a constant). Output and residual belong to the same
    action, so ``K_L = D^1/2 J J^T D^1/2`` has the non-zero spectrum of ``J^T D J``, the Gauss-Newton matrix
    of the TD loss the agent trains on (``n`` times that of the batch mean). (docs/reference/metrics.md names the greedy
    action; its Q-value is in no TD loss unless it is the stored one, so it would pair one output with
    another output's residual.) PPO: ``f_i = V(s_i)`` and ``D = 1`` (the value loss is MSE).
    """
    if isinstance(agent, PlasticDQN):
        inputs = (batch.observations, batch.actions.long().reshape(-1, 1))

        def q_taken(model: nn.Module, x: tuple[th.Tensor, th.Tensor]) -> th.Tensor:
            return th.gather(model(x[0]), 1, x[1]).squeeze(1)

        with th.no_grad():
            q = q_taken(agent.q_net, inputs)
            targets = agent.compute_target(batch).squeeze(1)
        return inputs, q_taken, loss_curvature(td_loss_fn(agent), q, targets)

    def value(model: nn.Module, obs: th.Tensor) -> th.Tensor:
        return model.predict_values(obs).squeeze(-1)

    return batch.observations, value, None


def probe_batch(
    agent: BaseAlgorithm, batch: NamedTuple, probes: Sequence[str], settings: Mapping[str, Any] | None = None
) -> ProbeResult:
    """The named probes on one batch, in registry order (:data:`~rl_plasticity.probes.PROBES`).

    :param agent: a PlasticDQN or PlasticPPO.
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
        module=module, observations=obs, features=features, activations=acts, labels=labels, classifier=classifier,
        batch=batch, loss=lambda b: agent.training_loss(b)[0], gram_inputs=gram_inputs,
        value_model=lambda: module if isinstance(agent, PlasticDQN) else _ValueOutput(module),
    )
    return run_probes(inputs, probes, settings)
