"""PlasticDQN: SB3's DQN with a Double-DQN option and the intervention hooks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch as th
from stable_baselines3 import DQN
from stable_baselines3.common.buffers import ReplayBufferSamples
from torch import nn
from torch.nn import functional as F

from agents.hooks import Intervention
from agents.networks import split_output_layer, trainable_output_layer
from agents.plastic import PlasticMixin


class PlasticDQN(PlasticMixin, DQN):
    """Deep Q-Network (SB3's :class:`~stable_baselines3.DQN`) with plasticity hooks.

    Takes every argument :class:`~stable_baselines3.DQN` takes, plus:

    :param interventions: interventions called from inside :meth:`train` (see :mod:`agents.hooks`).
        Empty by default, in which case training is bit-for-bit stock SB3.
    :param double_q: use the Double-DQN target (van Hasselt et al., 2016): the online network picks the
        next action, the target network evaluates it. This is the only difference from stock DQN.
    """

    def __init__(
        self,
        *args: Any,
        interventions: Sequence[Intervention] | None = None,
        double_q: bool = False,
        **kwargs: Any,
    ) -> None:
        self._init_plastic(interventions)
        self.double_q = double_q
        super().__init__(*args, **kwargs)

    @property
    def value_head(self) -> nn.Linear:
        """The last linear layer of the online Q-network; its input is :meth:`value_features`.

        An ``nn.Linear``, or a module that acts as one and gives its ``weight`` and ``bias``: after plasticity
        injection, the linear map from the three heads' hidden layers, side by side, to the Q-values (see
        :func:`agents.networks.split_output_layer`).
        """
        head = split_output_layer(self.q_net.q_net)[1]
        if not (isinstance(head, nn.Linear) or (hasattr(head, "weight") and hasattr(head, "bias"))):
            raise TypeError(f"the Q-network must end in a linear layer, got {type(head).__name__}")
        return head

    def online_network(self) -> nn.Module:
        """The online Q-network (``q_net``); ``q_net_target`` mirrors it module for module."""
        return self.q_net

    def head_layers(self) -> list[nn.Module]:
        """The trainable output layer of the Q head."""
        return [trainable_output_layer(self.q_net.q_net)]

    def mlp_heads(self) -> dict[str, nn.Module]:
        """The Q head after the encoder (the MLP ``q_net.q_net``), under its path in :meth:`online_network`."""
        return {"q_net": self.q_net.q_net}

    def set_mlp_head(self, name: str, module: nn.Module) -> None:
        """Put ``module`` in place of the Q head (``name`` as in :meth:`mlp_heads`) of the online network."""
        if name != "q_net":
            raise KeyError(f"PlasticDQN has one head, 'q_net', got {name!r}")
        self.q_net.q_net = module

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
        hidden, _ = split_output_layer(self.q_net.q_net)
        return hidden(self.q_net.extract_features(obs, self.q_net.features_extractor))

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
        """The TD loss (Huber, as SB3) on ``batch``, and the Q head's input features, both with their graph.

        ``train()`` uses exactly this; the curvature probes use it too, so they see the agent's own loss.
        """
        target_q_values = self.compute_target(batch)
        # Split the forward pass at the head so the interventions see its input, with its graph.
        features = self.value_features(batch.observations)
        current_q_values = th.gather(self.value_head(features), dim=1, index=batch.actions.long())
        return F.smooth_l1_loss(current_q_values, target_q_values), features

    def train(self, gradient_steps: int, batch_size: int = 100) -> None:
        """SB3's ``DQN.train`` with the feature, loss-term and update hooks (see :mod:`agents.hooks`)."""
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
