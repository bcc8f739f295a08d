"""L2 plus effective-rank ascent (``l2_er``), Prakash et al. 2025."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch as th
from pydantic import Field
from torch import nn

from agents.hooks import PlasticAgent
from rl_plasticity.interventions.base import Params, PlasticityIntervention
from rl_plasticity.interventions.l2 import L2Penalty
from rl_plasticity.interventions.registry import register
from rl_plasticity.probes import effective_rank_differentiable
from rl_plasticity.recording import activation_outputs

#: The published ER step sizes (Prakash et al. 2025), used when ``er_lr`` is left at ``None``.
PUBLISHED_ER_LR = {"dqn": 1e-4, "ppo": 1e-6}


def hidden_activations(module: nn.Module) -> Any:
    """The post-activation values of ``module``'s activation layers during the block, with their graph."""
    return activation_outputs(module, detach=False)


def hidden_forward(agent: PlasticAgent, obs: th.Tensor) -> None:
    """One forward pass through every hidden layer of the online network (outputs discarded):
    :meth:`~agents.hooks.PlasticAgent.hidden_forward` (DQN: the Q-network up to the head's input; PPO: the torsos
    and both MLP branches, each layer once)."""
    agent.hidden_forward(obs)


def rollout_observations(agent: PlasticAgent) -> th.Tensor:
    """All observations of PPO's current rollout, as one batch on the agent's device.

    Read from ``rollout_buffer.observations`` rather than through ``rollout_buffer.get()``, which would
    draw a permutation from NumPy's global RNG and so change the minibatch order PPO draws next. The array
    is ``(n_steps, n_envs, *obs)`` before the buffer's first ``get()`` and ``(n_steps * n_envs, *obs)``
    after; the row order differs but the singular values, hence the effective ranks, do not.
    """
    buffer = agent.rollout_buffer
    if isinstance(buffer.observations, dict):
        raise ValueError("l2_er does not support Dict observation spaces")
    return buffer.to_torch(buffer.observations.reshape(-1, *buffer.obs_shape))


class L2ERParams(Params):
    """Parameters of :class:`L2ER`."""

    coef: float = Field(1e-4, ge=0, description="L2 coefficient: the loss term coef * sum ||theta||^2 / 2.")
    er_lr: float | None = Field(
        None, ge=0, description="Step size of the ER ascent; None = the published one (DQN 1e-4, PPO 1e-6)."
    )
    er_every: int = Field(
        1, gt=0, description="Updates between ER steps (DQN: gradient updates; PPO: epochs over the rollout)."
    )
    include_biases: bool = Field(False, description="Also penalise the biases in the L2 term.")


@register("l2_er")
class L2ER(L2Penalty, PlasticityIntervention):
    """L2 plus effective-rank ascent on the hidden features, as separate SGD steps (Prakash et al. 2025).

    Prakash et al. 2025, "Spectral Collapse Drives Loss of Plasticity in Deep Continual Learning" (L2-ER).

    * **L2**: the loss term ``coef * sum ||theta||^2 / 2`` over the weights, as :class:`~.l2.L2`.
    * **ER ascent**: ``L_ER = -mean_l erank(F_l)``, with ``F_l`` the post-activation batch of hidden layer
      ``l`` (the output of each activation module of the online network, the same ``H`` as the dormancy
      probes) and erank the effective rank of its singular values (Roy & Vetterli 2007, docs/reference/metrics.md). It
      is
      minimised by separate plain gradient steps ``theta <- theta - er_lr * grad L_ER`` on all parameters of
      the online network. The step uses ``torch.autograd.grad``: it does not go through the optimizer
      (Adam's moments and step count are untouched), nor through gradient clipping, and it leaves no
      ``.grad`` behind.

      - DQN: one step every ``er_every`` gradient updates, right after that update's optimizer step, on
        the same replay batch (a new forward pass at the updated parameters). It cannot come before the
        TD step of the same batch: the TD graph is built before the hooks run, and changing the
        parameters in place would invalidate it.
      - PPO: one step at the start of every ``er_every``-th epoch, on the whole rollout, before the
        epoch's minibatches.

    A conv layer's ``(n, C, H, W)`` output is flattened to ``(n, C * H * W)``: docs/reference/metrics.md's feature
    matrix
    has one row per *sample*, and this is exactly the matrix the next Linear layer receives. (Treating the
    channels as units would give rows per sample *and* position, an erank of at most ``C``.)

    The post-activation values are captured by temporary forward hooks on the activation modules during a
    forward pass made for the ER step (:func:`hidden_forward`); the TD/PPO forward is not reused since the
    step comes after that update.

    Defaults: ``coef = 1e-4``; ``er_lr`` 1e-4 for DQN and 1e-6 for PPO (``er_lr = None`` picks the one for the
    agent at :meth:`attach`); ``er_every = 1``. Logged under ``interventions/l2_er/``: ``l2`` (the term, at each dump),
    ``er_loss``, ``fired`` (ER steps so far) and ``erank/<activation module>`` (not in the console table).
    """

    Params = L2ERParams
    params: L2ERParams

    def __init__(self, params: L2ERParams | None = None) -> None:
        super().__init__(params)
        self.er_lr = 0.0
        self.per_epoch = False
        self.epochs = 0
        # DQN: the observations of the batch being trained on, for the ER step after its update.
        self._obs: th.Tensor | None = None

    def attach(self, agent: PlasticAgent) -> None:
        self.per_epoch = not agent.uses_replay
        self.er_lr = self.params.er_lr if self.params.er_lr is not None else PUBLISHED_ER_LR[agent.algo_name]

    def loss_terms(
        self, agent: PlasticAgent, batch: NamedTuple, features: th.Tensor, loss: th.Tensor
    ) -> dict[str, th.Tensor]:
        if not self.per_epoch:
            self._obs = batch.observations
        return {}

    def on_update(self, agent: PlasticAgent, num_gradient_steps: int) -> None:
        obs, self._obs = self._obs, None
        if not self.per_epoch and obs is not None and num_gradient_steps % self.params.er_every == 0:
            self._fire(agent, self.er_step(agent, obs))

    def on_epoch_start(self, agent: PlasticAgent, epoch: int) -> None:
        self.epochs += 1
        if self.per_epoch and self.epochs % self.params.er_every == 0:
            self._fire(agent, self.er_step(agent, rollout_observations(agent)))

    def _fire(self, agent: PlasticAgent, logged: dict[str, float]) -> None:
        self.fire(agent, er_loss=logged.pop("er_loss"))
        self.log_layers(agent, logged)

    def er_step(self, agent: PlasticAgent, obs: th.Tensor) -> dict[str, float]:
        """One plain gradient step ``theta <- theta - er_lr * grad L_ER`` on ``obs``; returns what to log.

        :return: ``er_loss`` and ``erank/<activation module>`` (before the step), as floats.
        """
        network = agent.online_network()
        with th.enable_grad(), hidden_activations(network) as activations:
            hidden_forward(agent, obs)
        if not activations:
            raise ValueError("l2_er found no activation module (ReLU/Tanh) in the online network")
        eranks = {name: effective_rank_differentiable(h.reshape(h.shape[0], -1)) for name, h in activations.items()}
        er_loss = -th.stack(list(eranks.values())).mean()

        params = [p for p in network.parameters() if p.requires_grad]
        grads = th.autograd.grad(er_loss, params, allow_unused=True)
        with th.no_grad():
            for param, grad in zip(params, grads):
                if grad is not None:
                    param.add_(grad, alpha=-self.er_lr)
        return {"er_loss": er_loss.item(), **{f"erank/{name}": e.item() for name, e in eranks.items()}}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "epochs": self.epochs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.epochs = int(state["epochs"])
