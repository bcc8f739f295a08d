"""Recycling dormant units (``redo``), Sokar et al. 2023.

Sokar, Agarwal, Castro & Evci 2023, "The Dormant Neuron Phenomenon in Deep Reinforcement Learning" (ICML).
Definition: ``docs/reference/interventions.md#redo``; dormancy: ``docs/reference/metrics.md#dormant-and-active-units``.

The unit surgery ReDo shares with continual backprop (the hidden-layer map, tracing it, recycling units) is in
:mod:`rl_plasticity.interventions.surgery`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import torch as th
from pydantic import Field

from agents.hooks import PlasticAgent
from rl_plasticity.interventions.base import Params, PlasticityIntervention
from rl_plasticity.interventions.registry import register
from rl_plasticity.interventions.surgery import HiddenLayer, recycle_units, trace_hidden_layers
from rl_plasticity.probes import unit_scores


class ReDoParams(Params):
    """Parameters of :class:`ReDo` (defaults from Sokar et al. 2023 and their code)."""

    every: int = Field(1000, gt=0, description="Gradient updates between recycling steps (ReDo: 1000).")
    tau: float = Field(0.1, ge=0.0, description="A unit is tau-dormant if its score s_i <= tau (ReDo code: 0.1).")
    batch: Literal["replay", "train"] = Field(
        "replay",
        description="Data the scores are computed on: replay = a fresh sample of replay_batch_size transitions "
        "from the agent's buffer, as the ReDo code does (DQN: the replay buffer; PPO: its current rollout); "
        "train = the current training batch.",
    )
    replay_batch_size: int = Field(
        256, gt=0, description="Transitions scored when batch=replay (ReDo code: batch_size_statistics=256)."
    )


@register("redo")
class ReDo(PlasticityIntervention):
    """Recycle tau-dormant units every N updates: fresh incoming, zero outgoing weights (Sokar et al. 2023).

    Sokar, Agarwal, Castro & Evci 2023, "The Dormant Neuron Phenomenon in Deep Reinforcement Learning".
    Every ``every`` gradient updates (counted from 1, firing at ``every``, ``2 * every``, ...):

    1. one forward pass of the network on a scoring batch (:func:`trace_hidden_layers`) gives every
       hidden layer's post-activation values ``H`` with the current weights. The batch is, by default, 256
       transitions drawn afresh from the replay buffer, as the ReDo code does (``batch_size_statistics =
       256`` in ``google/dopamine``, ``dopamine/labs/redo/recycled_dqn_agents.py``, sampled by
       ``_sample_batch_for_statistics``), not the 32-sample training batch (``batch: train``);
    2. each unit's score is ``s_i = mean|h_i| / mean_k mean|h_k|`` (:func:`~rl_plasticity.probes.unit_scores`,
       docs/reference/metrics.md; a conv channel is a unit, averaged over positions), and the units with ``s_i <= tau``
       are
       tau-dormant (``tau = 0.1``, the ReDo code's setting; ``tau = 0`` takes only units that are exactly
       zero on the whole batch);
    3. every dormant unit is recycled (:func:`recycle_units`): incoming weights and bias from a fresh draw
       of the agent's initialiser, outgoing weights zero, Adam moments of those entries zero.

    All scores are taken before any layer is touched. The output of the network is unchanged for units
    that were silent on the batch and loses only the small contribution of the others (a dormant unit's
    mean ``|h|`` is at most ``tau`` times the layer's average).

    Choices, against the paper's code (``google/dopamine``, ``labs/redo``):

    - PPO, which the paper does not cover, has no replay buffer: ``batch: replay`` samples its current
      rollout (:meth:`scoring_batch`);
    - the recycled bias comes from the agent's initialiser (PyTorch's uniform for DQN, zero for PPO), as the
      spec asks; the code sets it to zero, its own networks' initial bias;
    - the target network is not touched, as in the code, where it syncs on its own schedule: recycling
      keeps the online function, so the target stays a valid lagged copy, whereas copying only the recycled
      rows into it would pair new incoming weights with its old non-zero outgoing ones.

    The activations are recomputed at firing time rather than hooked from every training forward pass:
    one extra forward every ``every`` updates costs less than hooks on all of them.

    Logged at each firing under ``interventions/redo/``: ``fired``, ``recycled`` (units, all layers),
    ``fraction`` (of all hidden units), ``recycled/<layer>`` and ``recycled_total`` (since the start).
    """

    Params = ReDoParams
    params: ReDoParams

    def __init__(self, params: ReDoParams | None = None) -> None:
        super().__init__(params)
        self.recycled_total = 0
        self._batch: NamedTuple | None = None

    def attach(self, agent: PlasticAgent) -> None:
        buffered = hasattr(agent, "replay_buffer") or hasattr(agent, "rollout_buffer")
        if self.params.batch == "replay" and not buffered:
            raise ValueError("redo: batch=replay needs an agent with a replay or rollout buffer; use batch=train")
        self._batch = None

    def loss_terms(
        self, agent: PlasticAgent, batch: NamedTuple, features: th.Tensor, loss: th.Tensor
    ) -> dict[str, th.Tensor]:
        # Only remember the batch: the scores are computed after the update, when the recycling happens.
        self._batch = batch
        return {}

    def on_update(self, agent: PlasticAgent, num_gradient_steps: int) -> None:
        if num_gradient_steps % self.params.every != 0:
            return
        if self.params.batch == "replay":
            batch = self.scoring_batch(agent)
        elif self._batch is not None:
            batch = self._batch
        else:
            return  # no training batch seen since attach
        logged = self.recycle(agent, batch)
        per_layer = {key: logged.pop(key) for key in list(logged) if key.startswith("recycled/")}
        self.fire(agent, **logged)
        self.log_layers(agent, per_layer)

    def scoring_batch(self, agent: PlasticAgent) -> NamedTuple:
        """``replay_batch_size`` transitions drawn afresh from the agent's buffer, to score the units on.

        DQN: a uniform sample of the replay buffer (SB3's ``sample``, with replacement), as the ReDo code
        samples ``batch_size_statistics = 256`` transitions. PPO has no replay buffer: a uniform sample of its
        current rollout, without replacement (the first minibatch of SB3's shuffled ``get``; the whole
        rollout if it is smaller). Both draw from NumPy's global RNG, as SB3's own sampling does.
        """
        return agent.sample_batch(self.params.replay_batch_size)

    def dormant_units(self, hidden: Sequence[HiddenLayer], activations: dict[str, th.Tensor]) -> list[th.Tensor]:
        """Boolean mask of the tau-dormant units of each hidden layer, from its post-activation values."""
        return [unit_scores(h.unit_view(activations[h.activation])) <= self.params.tau for h in hidden]

    def recycle(self, agent: PlasticAgent, batch: NamedTuple) -> dict[str, float]:
        """Find the tau-dormant units on ``batch`` and recycle them; return what to log."""
        hidden, activations = trace_hidden_layers(agent, batch)
        masks = self.dormant_units(hidden, activations)
        recycled = recycle_units(agent, list(zip(hidden, masks)))
        self.recycled_total += recycled
        units = sum(h.units for h in hidden)
        logged: dict[str, float] = {
            "recycled": recycled,
            "fraction": recycled / units,
            "recycled_total": self.recycled_total,
        }
        for h, mask in zip(hidden, masks):
            logged[f"recycled/{h.name}"] = int(mask.sum())
        return logged

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "recycled_total": self.recycled_total}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.recycled_total = int(state["recycled_total"])
