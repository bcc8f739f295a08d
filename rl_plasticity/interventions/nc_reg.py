"""Neural-collapse regularizer (``nc_reg``), Bonifazi et al. 2024."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch as th
from gymnasium import spaces
from pydantic import Field

from agents.hooks import PlasticAgent
from rl_plasticity.interventions.base import Params, PlasticityIntervention
from rl_plasticity.interventions.registry import register
from rl_plasticity.probes import nc1_differentiable
from rl_plasticity.probing import greedy_labels


class NCRegParams(Params):
    """Parameters of :class:`NCReg`."""

    coef: float = Field(0.05, ge=0, description="The paper's lambda: the term is -coef * min(NC1, clip).")
    clip: float = Field(200.0, gt=0, description="NC1 above this counts as clip (no gradient beyond it).")


@register("nc_reg")
class NCReg(PlasticityIntervention):
    """Anti-collapse term -lambda * min(NC1, clip) on the value-head features (Bonifazi et al. 2024).

    Bonifazi, Chalas, Hess & Łucki 2024, "Can We Understand Plasticity Through Neural Collapse?". NC1
    (Papyan et al. 2020; docs/reference/metrics.md) is ``trace(Sigma_W pinv(Sigma_B)) / C`` of the value-head features
    of
    the training batch (the ``features`` the agent passes to :meth:`loss_terms`), with each sample's class
    its greedy action: for DQN ``argmax_a Q(s, a)`` from the Q head on these features, for PPO the mode of
    the actor's distribution. The labels are computed without gradient; the term's gradient flows through
    the features and the pseudo-inverse, via :func:`~rl_plasticity.probes.collapse.nc1_differentiable`
    (which stays finite when ``Sigma_B`` is rank-deficient). Minimising ``-lambda * NC1`` raises the
    within-class spread relative to the between-class spread, i.e. works against collapse; above ``clip``
    the term is constant, ``-lambda * clip``, with zero gradient.

    When NC1 is undefined on a batch (fewer than two classes present, or all class means equal) the term is
    0 for that batch. Defaults ``lambda = 0.05`` (parameter ``coef``, since ``lambda`` is a Python keyword),
    ``clip = 200``. Logged under ``interventions/nc_reg/``: ``nc_reg`` (the term), ``nc1`` (unclipped, last
    defined value) and ``undefined`` (batches so far where NC1 was undefined).
    """

    Params = NCRegParams
    params: NCRegParams

    def __init__(self, params: NCRegParams | None = None) -> None:
        super().__init__(params)
        self.undefined = 0

    def attach(self, agent: PlasticAgent) -> None:
        if not isinstance(agent.action_space, spaces.Discrete):
            raise ValueError(f"nc_reg needs a Discrete action space (greedy-action classes), got {agent.action_space}")

    def loss_terms(
        self, agent: PlasticAgent, batch: NamedTuple, features: th.Tensor, loss: th.Tensor
    ) -> dict[str, th.Tensor]:
        with th.no_grad():
            labels, _ = greedy_labels(agent, batch.observations, features.detach())
        nc1 = nc1_differentiable(features, labels.long().reshape(-1))
        if not th.isfinite(nc1):
            self.undefined += 1
            self.log(agent, "undefined", self.undefined)
            return {"nc_reg": th.zeros((), dtype=features.dtype, device=features.device)}
        self.log(agent, "nc1", nc1.item())
        return {"nc_reg": -self.params.coef * th.clamp(nc1, max=self.params.clip)}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "undefined": self.undefined}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.undefined = int(state["undefined"])
