"""Feature variance of the value-head features: the mean over samples of the variance across units
(``feature_variance``).

Plasticine's definition (Yuan et al. 2025, "Plasticine: Accelerating Research in Plasticity-Motivated Deep
Reinforcement Learning", arXiv:2504.17490; code: RLE-Foundation/Plasticine, ``plasticine/metrics.py``,
``compute_feature_variance``: ``torch.mean(torch.var(features, dim=1))``): for each sample the unbiased
variance of its ``d`` feature values, then the mean over the batch. It is small when a sample's units carry
nearly the same value (dead or saturated units, or features collapsed onto a constant direction). It is *not*
the variance of each unit across the batch.
"""

from __future__ import annotations

import torch as th

from rl_plasticity.probes._checks import check_matrix
from rl_plasticity.probes.registry import ProbeInputs, ProbeResult, register_probe


def feature_variance(features: th.Tensor) -> float:
    """``(1/n) sum_i (1/(d-1)) sum_j (phi_ij - mean_j phi_ij)^2``: each row's unbiased variance, averaged.

    :param features: ``(n, d)`` feature matrix, one row per sample, ``n >= 1`` and ``d >= 2``.
    :return: the mean variance, ``>= 0`` (computed in float64).
    :raises ValueError: not a finite 2-D tensor with at least one row and two columns.
    """
    x = check_matrix("features", features)
    if x.shape[1] < 2:
        raise ValueError(f"features needs at least 2 columns for a variance across units, got shape {tuple(x.shape)}")
    return x.var(dim=1, correction=1).mean().item()


@register_probe("feature_variance", "light", ("feature_variance",), "features", order=91)
def _run(inputs: ProbeInputs) -> ProbeResult:
    """Mean over samples of the variance across units of the value-head features (Plasticine's feature_var)."""
    return ProbeResult({"feature_variance/value_head": feature_variance(inputs.features)}, {})
