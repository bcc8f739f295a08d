"""Parseval regularization (``parseval``): keep each hidden layer's weight matrix close to a scaled orthogonal one.

Chung, Cherif, Meger & Precup 2024, "Parseval Regularization for Continual Reinforcement Learning" (NeurIPS);
the authors' code: ``wechu/parseval_reg``, ``parseval_reg/agent.py`` (``PPO_Agent._update_parameters``) and
``parseval_reg/main.py`` (the per-benchmark coefficients); also in Plasticine (``RLE-Foundation/Plasticine``,
``plasticine/utils.py``, ``PRLinear.pr_loss``). The definitions are in ``docs/reference/interventions.md``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch as th
from pydantic import Field
from torch import nn

from agents.hooks import PlasticAgent
from rl_plasticity.interventions.base import Params, PlasticityIntervention
from rl_plasticity.interventions.l2 import regularized_weights
from rl_plasticity.interventions.registry import register


def parseval_weights(agent: PlasticAgent) -> list[tuple[str, nn.Parameter]]:
    """The weights Parseval regularization acts on: every trainable Linear/Conv2d weight of the online network
    except the output layers (:meth:`agent.head_layers`: DQN's Q head, PPO's action and value heads).

    :param agent: a PlasticDQN or PlasticPPO.
    :return: ``(parameter path in the online network, weight)`` pairs, input to output; built on each call, so
        layers another intervention adds or replaces are included.
    """
    heads = {id(getattr(layer, "weight", None)) for layer in agent.head_layers()}
    return [(name, w) for name, w in regularized_weights(agent) if id(w) not in heads]


def layer_coefs(weights: Sequence[th.Tensor], coef: float, reference_width: int | None) -> list[float]:
    """The coefficient of each weight: ``coef``, times ``(reference_width / d_out)^2`` if ``reference_width`` is set.

    :param weights: ``(d_out, ...)`` weights.
    """
    if reference_width is None:
        return [coef] * len(weights)
    return [coef * (reference_width / w.shape[0]) ** 2 for w in weights]


@th.no_grad()
def parseval_penalty(weights: Sequence[th.Tensor], coefs: Sequence[float], scale: float) -> th.Tensor:
    """``sum_k coefs_k * ||W_k W_k^T - scale * I||_F^2`` as a detached scalar; a conv weight
    ``(d_out, c_in, kh, kw)`` counts as the matrix ``(d_out, c_in * kh * kw)``.

    Computed as written (``W W^T`` is ``d_out x d_out``), not through the smaller Gram matrix: the expansion
    that would allow it cancels large terms and loses the value's accuracy near the minimum. It runs only when
    the logs are written.

    :param weights: the regularized weights, each ``(d_out, ...)``.
    :param coefs: one coefficient per weight.
    :param scale: ``s``, the target of ``W W^T``.
    :return: 0-dim tensor (0 if ``weights`` is empty).
    """
    terms = []
    for w, coef in zip(weights, coefs, strict=True):
        m = w.flatten(1)
        gram = m @ m.T
        gram.diagonal().sub_(scale)
        terms.append(coef * gram.square().sum())
    return th.stack(terms).sum() if terms else th.zeros(())


@th.no_grad()
def add_parseval_gradient(weights: Sequence[nn.Parameter], coefs: Sequence[float], scale: float) -> None:
    """Add the gradient ``4 * coef * (W W^T - scale * I) W`` of :func:`parseval_penalty` to each ``W.grad``.

    ``(W W^T - s I) W = W (W^T W) - s W``: the product is formed through the smaller of the two Gram matrices
    (``min(d_out, d_in)`` square), which costs ``2 * d_out * d_in * min(d_out, d_in)`` multiply-adds per layer.
    A ``None`` ``.grad`` is set to the term.

    :param weights: the regularized weights, each ``(d_out, ...)`` (a conv weight as ``(d_out, c_in * kh * kw)``).
    :param coefs: one coefficient per weight.
    :param scale: ``s``, the target of ``W W^T``.
    """
    for w, coef in zip(weights, coefs, strict=True):
        m = w.flatten(1)
        # beta * input + mat1 @ mat2 in one call: W W^T W - s W.
        if m.shape[0] <= m.shape[1]:
            term = th.addmm(m, m @ m.T, m, beta=-scale)
        else:
            term = th.addmm(m, m, m.T @ m, beta=-scale)
        term = term.view_as(w)
        if w.grad is None:
            w.grad = term.mul_(4 * coef)
        else:
            w.grad.add_(term, alpha=4 * coef)


class ParsevalParams(Params):
    """Parameters of :class:`Parseval`."""

    coef: float = Field(
        1e-3,
        ge=0,
        description="lambda, weight of lambda * sum_W ||W W^T - s I||_F^2 (the authors' gridworld and MetaWorld "
        "value; 1e-4 on CARL).",
    )
    scale: float = Field(
        2.0,
        ge=0,
        description="s, the target of W W^T: the squared gain of the authors' orthogonal initialisation, sqrt(2)^2 "
        "(Plasticine uses 1).",
    )
    reference_width: int | None = Field(
        None,
        gt=0,
        description="If set, each layer's lambda is multiplied by (reference_width / d_out)^2, as the authors' code "
        "rescales its lambda, tuned at width 64, for other widths (64 does that); null: lambda as is.",
    )


@register("parseval")
class Parseval(PlasticityIntervention):
    """Parseval regularization lambda * sum_W ||W W^T - s I||_F^2 of all layers but the output (Chung et al. 2024).

    Chung, Cherif, Meger & Precup 2024, "Parseval Regularization for Continual Reinforcement Learning" (NeurIPS),
    with the authors' code (``wechu/parseval_reg``, ``parseval_reg/agent.py``) and Plasticine
    (``RLE-Foundation/Plasticine``, ``plasticine/utils.py``). For the weight ``W`` (``d_out x d_in``; a conv
    weight reshaped to ``(out_channels, in_channels * kh * kw)``) of every Linear/Conv2d layer of the online
    network except the output layers (:func:`parseval_weights`), the penalty pulls ``W W^T`` towards ``s I``:
    the rows of ``W`` towards orthogonal vectors of squared norm ``s``. Biases are not regularized, nor DQN's
    target network.

    As in the authors' code the term is part of the loss, so it goes through gradient clipping and Adam's
    moments; here its closed-form gradient ``4 * lambda * (W W^T - s I) W`` is added to ``.grad`` after
    backward and before clipping (:meth:`gradient_terms`), which is the same without a graph for it. Its value
    is logged as ``parseval`` when the logs are written (:meth:`logged_values`).

    Defaults: ``lambda = 1e-3`` and ``s = 2``, the authors' code on gridworld and MetaWorld (``s`` is the square
    of their orthogonal initialisation's gain ``sqrt(2)``; Plasticine's defaults are ``1e-3`` and ``s = 1``).
    Not implemented: the paper's additions to the network (learnable diagonal layers after each regularized
    layer, which the authors' MetaWorld runs use, and a learnable input scale) and its ablations (row-normalised
    and subgroup Parseval).

    No state beyond the base class's: the penalty depends on the current weights only.
    """

    Params = ParsevalParams
    params: ParsevalParams
    #: Name of the logged value.
    penalty_key = "parseval"

    def attach(self, agent: PlasticAgent) -> None:
        if not parseval_weights(agent):
            warnings.warn(
                "parseval: the online network has no Linear/Conv2d layer below its output layers; nothing is "
                "regularized",
                stacklevel=2,
            )

    def terms(self, agent: PlasticAgent) -> tuple[list[nn.Parameter], list[float]]:
        """The regularized weights and the coefficient of each."""
        weights = [w for _, w in parseval_weights(agent)]
        return weights, layer_coefs(weights, self.params.coef, self.params.reference_width)

    def gradient_terms(self, agent: PlasticAgent) -> dict[str, th.Tensor]:
        """Add the penalty's gradient to ``.grad``; return ``{}`` (the value is logged at dumps)."""
        add_parseval_gradient(*self.terms(agent), self.params.scale)
        return {}

    def logged_values(self, agent: PlasticAgent) -> dict[str, th.Tensor]:
        """``{penalty_key: the penalty at the current weights}``."""
        return {self.penalty_key: parseval_penalty(*self.terms(agent), self.params.scale)}
