"""Dormant and active units of one layer, from its post-activation values.

``H`` is either ``(n, d)`` (a dense layer: ``n`` samples, ``d`` units) or ``(n, C, H, W)`` (a conv layer).
For a conv layer each channel is one unit, and ``|H|`` is averaged over the spatial positions as well as
the samples, as ReDo does for conv layers (Sokar et al. 2023); a channel is non-zero on a sample if it is
non-zero at any of its positions. Definitions follow ``docs/reference/metrics.md#dormant-and-active-units`` ("Dormant
and
active units").
"""

from __future__ import annotations

import torch as th

from rl_plasticity.probes._checks import check_matrix, check_threshold
from rl_plasticity.probes.registry import ProbeInputs, ProbeResult, register_probe

__all__ = ["active_fraction", "dormant_fraction", "mean_active_fraction", "unit_scores"]


def _abs_per_unit(H: th.Tensor) -> th.Tensor:
    """Validate ``H`` and return ``|H|`` as ``(n, units, positions)``: ``positions`` is 1 for a dense layer."""
    if isinstance(H, th.Tensor) and H.dim() == 4:
        n, channels, height, width = H.shape
        if height * width == 0:
            raise ValueError(f"H has no spatial positions, got shape {tuple(H.shape)}")
        # check_matrix validates samples, channels and finiteness on the flattened view.
        flat = check_matrix("H", H.reshape(n, channels * height * width))
        return flat.reshape(n, channels, height * width).abs()
    if isinstance(H, th.Tensor) and H.dim() != 2:
        raise ValueError(f"H must be (n, d) or (n, C, H, W), got shape {tuple(H.shape)}")
    return check_matrix("H", H).abs().unsqueeze(-1)


@th.no_grad()
def unit_scores(H: th.Tensor) -> th.Tensor:
    """Normalised activation score of every unit of a layer.

    Sokar et al. 2023, "The Dormant Neuron Phenomenon in Deep Reinforcement Learning" (ReDo)::

        s_i = mean_x |H_{x,i}| / ((1/d) sum_k mean_x |H_{x,k}|)

    For conv activations ``(n, C, H, W)`` the mean runs over samples and spatial positions, one score per
    channel. The scores average to 1. A layer whose activations are all zero has the 0/0 score defined
    as 0 for every unit, so that every unit is dormant.

    :param H: post-activation values, ``(n, d)`` or ``(n, C, H, W)``.
    :return: the ``d`` (or ``C``) scores, float64, on ``H``'s device.
    :raises ValueError: wrong shape, no samples, or NaN/inf entries.
    """
    mean_abs = _abs_per_unit(H).mean(dim=(0, 2))
    layer_mean = mean_abs.mean()
    if layer_mean <= 0:
        return th.zeros_like(mean_abs)
    return mean_abs / layer_mean


@th.no_grad()
def dormant_fraction(H: th.Tensor, tau: float = 0.025) -> float:
    """Fraction of the layer's units that are tau-dormant, i.e. whose score ``s_i <= tau``.

    Sokar et al. 2023 (ReDo): ``s_i`` as in :func:`unit_scores`; the default ``tau = 0.025`` is the
    paper's, and ReDo's code uses ``tau = 0.1`` in its performance setting. With ``tau = 0`` only units that
    are exactly zero on every sample (and position) count. An all-zero layer is entirely dormant.

    :param H: post-activation values, ``(n, d)`` or ``(n, C, H, W)``.
    :param tau: dormancy threshold, ``>= 0``.
    :return: the dormant fraction, in ``[0, 1]``.
    """
    check_threshold("tau", tau)
    return (unit_scores(H) <= tau).double().mean().item()


@th.no_grad()
def active_fraction(H: th.Tensor) -> float:
    """Fraction of the layer's units that are non-zero on at least one sample of the batch.

    For ReLU layers, a unit that is zero on the whole batch is dead on it::

        active_fraction = (1/d) #{ i : exists x, H_{x,i} != 0 }

    Compare :func:`mean_active_fraction`, the per-sample version.

    :param H: post-activation values, ``(n, d)`` or ``(n, C, H, W)``.
    :return: the active fraction, in ``[0, 1]``.
    """
    nonzero = _abs_per_unit(H) > 0
    return nonzero.any(dim=2).any(dim=0).double().mean().item()


@th.no_grad()
def mean_active_fraction(H: th.Tensor) -> float:
    """Per-sample mean of the fraction of the layer's units that are non-zero.

    As reported by Dohare et al. 2024, "Loss of plasticity in deep continual learning"::

        mean_active_fraction = (1/n) sum_x (1/d) #{ i : H_{x,i} != 0 }

    It is at most :func:`active_fraction`: a unit that fires on a single sample is active for the batch
    but adds only ``1/n`` of a unit here.

    :param H: post-activation values, ``(n, d)`` or ``(n, C, H, W)``.
    :return: the mean active fraction, in ``[0, 1]``.
    """
    nonzero = _abs_per_unit(H) > 0
    return nonzero.any(dim=2).double().mean().item()


@register_probe(
    "dormant",
    "light",
    ("dormant", "active_fraction", "mean_active_fraction"),
    "dormancy",
    charts=(("dormant fraction", "dormant/.*"), ("active fraction", "(mean_)?active_fraction/.*")),
    main=(("dormant", "dormant fraction"),),
    order=20,
)
def _run(inputs: ProbeInputs, dormant_tau: float = 0.025) -> ProbeResult:
    """Dormant and active fractions of every activation layer (Sokar et al. 2023 tau-dormancy)."""
    scalars: dict[str, float] = {}
    for name, h in inputs.activations.items():
        scalars[f"dormant/{name}"] = dormant_fraction(h, tau=dormant_tau)
        scalars[f"active_fraction/{name}"] = active_fraction(h)
        scalars[f"mean_active_fraction/{name}"] = mean_active_fraction(h)
    return ProbeResult(scalars, {})
