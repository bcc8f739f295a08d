"""Layer resets (``reset``): re-initialise the head, the last k layers or the whole network.

Nikishin, Schwarzer, D'Oro, Bacon & Courville 2022, "The Primacy Bias in Deep Reinforcement Learning"
(ICML). Definition: ``docs/reference/interventions.md#reset``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import nn

from agents.hooks import PlasticAgent
from rl_plasticity.interventions.base import TriggeredIntervention, TriggerParams
from rl_plasticity.interventions.registry import register
from rl_plasticity.interventions.surgery import forget_optimizer_state


class ResetParams(TriggerParams):
    """Parameters of :class:`Reset`: which layers, and when (``at``, ``every``)."""

    layers: Literal["head", "last_k", "all"] = Field(
        "head", description="head: the output layer(s); last_k: the last k parametrised layers; all: every layer."
    )
    k: int = Field(1, gt=0, description="Number of layers reset when layers=last_k (ignored otherwise).")


@register("reset")
class Reset(TriggeredIntervention):
    """Re-initialise the head, the last k layers or all layers, with fresh optimizer state (Nikishin et al. 2022).

    Nikishin et al. 2022, "The Primacy Bias in Deep Reinforcement Learning". Each firing:

    1. re-initialises the chosen layers in place with the algorithm's own initialiser
       (:meth:`agent.init_layer`: PyTorch's default for DQN, SB3's orthogonal init with the layer's gain
       and zero bias for PPO);
    2. deletes the optimizer state of their parameters, so Adam's moments and step count restart for them;
    3. for DQN, copies the reset layers into the target network, so the TD target is not computed by the
       old head on top of the new one.

    The layers (``layers``):

    - ``head``: :meth:`agent.head_layers` (DQN: the Q head; PPO: the action and the value head);
    - ``last_k``: the last ``k`` entries of :meth:`agent.parametrized_layers`, which lists the online
      network's Linear/Conv2d layers in module order. For PPO that order is the actor torso, the critic
      torso, ``action_net``, ``value_net``: ``k=1`` is the value head alone and ``k=2`` equals ``head``;
    - ``all``: every parametrised layer of the online network (a full reset).

    A LayerNorm (``net.layer_norm``) belongs to the Linear layer before it: it is reset to its initial
    affine map (weight 1, bias 0, with fresh optimizer state and the DQN target synced) whenever that layer
    is, so a full reset leaves no trained parameter behind.

    Trigger: at each task switch (default) or every ``every`` gradient updates (``at: every``). Logged at
    each firing under ``interventions/reset/``: ``fired``, ``layers`` (how many), ``params`` (scalars
    re-initialised) and ``fraction`` (of the online network's parameters).
    """

    Params = ResetParams
    params: ResetParams

    def attach(self, agent: PlasticAgent) -> None:
        n_layers = len(agent.parametrized_layers())
        if self.params.layers == "last_k" and self.params.k > n_layers:
            raise ValueError(f"reset: k={self.params.k} but the network has only {n_layers} parametrised layers")

    def chosen_layers(self, agent: PlasticAgent) -> list[nn.Module]:
        """The layers a firing re-initialises, input to output."""
        if self.params.layers == "head":
            return list(agent.head_layers())
        layers = [layer for _, layer in agent.parametrized_layers()]
        return layers[-self.params.k :] if self.params.layers == "last_k" else layers

    @staticmethod
    def following_norms(agent: PlasticAgent, layers: list[nn.Module]) -> list[nn.LayerNorm]:
        """The LayerNorms that come right after one of ``layers`` (before the next Linear/Conv2d), in module order."""
        chosen = {id(layer) for layer in layers}
        norms, after_chosen = [], False
        for module in agent.online_network().modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                after_chosen = id(module) in chosen
            elif isinstance(module, nn.LayerNorm) and after_chosen:
                norms.append(module)
        return norms

    def apply(self, agent: PlasticAgent) -> dict[str, float]:
        layers = self.chosen_layers(agent)
        norms = self.following_norms(agent, layers)
        params = [p for module in (*layers, *norms) for p in module.parameters()]
        for layer in layers:
            agent.init_layer(layer)
        for norm in norms:
            norm.reset_parameters()
        forget_optimizer_state(agent.optimizer, params)
        agent.sync_target([*layers, *norms])
        touched = sum(p.numel() for p in params)
        total = sum(p.numel() for p in agent.online_network().parameters())
        return {"layers": len(layers), "params": touched, "fraction": touched / total}
