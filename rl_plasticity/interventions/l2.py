"""Weight-norm regularizers: L2 (``l2``) and L2 towards the initial weights (``l2_init``).

Both add the penalty's gradient to the weights' ``.grad`` through the agent's gradient hook
(:meth:`agents.hooks.Intervention.gradient_terms`), after backward and before clipping: exactly what a loss
term would add, so the penalty is *coupled* into the gradient and goes through gradient-norm clipping and
Adam's moments like the TD/PPO loss (unlike AdamW's decoupled decay), but without a graph to build and
back-propagate at every step. The penalty's value is logged when the logs are written, for the weights
then (:meth:`agents.hooks.Intervention.logged_values`): computing it at every step would double the cost.

:func:`regularized_weights` and :class:`L2Penalty` are shared by every intervention here that adds an L2
term (``l2_er``, ``kfac_rank``), so "the weights" means one thing everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch as th
from pydantic import Field
from torch import nn

from agents.hooks import PlasticAgent
from rl_plasticity.interventions.base import Params, PlasticityIntervention
from rl_plasticity.interventions.registry import register


def regularized_weights(agent: PlasticAgent, include_biases: bool = False) -> list[tuple[str, nn.Parameter]]:
    """The trainable weights (and optionally biases) of every Linear/Conv2d layer of the online network.

    Only :meth:`agent.online_network` counts (DQN: ``q_net``, never ``q_net_target``). The list is built on
    each call, so layers that another intervention adds or replaces are included.

    :param agent: a PlasticDQN or PlasticPPO.
    :param include_biases: also return the layers' biases.
    :return: ``(parameter path in the online network, parameter)`` pairs, input to output.
    """
    kinds = ("weight", "bias") if include_biases else ("weight",)
    weights = []
    for layer_name, layer in agent.parametrized_layers():
        for kind in kinds:
            param = getattr(layer, kind, None)
            if isinstance(param, nn.Parameter) and param.requires_grad:
                weights.append((f"{layer_name}.{kind}", param))
    return weights


@th.no_grad()
def add_l2_gradient(params: Sequence[th.Tensor], coef: float, anchors: Sequence[th.Tensor] | None = None) -> None:
    """Add the gradient ``coef * (p_k - anchor_k)`` of :func:`l2_penalty` to each ``p_k.grad``, in place.

    ``coef * p_k`` without anchors; a ``None`` ``.grad`` is set to it. ``coef * p_k - coef * anchor_k`` is
    added as two in-place updates, with no temporary the size of the weights: this runs at every gradient
    step, and allocating and filling ``p_k - anchor_k`` cost as much as the update itself.

    :param params: the regularized parameters.
    :param coef: the penalty's weight.
    :param anchors: the points each parameter is pulled to (default: zero), same shapes as ``params``.
    :raises ValueError: if ``params`` is empty (there would be nothing to regularize), or ``anchors`` is not
        one per parameter.
    """
    if not params:
        raise ValueError("no tensors to regularize")
    if anchors is not None and len(anchors) != len(params):
        raise ValueError(f"{len(anchors)} anchors for {len(params)} parameters")
    for k, p in enumerate(params):
        anchor = None if anchors is None else anchors[k]
        if p.grad is None:
            p.grad = coef * (p if anchor is None else p - anchor)
            continue
        p.grad.add_(p, alpha=coef)
        if anchor is not None:
            p.grad.sub_(anchor, alpha=coef)


@th.no_grad()
def l2_penalty(params: Sequence[th.Tensor], coef: float, anchors: Sequence[th.Tensor] | None = None) -> th.Tensor:
    """``coef * sum_k ||p_k - anchor_k||^2 / 2`` (anchors default to zero), as a detached scalar.

    :raises ValueError: if ``params`` is empty.
    """
    if not params:
        raise ValueError("no tensors to regularize")
    diffs = params if anchors is None else [p - a for p, a in zip(params, anchors, strict=True)]
    return coef * th.stack([th.linalg.vector_norm(d).square() for d in diffs]).sum() / 2


class L2Penalty:
    """Mixin for an intervention with an L2 penalty ``coef * sum ||w - anchor||^2 / 2`` on weights.

    Its gradient is added to ``.grad`` at every step (:meth:`gradient_terms`); its value, which costs as
    much again to compute, is logged when the logs are written, for the weights then (:meth:`logged_values`).
    A subclass says what is penalised in :meth:`l2_terms`.
    """

    #: Name of the logged value.
    penalty_key = "l2"
    #: The field of the intervention's ``params`` that holds ``coef``.
    coef_field = "coef"

    def l2_terms(self, agent: PlasticAgent) -> tuple[list[nn.Parameter], float, list[th.Tensor] | None]:
        """The penalised parameters, ``coef`` and the anchors (``None``: zero).

        By default the :func:`regularized_weights` (with biases if ``params.include_biases``), pulled to zero.
        """
        params = self.params  # type: ignore[attr-defined]
        weights = [p for _, p in regularized_weights(agent, params.include_biases)]
        return weights, getattr(params, self.coef_field), None

    def gradient_terms(self, agent: PlasticAgent) -> dict[str, th.Tensor]:
        """Add the penalty's gradient to ``.grad``; return ``{}`` (the value is logged at dumps)."""
        add_l2_gradient(*self.l2_terms(agent))
        return {}

    def logged_values(self, agent: PlasticAgent) -> dict[str, th.Tensor]:
        """``{penalty_key: the penalty at the current weights}``."""
        return {self.penalty_key: l2_penalty(*self.l2_terms(agent))}


class L2Params(Params):
    """Parameters of :class:`L2`."""

    coef: float = Field(1e-4, ge=0, description="Weight of the penalty coef * sum ||theta||^2 / 2.")
    include_biases: bool = Field(False, description="Also penalise the biases of the Linear/Conv2d layers.")


@register("l2")
class L2(L2Penalty, PlasticityIntervention):
    """L2 regularization coef * sum ||theta||^2 / 2 of the weights, coupled into the gradient (not AdamW).

    The term's gradient ``coef * theta`` is added to each weight's gradient (biases only with
    ``include_biases``) before clipping; the term's value is logged as ``l2`` at each dump. Default ``coef = 1e-4``
    (``docs/reference/interventions.md#l2``).
    """

    Params = L2Params
    params: L2Params


class L2InitParams(Params):
    """Parameters of :class:`L2Init`."""

    coef: float = Field(1e-2, ge=0, description="Weight of the penalty coef * sum ||theta - theta_0||^2.")
    include_biases: bool = Field(False, description="Also pull the biases of the Linear/Conv2d layers to theirs.")


@register("l2_init")
class L2Init(L2Penalty, PlasticityIntervention):
    """Regenerative L2 towards the initial weights, coef * sum ||theta - theta_0||^2 (Kumar et al. 2023).

    Kumar, Marklund & Van Roy 2023, "Maintaining Plasticity in Continual Learning via Regenerative
    Regularization" (L2 Init). ``theta_0`` is a copy of the weights taken at :meth:`attach`, on the agent's
    device; the term's gradient ``2 * coef * (theta - theta_0)`` is added to the weights' gradients before
    clipping. Default ``coef = 1e-2``.

    ``theta_0`` is part of :meth:`state_dict`, keyed by parameter path, so a resumed run keeps pulling
    towards the *original* initialisation, not towards the weights it resumed from. A weight that appears
    after :meth:`attach` (a layer added by another intervention) gets its value when first seen as its
    ``theta_0``.
    """

    Params = L2InitParams
    params: L2InitParams
    penalty_key = "l2_init"

    def __init__(self, params: L2InitParams | None = None) -> None:
        super().__init__(params)
        self.theta_0: dict[str, th.Tensor] = {}
        # theta_0 from a load_state_dict() that came before attach(): attach() must not overwrite it.
        self._loaded = False

    def attach(self, agent: PlasticAgent) -> None:
        for name, param in regularized_weights(agent, self.params.include_biases):
            if name in self.theta_0 and self._loaded:
                self.theta_0[name] = self.theta_0[name].to(param.device)
            else:
                self.theta_0[name] = param.detach().clone()

    def l2_terms(self, agent: PlasticAgent) -> tuple[list[nn.Parameter], float, list[th.Tensor]]:
        params, anchors = [], []
        for name, param in regularized_weights(agent, self.params.include_biases):
            if name not in self.theta_0:
                self.theta_0[name] = param.detach().clone()
            params.append(param)
            anchors.append(self.theta_0[name])
        # l2_penalty halves the squared norm; the published term does not.
        return params, 2 * self.params.coef, anchors

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "theta_0": {k: v.detach().clone() for k, v in self.theta_0.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        for name, value in state["theta_0"].items():
            # Keep the device of the weights when attached already; attach() moves them otherwise.
            device = self.theta_0[name].device if name in self.theta_0 else value.device
            self.theta_0[name] = value.detach().clone().to(device)
        self._loaded = True
