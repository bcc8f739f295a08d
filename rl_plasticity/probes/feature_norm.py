"""Feature norm of the value-head features: the mean L2 norm of the feature vectors (``feature_norm``).

Plasticine logs it for the value and policy features (Yuan et al. 2025, "Plasticine: Accelerating Research in
Plasticity-Motivated Deep Reinforcement Learning", arXiv:2504.17490; code: RLE-Foundation/Plasticine,
``plasticine/metrics.py``, ``compute_feature_norm``). Growing feature norms go with growing weight norms and
a sharper, harder-to-move network (Lyle et al. 2024); collapsing ones with dead units.
"""

from __future__ import annotations

import torch as th

from rl_plasticity.probes._checks import check_matrix
from rl_plasticity.probes.registry import ProbeInputs, ProbeResult, register_probe


def feature_norm(features: th.Tensor) -> float:
    """Mean L2 norm of the rows of ``features``: ``(1/n) sum_i ||phi_i||_2``.

    :param features: ``(n, d)`` feature matrix, one row per sample, ``n >= 1``.
    :return: the mean norm, ``>= 0`` (computed in float64).
    :raises ValueError: not a finite 2-D tensor with at least one row and one column.
    """
    return check_matrix("features", features).norm(dim=1).mean().item()


@register_probe("feature_norm", "light", ("feature_norm",), "features", order=90)
def _run(inputs: ProbeInputs) -> ProbeResult:
    """Mean L2 norm of the value-head feature vectors over the batch (Plasticine's feature_norm)."""
    return ProbeResult({"feature_norm/value_head": feature_norm(inputs.features)}, {})
