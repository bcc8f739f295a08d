"""PlasticDQN: SB3's DQN with a Double-DQN option and the intervention hooks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch as th
from stable_baselines3 import DQN
from stable_baselines3.common.buffers import ReplayBufferSamples
from torch import nn

from agents import fast_dqn
from agents.hooks import Intervention
from agents.plastic import PlasticMixin


class PlasticDQN(PlasticMixin, DQN):
    """Deep Q-Network (SB3's :class:`~stable_baselines3.DQN`) with plasticity hooks.

    Takes every argument :class:`~stable_baselines3.DQN` takes, plus:

    :param interventions: interventions called from inside :meth:`train` (see :mod:`agents.hooks`).
        Empty by default, in which case training is bit-for-bit stock SB3.
    :param double_q: use the Double-DQN target (van Hasselt et al., 2016): the online network picks the
        next action, the target network evaluates it. This is the only difference from stock DQN.
    :param td_loss: the TD loss, ``"huber"`` (SB3's ``smooth_l1_loss``) or ``"mse"``.
    :param fast: train and act on the fast path (:mod:`agents.fast_dqn`): the same maths with less
        overhead, equal to the stock path up to float rounding. Off by default: training is then stock SB3.
    """

    def __init__(
        self,
        *args: Any,
        interventions: Sequence[Intervention] | None = None,
        double_q: bool = False,
        td_loss: str = "huber",
        fast: bool = False,
        **kwargs: Any,
    ) -> None:
        if td_loss not in fast_dqn.TD_LOSSES:
            raise ValueError(f"td_loss must be one of {', '.join(fast_dqn.TD_LOSSES)}, got {td_loss!r}")
        self._init_plastic(interventions)
        self.double_q = double_q
        self.td_loss = td_loss
        self.fast = fast
        self._fast_state: fast_dqn.FastState | None = None
        super().__init__(*args, **kwargs)

    def _setup_model(self) -> None:
        super()._setup_model()
        self._fast_state = None
        fast_dqn.set_adam_kernel(self.policy, self.fast)

    def set_parameters(self, *args: Any, **kwargs: Any) -> None:
        """SB3's ``set_parameters``; the optimizer then runs this agent's path's Adam kernel, whichever path saved it."""
        super().set_parameters(*args, **kwargs)
        fast_dqn.set_adam_kernel(self.policy, self.fast)

    def _excluded_save_params(self) -> list[str]:
        return super()._excluded_save_params() + ["_fast_state"]

    @property
    def value_head(self) -> nn.Linear:
        """The last linear layer of the online Q-network.

        An ``nn.Linear``, or a module that acts as one and gives its ``weight`` and ``bias`` (the head after
        plasticity injection, ``rl_plasticity.interventions.plasticity_injection.InjectedLinear``).
        """
        head = self.q_net.q_net[-1]
        if not (isinstance(head, nn.Linear) or (hasattr(head, "weight") and hasattr(head, "bias"))):
            raise TypeError(f"the Q-network must end in a linear layer, got {type(head).__name__}")
        return head

    def online_network(self) -> nn.Module:
        """The online Q-network (``q_net``); ``q_net_target`` mirrors it module for module."""
        return self.q_net

    def head_layers(self) -> list[nn.Module]:
        """The Q head."""
        return [self.value_head]

    def init_layer(self, layer: nn.Module) -> None:
        """PyTorch's default initialiser, which SB3's DQN networks are built with."""
        layer.reset_parameters()

    def sync_target(self, layers: Sequence[nn.Module]) -> None:
        """Copy ``layers`` of ``q_net`` into the same modules of ``q_net_target``."""
        names = {id(m): name for name, m in self.q_net.named_modules()}
        target = dict(self.q_net_target.named_modules())
        with th.no_grad():
            for layer in layers:
                target[names[id(layer)]].load_state_dict(layer.state_dict())

    def value_features(self, obs: th.Tensor) -> th.Tensor:
        """Input of the Q head for ``obs`` (a batch as the replay buffer stores it), with its graph."""
        features = self.q_net.extract_features(obs, self.q_net.features_extractor)
        for layer in list(self.q_net.q_net)[:-1]:  # slicing the Sequential would build a new module
            features = layer(features)
        return features

    def compute_target(self, batch: ReplayBufferSamples, discounts: th.Tensor | float | None = None) -> th.Tensor:
        """TD target ``r + (1 - done) * discount * Q_target(s', a')``, shape ``(batch_size, 1)``.

        ``a'`` is ``argmax Q_target(s')`` (stock DQN) or, with ``double_q``, ``argmax Q_online(s')``.
        ``discounts`` defaults to the batch's own (n-step replay) or ``gamma``.
        """
        if discounts is None:
            discounts = batch.discounts if batch.discounts is not None else self.gamma
        with th.no_grad():
            next_q_target = self.q_net_target(batch.next_observations)
            if self.double_q:
                next_actions = self.q_net(batch.next_observations).argmax(dim=1, keepdim=True)
                next_q_values = th.gather(next_q_target, dim=1, index=next_actions)
            else:
                # Same ops as SB3's DQN.train, so the stock path stays bit-identical.
                next_q_values, _ = next_q_target.max(dim=1)
                next_q_values = next_q_values.reshape(-1, 1)
            return batch.rewards + (1 - batch.dones) * discounts * next_q_values

    def training_loss(self, batch: ReplayBufferSamples) -> tuple[th.Tensor, th.Tensor]:
        """The TD loss (``td_loss``: Huber as SB3, or MSE) on ``batch``, and the Q head's input features, both with their graph.

        ``train()`` uses exactly this; the curvature probes use it too, so they see the agent's own loss.
        """
        target_q_values = self.compute_target(batch)
        # Split the forward pass at the head so the interventions see its input, with its graph.
        features = self.value_features(batch.observations)
        current_q_values = th.gather(self.value_head(features), dim=1, index=batch.actions.long())
        return fast_dqn.TD_LOSSES[self.td_loss](current_q_values, target_q_values), features

    def train(self, gradient_steps: int, batch_size: int = 100) -> None:
        """SB3's ``DQN.train`` with the feature, loss-term and update hooks (see :mod:`agents.hooks`)."""
        if self.fast:
            return fast_dqn.train(self, gradient_steps, batch_size)
        self.policy.set_training_mode(True)
        self._update_learning_rate(self.policy.optimizer)

        losses = []
        for _ in range(gradient_steps):
            replay_data = self.replay_buffer.sample(batch_size, env=self._vec_normalize_env)  # type: ignore[union-attr]
            loss, features = self.training_loss(replay_data)
            losses.append(loss.item())
            self._check_finite("train/loss", losses[-1])
            extra = self._intervention_loss(replay_data, features, loss)
            if extra is not None:
                loss = loss + extra

            self.policy.optimizer.zero_grad()
            loss.backward()
            self._gradient_terms()
            self.last_grad_norm = th.nn.utils.clip_grad_norm_(self.policy.parameters(), self.max_grad_norm)
            self.policy.optimizer.step()
            self._after_gradient_step()
        self._check_grad_norms()

        self._n_updates += gradient_steps

        self.logger.record("train/n_updates", self._n_updates, exclude="tensorboard")
        self.logger.record("train/loss", np.mean(losses))
        self._record_terms()

    def predict(
        self,
        observation: Any,
        state: tuple[np.ndarray, ...] | None = None,
        episode_start: np.ndarray | None = None,
        deterministic: bool = False,
    ) -> tuple[np.ndarray, tuple[np.ndarray, ...] | None]:
        """SB3's ``DQN.predict``; on the fast path, :func:`agents.fast_dqn.predict` where it applies."""
        if self.fast:
            out = fast_dqn.predict(self, observation, deterministic)
            if out is not None:
                return out
        return super().predict(observation, state, episode_start, deterministic)
