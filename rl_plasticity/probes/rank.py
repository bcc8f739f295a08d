"""Rank of a feature matrix, from its singular values.

Every probe takes a feature matrix ``F`` of shape ``(n, d)`` (``n`` samples, ``d`` units), which is **not**
centred, and uses its singular values ``sigma_1 >= ... >= sigma_m`` with ``m = min(n, d)``. For an all-zero
``F`` every rank is 0 and the effective rank is defined as 0. Definitions follow
``docs/reference/metrics.md#feature-rank`` ("Feature rank").
"""

from __future__ import annotations

import math

import torch as th

from rl_plasticity.probes._checks import check_finite, check_matrix, check_threshold
from rl_plasticity.probes.registry import ProbeInputs, ProbeResult, register_probe

__all__ = [
    "approx_rank",
    "effective_rank",
    "effective_rank_differentiable",
    "effective_rank_from_spectrum",
    "epsilon_rank",
    "lyle_feature_rank",
    "singular_values",
    "srank",
]

# Round-off can make eigenvalues of a PSD matrix slightly negative; below this fraction of the largest
# magnitude they are treated as 0 by ``effective_rank_from_spectrum``, larger negative values are an error.
_NEGATIVE_TOLERANCE = 1e-10


@th.no_grad()
def singular_values(F: th.Tensor) -> th.Tensor:
    """Singular values of ``F``, in descending order.

    :param F: feature matrix, shape ``(n, d)``.
    :return: the ``min(n, d)`` singular values, float64, on ``F``'s device.
    :raises ValueError: if ``F`` is not a finite 2-D tensor with at least one row and column.
    """
    F = check_matrix("F", F)
    # svdvals returns them in descending order.
    return th.linalg.svdvals(F)


@th.no_grad()
def effective_rank_from_spectrum(values: th.Tensor) -> float:
    """Effective rank of a vector of non-negative values (singular values, eigenvalues, ...).

    Roy & Vetterli 2007, "The effective rank: a measure of effective dimensionality"::

        p_k = v_k / sum_j v_j,    erank = exp(-sum_k p_k log p_k),    with 0 log 0 = 0.

    It lies in ``[1, len(values)]`` for a non-zero vector; an all-zero vector has erank 0.

    :param values: 1-D tensor of non-negative values. Round-off negatives (magnitude at most
        ``1e-10`` times the largest magnitude, as ``eigvalsh`` returns for a PSD matrix) count as 0.
    :return: the effective rank.
    :raises ValueError: if ``values`` is not a finite, non-empty 1-D tensor of non-negative values.
    """
    if not isinstance(values, th.Tensor) or values.dim() != 1 or values.numel() == 0:
        shape = tuple(values.shape) if isinstance(values, th.Tensor) else type(values).__name__
        raise ValueError(f"values must be a non-empty 1-D tensor, got {shape}")
    check_finite("values", values)
    v = values.detach().to(th.float64)
    if (v < -_NEGATIVE_TOLERANCE * v.abs().max()).any():
        raise ValueError(f"values must be non-negative, got a minimum of {v.min().item()}")
    return _erank_differentiable(v.clamp(min=0.0)).item()


@th.no_grad()
def effective_rank(F: th.Tensor) -> float:
    """Effective rank (erank) of the singular values of ``F``.

    Roy & Vetterli 2007: ``p_k = sigma_k / sum_j sigma_j``, ``erank = exp(-sum_k p_k log p_k)``, with
    ``0 log 0 = 0``; 0 for an all-zero ``F``.

    :param F: feature matrix, shape ``(n, d)``, not centred.
    :return: the effective rank, in ``[1, min(n, d)]`` (0 if ``F`` is all zero).
    """
    return effective_rank_from_spectrum(singular_values(F))


def _smallest_k_reaching(values: th.Tensor, fraction: float) -> int:
    """Smallest ``k`` with ``sum_{i<=k} values_i >= fraction * sum_i values_i`` (0 if all values are 0)."""
    cumulative = th.cumsum(values, dim=0)
    # Use the last partial sum as the total, so that the full sum meets fraction = 1 exactly.
    total = cumulative[-1]
    if total <= 0:
        return 0
    return int((cumulative < fraction * total).sum().item()) + 1


@th.no_grad()
def srank(F: th.Tensor, delta: float = 0.01) -> int:
    """The ``srank_delta`` of ``F``: how many singular values hold a ``1 - delta`` share of their sum.

    Kumar et al. 2021, "Implicit Under-Parameterization Inhibits Data-Efficient Deep RL"::

        srank_delta(F) = min { k : sum_{i<=k} sigma_i / sum_i sigma_i >= 1 - delta }

    :param F: feature matrix, shape ``(n, d)``, not centred.
    :param delta: the share of the singular value sum that may be left out, in ``[0, 1]``.
    :return: the srank (0 if ``F`` is all zero).
    """
    check_threshold("delta", delta, 0.0, 1.0)
    return _smallest_k_reaching(singular_values(F), 1.0 - delta)


@th.no_grad()
def approx_rank(F: th.Tensor, delta: float = 0.01) -> int:
    """Approximate rank of ``F``: how many singular values hold a ``1 - delta`` share of the energy.

    Yang et al. 2020, "Harnessing Structures for Value-Based Planning and RL" (used by Dohare et al. 2024,
    "Loss of plasticity in deep continual learning")::

        approx_rank_delta(F) = min { k : sum_{i<=k} sigma_i^2 / sum_i sigma_i^2 >= 1 - delta }

    :param F: feature matrix, shape ``(n, d)``, not centred.
    :param delta: the share of the squared singular value sum that may be left out, in ``[0, 1]``.
    :return: the approximate rank (0 if ``F`` is all zero).
    """
    check_threshold("delta", delta, 0.0, 1.0)
    sigma = singular_values(F)
    # Scale by sigma_1 first so that squaring tiny singular values cannot underflow to 0.
    return _smallest_k_reaching((sigma / sigma[0]) ** 2 if sigma[0] > 0 else sigma, 1.0 - delta)


@th.no_grad()
def epsilon_rank(F: th.Tensor, eps: float = 0.01) -> int:
    """Numerical rank of ``F`` relative to its largest singular value.

    Numerical rank as in He et al. and Prakash et al. 2025, "Spectral Collapse Drives Loss of
    Plasticity"::

        epsilon_rank(F) = #{ k : sigma_k / sigma_1 > eps }

    :param F: feature matrix, shape ``(n, d)``, not centred.
    :param eps: relative threshold, ``>= 0``.
    :return: the epsilon-rank (0 if ``F`` is all zero).
    """
    check_threshold("eps", eps)
    sigma = singular_values(F)
    if sigma[0] <= 0:
        return 0
    return int((sigma / sigma[0] > eps).sum().item())


@th.no_grad()
def lyle_feature_rank(F: th.Tensor, eps: float = 0.01) -> int:
    """Feature rank of Lyle et al. 2022, "Understanding and Preventing Capacity Loss in RL".

    The singular values are scaled by ``sqrt(n)``, so the threshold does not depend on the batch size::

        feature_rank(F) = #{ k : sigma_k / sqrt(n) > eps }

    :param F: feature matrix, shape ``(n, d)``, not centred.
    :param eps: absolute threshold on ``sigma_k / sqrt(n)``, ``>= 0``.
    :return: the feature rank (0 if ``F`` is all zero).
    """
    check_threshold("eps", eps)
    sigma = singular_values(F)
    return int((sigma / math.sqrt(F.shape[0]) > eps).sum().item())


def effective_rank_differentiable(F: th.Tensor) -> th.Tensor:
    """Effective rank of ``F`` as a differentiable scalar tensor (for a rank regularizer).

    Same formula as :func:`effective_rank` (Roy & Vetterli 2007): ``p_k = sigma_k / sum_j sigma_j``,
    ``erank = exp(-sum_k p_k log p_k)``, 0 for an all-zero ``F``. The graph to ``F`` is kept.

    Why the gradient stays finite:

    - only the singular values are differentiated (``svdvals``), whose gradient ``U diag(g) V^T`` has no
      ``1 / (sigma_i^2 - sigma_j^2)`` terms, so duplicated singular values are harmless;
    - a zero singular value drops out of the entropy through ``torch.where`` on a safe log argument,
      instead of producing ``0 * log 0 = nan`` (its term's one-sided derivative is infinite, so this is the
      subgradient with that term held at 0);
    - an all-zero ``F`` returns 0 with a zero gradient instead of ``0 / 0``.

    The computation runs in float64 and the result is cast back to ``F``'s dtype.

    :param F: feature matrix, shape ``(n, d)``, not centred; may require grad.
    :return: 0-dim tensor on ``F``'s device, with ``F``'s dtype.
    :raises ValueError: if ``F`` is not a finite 2-D tensor with at least one row and column.
    """
    check_matrix("F", F)  # validation only: the returned copy is detached
    return _erank_differentiable(th.linalg.svdvals(F.to(th.float64))).to(F.dtype)


def effective_rank_psd_differentiable(M: th.Tensor) -> th.Tensor:
    """Effective rank of the eigenvalues of a symmetric PSD matrix ``M``, as a differentiable scalar.

    For a PSD matrix (a Gram matrix ``X X^T`` or a covariance) the eigenvalues are the singular values, so
    this is ``effective_rank_differentiable(M)`` (Roy & Vetterli 2007), computed with ``eigvalsh``, which is
    cheaper than an SVD, forward and backward. The gradient stays finite for the same reasons: the
    eigenvalues' gradient ``V diag(g) V^T`` has no ``1 / (lambda_i - lambda_j)`` terms, zero eigenvalues
    (and round-off negatives, clamped to 0) drop out of the entropy, and an all-zero ``M`` gives 0.
    Only the lower triangle of ``M`` is read; symmetry is not checked (this runs at every training step).

    :param M: ``(d, d)`` symmetric PSD matrix; may require grad.
    :return: 0-dim tensor on ``M``'s device, with ``M``'s dtype.
    :raises ValueError: if ``M`` is not a square 2-D tensor.
    """
    if M.dim() != 2 or M.shape[0] != M.shape[1] or M.shape[0] == 0:
        raise ValueError(f"M must be a non-empty square matrix, got shape {tuple(M.shape)}")
    return _erank_differentiable(th.linalg.eigvalsh(M.to(th.float64)).clamp_min(0.0)).to(M.dtype)


def _erank_differentiable(values: th.Tensor) -> th.Tensor:
    """``exp(-sum p log p)`` of non-negative ``values`` with finite gradients (0 log 0 = 0, erank(0) = 0)."""
    total = values.sum()
    positive_total = total > 0
    p = values / th.where(positive_total, total, th.ones_like(total))
    nonzero = p > 0
    p_log_p = th.where(nonzero, p * th.where(nonzero, p, th.ones_like(p)).log(), th.zeros_like(p))
    return th.where(positive_total, th.exp(-p_log_p.sum()), th.zeros_like(total))


@register_probe(
    "rank",
    "light",
    ("erank", "srank", "approx_rank", "eps_rank", "lyle_rank"),
    "ranks",
    main=(("erank", "effective rank"),),
    order=10,
)
def _run(inputs: ProbeInputs) -> ProbeResult:
    """Ranks of the value-head features: effective rank, srank, approx. rank, epsilon-rank, Lyle's feature rank."""
    features = inputs.features
    scalars = {
        "erank/value_head": effective_rank(features),
        "srank/value_head": srank(features),
        "approx_rank/value_head": approx_rank(features),
        "eps_rank/value_head": epsilon_rank(features),
        "lyle_rank/value_head": lyle_feature_rank(features),
    }
    return ProbeResult(scalars, {"singular_values/value_head": singular_values(features).float().cpu()})
