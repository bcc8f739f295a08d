"""The hook protocol between the agents and the interventions.

An *intervention* is anything that wants to act on an agent during training: add a loss term,
reset layers after an update, react to a task switch. Agents call the hooks below at fixed points
inside ``train()`` and ``collect_rollouts()``; interventions never need more of the agent than its
named accessors (``value_head``, ``value_features``, ``policy.optimizer`` and, for DQN,
``q_net_target`` and ``sample_replay_observations``).

Order of calls, per gradient step::

    loss     = <the algorithm's own loss on the batch>
    features = <input of the value head on the batch, with its graph>
    terms    = {k: v for iv in interventions for k, v in iv.loss_terms(agent, batch, features, loss)}
    loss     = loss + sum(terms)
    backward
    values   = {k: v for iv in interventions for k, v in iv.gradient_terms(agent)}   # may add to .grad
    clip, optimizer.step()
    iv.on_update(agent, agent.num_gradient_steps)      # for every intervention

and, right before the logs are written (SB3's ``dump_logs``, a probe round, a task switch),
``iv.logged_values(agent)`` for values too costly to compute at every step.

and, once per task switch (in the step that crosses the boundary, before the transition is stored
or trained on), ``iv.on_task_switch(agent, switch)``. PPO also calls ``iv.on_epoch_start(agent, epoch)``
before each epoch over its rollout (``agent.rollout_buffer``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import torch as th

if TYPE_CHECKING:
    from stable_baselines3.common.base_class import BaseAlgorithm


@dataclass(frozen=True)
class TaskSwitch:
    """What an agent knows about a task switch when it sees one.

    :param num_timesteps: the agent's ``num_timesteps`` at the step that crossed the boundary
        (counted over all parallel environments, like SB3 does).
    :param from_task: id of the task that just ended.
    :param to_task: id of the task that starts with the next episode.
    :param from_name: name of the task that just ended.
    """

    num_timesteps: int
    from_task: int
    to_task: int
    from_name: str


class Intervention:
    """Base class of every intervention. Each hook is a no-op, so a subclass overrides only what it needs.

    A list of bare ``Intervention()`` objects is valid and must leave training unchanged.
    """

    #: Short name, used for logging (``train/<name>/<term>``). Subclasses set their own.
    name: str = "noop"

    def attach(self, agent: BaseAlgorithm) -> None:
        """Called once when the agent has built its networks (and again if it rebuilds them)."""

    def loss_terms(
        self, agent: BaseAlgorithm, batch: NamedTuple, features: th.Tensor, loss: th.Tensor
    ) -> dict[str, th.Tensor]:
        """Extra scalar loss terms for this gradient step; they are added to the algorithm's loss.

        :param agent: the agent being trained.
        :param batch: SB3's replay (DQN) or rollout (PPO) minibatch.
        :param features: the input of the value head on ``batch.observations``, shape
            ``(batch_size, width)``, still attached to the graph of the loss.
        :param loss: the algorithm's own loss on ``batch`` (TD or PPO loss), with its graph. Use
            ``torch.autograd.grad(..., retain_graph=True)`` if a term needs its gradients; never call
            ``backward()`` on it.
        :return: term name -> scalar tensor. Each is logged as ``train/<name>/<term>``.
        """
        return {}

    def gradient_terms(self, agent: BaseAlgorithm) -> dict[str, th.Tensor]:
        """Penalties whose gradient is known in closed form, added straight to the parameters' ``.grad``.

        Called after ``backward()`` and before gradient clipping, so the result is the same as adding the
        penalty to the loss (it is clipped and goes through the optimizer alike), without building and
        back-propagating a graph for it: an intervention adds ``dP/dtheta`` to each ``theta.grad`` (setting
        it where it is ``None``) and returns the penalties' values, or ``{}`` when computing them at every
        step would cost too much (the L2 penalties report theirs through :meth:`logged_values`).

        :return: term name -> detached scalar tensor (the value of the penalty whose gradient was added),
            logged as ``train/<name>/<term>`` like a loss term.
        """
        return {}

    def logged_values(self, agent: BaseAlgorithm) -> dict[str, th.Tensor]:
        """Values computed only when the logs are written, for the weights at that moment.

        For quantities that would cost as much as the intervention itself if computed at every gradient
        step, such as the value of an L2 penalty whose gradient :meth:`gradient_terms` adds. Called right
        before each logger dump once training has started (SB3's ``dump_logs``, and the dumps of a probe
        round or a task switch).

        :return: name -> detached scalar tensor, logged as ``train/<name>/<key>`` and
            ``interventions/<name>/<key>``, and checked to be finite like a loss term.
        """
        return {}

    def on_epoch_start(self, agent: BaseAlgorithm, epoch: int) -> None:
        """PPO only: called before each epoch over the rollout buffer (``agent.rollout_buffer``)."""

    def on_update(self, agent: BaseAlgorithm, num_gradient_steps: int) -> None:
        """Called right after each optimizer step. ``num_gradient_steps`` counts steps so far (from 1)."""

    def on_task_switch(self, agent: BaseAlgorithm, switch: TaskSwitch) -> None:
        """Called once when the environment sequence moves to the next task."""

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume this intervention exactly (counters, saved weights, ...)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
