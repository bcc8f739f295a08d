"""The hook protocol between the agents and the interventions.

An *intervention* is anything that wants to act on an agent during training: add a loss term,
reset layers after an update, react to a task switch. Agents call the hooks below at fixed points
inside ``train()`` and ``collect_rollouts()``; interventions and the monitor need no more of the agent than
:class:`PlasticAgent`, the protocol both agents implement, and never branch on the agent's class: what differs
between DQN and PPO is behind the protocol's methods (``uses_replay`` says which kind of batch and buffer).

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

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple, Protocol

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.logger import Logger
from torch import nn


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


class GramInputs(NamedTuple):
    """What the Gram (empirical NTK) probe differentiates: ``output(model, inputs)`` is one scalar per sample,
    and the loss curvature ``D_i = l''(f_i)`` of the per-sample loss ``loss(f, y)`` at ``outputs`` and
    ``targets`` weighs it (docs/reference/metrics.md); ``loss is None`` means ``D = 1`` (a mean squared error).
    """

    inputs: Any
    output: Callable[[nn.Module, Any], th.Tensor]
    loss: Callable[[th.Tensor, th.Tensor], th.Tensor] | None = None
    outputs: th.Tensor | None = None
    targets: th.Tensor | None = None


class PlasticAgent(Protocol):
    """What interventions, probes and the monitor may use of an agent (``PlasticDQN`` and ``PlasticPPO`` implement
    it; see their docstrings for each algorithm's answer). Everything else of the agent is private to it."""

    # SB3's own attributes.
    device: th.device
    seed: int | None
    num_timesteps: int
    action_space: spaces.Space
    batch_size: int
    max_grad_norm: float
    #: The interventions the agent calls (the monitor appends its observer).
    interventions: list[Intervention]
    #: Optimizer steps taken so far (every step, unlike SB3's ``_n_updates``).
    num_gradient_steps: int
    #: Total gradient norm of the last step before clipping.
    last_grad_norm: th.Tensor | None
    #: The config's algorithm name (``"dqn"``, ``"ppo"``), for published per-algorithm defaults.
    algo_name: ClassVar[str]
    #: Replay buffer of single env steps (DQN), not epochs over a rollout (PPO).
    uses_replay: ClassVar[bool]

    @property
    def value_head(self) -> nn.Linear:
        """The last linear layer of the value estimate."""
        ...

    @property
    def logger(self) -> Logger:
        """SB3's logger (interventions record ``interventions/<name>/<key>`` there)."""
        ...

    @property
    def optimizer(self) -> th.optim.Optimizer:
        """The optimizer of :meth:`online_network`."""
        ...

    def value_features(self, obs: th.Tensor) -> th.Tensor:
        """The input of :attr:`value_head` on ``obs``, shape ``(batch_size, width)``, with its graph."""
        ...

    def online_network(self) -> nn.Module:
        """The network the optimizer trains and the probes look at."""
        ...

    def sample_batch(self, batch_size: int) -> Any:
        """A fresh batch of :meth:`training_loss`'s type from the agent's buffer (NumPy's global RNG)."""
        ...

    def value_model(self) -> nn.Module:
        """A deep-copyable module from observations to the value estimate."""
        ...

    def head_layers(self) -> list[nn.Module]:
        """The trainable output layers."""
        ...

    def mlp_heads(self) -> dict[str, nn.Module]:
        """Each head after the shared encoder, by name."""
        ...

    def set_mlp_head(self, name: str, module: nn.Module) -> None:
        """Make ``module`` the head ``name`` of :meth:`mlp_heads`."""
        ...

    def init_layer(self, layer: nn.Module) -> None:
        """Re-initialise ``layer`` with the algorithm's own initialiser."""
        ...

    def parametrized_layers(self) -> list[tuple[str, nn.Module]]:
        """Every linear and convolutional layer of :meth:`online_network`, by module path."""
        ...

    def sync_target(self, layers: Sequence[nn.Module]) -> None:
        """Copy ``layers`` into the target network, where there is one."""
        ...

    def training_loss(self, batch: Any) -> tuple[th.Tensor, th.Tensor]:
        """The algorithm's loss on ``batch`` and the value-head features, with their graph."""
        ...

    def nc_classes(self, obs: th.Tensor, features: th.Tensor) -> tuple[th.Tensor, th.Tensor | None]:
        """Neural-collapse classes of ``obs`` and the classifier weights, if any."""
        ...

    def gram_inputs(self, batch: Any) -> GramInputs:
        """What the Gram probe differentiates on ``batch``."""
        ...

    def forward_all(self, batch: Any) -> None:
        """Every branch of the online network on ``batch.observations``, through its own modules."""
        ...

    def hidden_forward(self, obs: th.Tensor) -> None:
        """Every hidden layer of the online network once on ``obs``."""
        ...

    def sample_replay_observations(self, batch_size: int, rng: np.random.Generator) -> th.Tensor:
        """Replay observations drawn with ``rng`` (only where :attr:`uses_replay`)."""
        ...


class Intervention:
    """Base class of every intervention. Each hook is a no-op, so a subclass overrides only what it needs.

    A list of bare ``Intervention()`` objects is valid and must leave training unchanged.
    """

    #: Short name, used for logging (``train/<name>/<term>``). Subclasses set their own.
    name: str = "noop"

    def attach(self, agent: PlasticAgent) -> None:
        """Called once when the agent has built its networks (and again if it rebuilds them)."""

    def loss_terms(
        self, agent: PlasticAgent, batch: NamedTuple, features: th.Tensor, loss: th.Tensor
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

    def gradient_terms(self, agent: PlasticAgent) -> dict[str, th.Tensor]:
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

    def logged_values(self, agent: PlasticAgent) -> dict[str, th.Tensor]:
        """Values computed only when the logs are written, for the weights at that moment.

        For quantities that would cost as much as the intervention itself if computed at every gradient
        step, such as the value of an L2 penalty whose gradient :meth:`gradient_terms` adds. Called right
        before each logger dump once training has started (SB3's ``dump_logs``, and the dumps of a probe
        round or a task switch).

        :return: name -> detached scalar tensor, logged as ``train/<name>/<key>`` and
            ``interventions/<name>/<key>``, and checked to be finite like a loss term.
        """
        return {}

    def on_epoch_start(self, agent: PlasticAgent, epoch: int) -> None:
        """PPO only: called before each epoch over the rollout buffer (``agent.rollout_buffer``)."""

    def on_update(self, agent: PlasticAgent, num_gradient_steps: int) -> None:
        """Called right after each optimizer step. ``num_gradient_steps`` counts steps so far (from 1)."""

    def on_task_switch(self, agent: PlasticAgent, switch: TaskSwitch) -> None:
        """Called once when the environment sequence moves to the next task."""

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume this intervention exactly (counters, saved weights, ...)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
