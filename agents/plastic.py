"""What PlasticDQN and PlasticPPO share: the intervention list, its hooks and task-switch detection."""

from __future__ import annotations

from abc import abstractmethod
from collections import defaultdict
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch as th
from torch import nn

from agents.hooks import Intervention, TaskSwitch


class PlasticMixin:
    """Mixed in before an SB3 algorithm class. It adds, and only adds, the hook calls.

    With an empty intervention list every computation is the parent's, so parameters match stock SB3
    bit for bit (see ``tests/test_agents.py``).
    """

    interventions: list[Intervention]
    #: Optimizer steps taken so far. Unlike SB3's ``_n_updates`` (epochs for PPO), this counts every step.
    num_gradient_steps: int
    #: Total gradient norm of the last step before clipping (what ``clip_grad_norm_`` returns).
    last_grad_norm: th.Tensor | None

    def _init_plastic(self, interventions: Sequence[Intervention] | None) -> None:
        interventions = list(interventions or [])
        for iv in interventions:
            if not isinstance(iv, Intervention):
                raise TypeError(f"interventions must be Intervention instances, got {type(iv).__name__}")
        self.interventions = interventions
        self.num_gradient_steps = 0
        self.last_grad_norm = None
        self._term_logs: dict[str, list[float]] = defaultdict(list)

    def _setup_model(self) -> None:
        super()._setup_model()  # type: ignore[misc]
        for iv in self.interventions:
            iv.attach(self)  # type: ignore[arg-type]

    def _excluded_save_params(self) -> list[str]:
        # Interventions carry their own state_dict(); the SB3 zip holds the algorithm only.
        return super()._excluded_save_params() + ["interventions", "_term_logs"]  # type: ignore[misc]

    # -- accessors the interventions and the monitor use ------------------------------------------
    # SB3's BaseAlgorithm is an ABC, so these stay abstract until each algorithm defines them.
    @property
    @abstractmethod
    def value_head(self) -> nn.Linear:
        """The last linear layer of the value estimate (DQN's Q head, PPO's value head)."""

    @abstractmethod
    def value_features(self, obs: th.Tensor) -> th.Tensor:
        """The input of :attr:`value_head` for a batch of observations (as the buffers store them)."""

    @abstractmethod
    def online_network(self) -> nn.Module:
        """The network trained by the optimizer (DQN: the online Q-network; PPO: the actor-critic policy)."""

    @abstractmethod
    def head_layers(self) -> list[nn.Module]:
        """The output layers (DQN: the Q head; PPO: the action and value heads)."""

    @abstractmethod
    def init_layer(self, layer: nn.Module) -> None:
        """Re-initialise ``layer`` in place with the initialiser the algorithm built it with."""

    @property
    def optimizer(self) -> th.optim.Optimizer:
        """The optimizer of the online network (SB3's ``policy.optimizer``)."""
        return self.policy.optimizer  # type: ignore[attr-defined]

    def parametrized_layers(self) -> list[tuple[str, nn.Module]]:
        """Every ``nn.Linear`` and ``nn.Conv2d`` of :meth:`online_network`, by module path, input to output."""
        return [(name, m) for name, m in self.online_network().named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]

    def sync_target(self, layers: Sequence[nn.Module]) -> None:
        """Copy ``layers`` of the online network into the target network, where there is one (DQN)."""

    # -- hook calls -------------------------------------------------------------------------------
    def _intervention_loss(self, batch: NamedTuple, features: th.Tensor, loss: th.Tensor) -> th.Tensor | None:
        """Sum of every intervention's loss terms for this batch, or ``None`` if there are none."""
        total: th.Tensor | None = None
        for iv in self.interventions:
            for key, term in iv.loss_terms(self, batch, features, loss).items():  # type: ignore[arg-type]
                if term.dim() != 0:
                    raise ValueError(f"loss term {iv.name}/{key} must be a scalar, got shape {tuple(term.shape)}")
                self._term_logs[f"{iv.name}/{key}"].append(term.item())
                total = term if total is None else total + term
        return total

    def _before_epoch(self, epoch: int) -> None:
        for iv in self.interventions:
            iv.on_epoch_start(self, epoch)  # type: ignore[arg-type]

    def _after_gradient_step(self) -> None:
        self.num_gradient_steps += 1
        for iv in self.interventions:
            iv.on_update(self, self.num_gradient_steps)  # type: ignore[arg-type]

    def _record_terms(self) -> None:
        # Each term shows with the losses (train/) and with what its intervention did (interventions/).
        for key, values in self._term_logs.items():
            mean = float(np.mean(values))
            self.logger.record(f"train/{key}", mean)  # type: ignore[attr-defined]
            self.logger.record(f"interventions/{key}", mean)  # type: ignore[attr-defined]
        self._term_logs.clear()

    def _update_info_buffer(self, infos: list[dict[str, Any]], dones: np.ndarray | None = None) -> None:
        # SB3 calls this after every env step, before storing or training on the transition.
        super()._update_info_buffer(infos, dones)  # type: ignore[misc]
        for info in infos:
            if info.get("task_switch"):
                # All parallel copies switch on the same step: notify once.
                switch = TaskSwitch(
                    num_timesteps=int(self.num_timesteps),  # type: ignore[attr-defined]
                    from_task=int(info["task_id"]),
                    to_task=int(info["next_task_id"]),
                    from_name=str(info.get("task_name", "")),
                )
                for iv in self.interventions:
                    iv.on_task_switch(self, switch)  # type: ignore[arg-type]
                break
