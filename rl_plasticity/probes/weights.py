"""Weight, update and gradient norms, per parameter tensor and in total.

Definitions follow ``docs/reference/metrics.md#weights-updates-and-gradients`` ("Weights and updates"): per layer and
in total,
the L2 norm of the weights, the mean ``|w|``, the distance from the initial weights, the norm of the last
update and the gradient norm before clipping. These are the standard plasticity diagnostics of, e.g.,
Lyle et al. 2023, "Understanding Plasticity in Neural Networks" (parameter norm) and Dohare et al. 2024,
"Loss of plasticity in deep continual learning" (weight magnitude).

Every result is keyed by the parameter's name in ``model.named_parameters()`` (e.g. ``"q_net.0.weight"``),
plus a ``"total"`` entry over all of them. A total norm is the L2 norm of all parameters concatenated,
``sqrt(sum_p ||p||^2)``, not the sum of the per-parameter norms. Norms are computed in float64.
"""

from __future__ import annotations

import math

import torch as th
from torch import nn

from rl_plasticity.probes._checks import check_finite
from rl_plasticity.probes.registry import ProbeSpec, add_probe

__all__ = ["grad_stats", "snapshot", "update_stats", "weight_stats"]

TOTAL = "total"


def _named_parameters(model: nn.Module) -> dict[str, th.Tensor]:
    """The model's parameters by name; ``"total"`` is reserved for the totals."""
    params: dict[str, th.Tensor] = dict(model.named_parameters())
    if TOTAL in params:
        raise ValueError(f"a parameter is named {TOTAL!r}, which clashes with the total entry")
    return params


def _squared_norm(x: th.Tensor) -> float:
    return x.detach().to(th.float64).pow(2).sum().item()


def _matching(name: str, reference: dict[str, th.Tensor], key: str, like: th.Tensor) -> th.Tensor:
    """``reference[key]``, checked to exist and to have ``like``'s shape, on ``like``'s device."""
    if key not in reference:
        raise ValueError(f"{name} has no entry for parameter {key!r}")
    value = reference[key]
    if value.shape != like.shape:
        raise ValueError(f"{name}[{key!r}] has shape {tuple(value.shape)}, the parameter {tuple(like.shape)}")
    return value.detach().to(device=like.device)


@th.no_grad()
def snapshot(model: nn.Module) -> dict[str, th.Tensor]:
    """Detached copies of the model's parameters, by name: the ``init_params`` or ``before`` of the stats.

    :param model: the network.
    :return: ``{name: tensor}``, clones on the parameters' devices, not sharing their memory.
    """
    return {name: p.detach().clone() for name, p in _named_parameters(model).items()}


@th.no_grad()
def weight_stats(model: nn.Module, init_params: dict[str, th.Tensor] | None = None) -> dict[str, dict[str, float]]:
    """Norm, mean magnitude and distance from initialisation of the weights.

    Per parameter tensor ``w`` (``k`` entries) and for all of them together::

        l2_norm = ||w||_2,   mean_abs = (1/k) sum |w_j|,   dist_from_init = ||w - w_init||_2

    The totals are ``sqrt(sum_p ||p||^2)``, ``sum_p sum_j |p_j| / sum_p k_p`` (the mean over all weights)
    and ``sqrt(sum_p ||p - p_init||^2)``.

    :param model: the network.
    :param init_params: the initial parameters, as returned by :func:`snapshot` at initialisation; when
        given, ``dist_from_init`` is reported.
    :return: ``{name: {"l2_norm", "mean_abs"[, "dist_from_init"]}}`` plus ``"total"``.
    :raises ValueError: a parameter has NaN/inf entries, or ``init_params`` misses one or has a wrong shape.
    """
    stats: dict[str, dict[str, float]] = {}
    total_squares, total_abs, total_count, total_dist_squares = 0.0, 0.0, 0, 0.0
    for name, p in _named_parameters(model).items():
        check_finite(name, p)
        w = p.detach().to(th.float64)
        squares, abs_sum = w.pow(2).sum().item(), w.abs().sum().item()
        entry = {"l2_norm": math.sqrt(squares), "mean_abs": abs_sum / max(w.numel(), 1)}
        total_squares, total_abs, total_count = total_squares + squares, total_abs + abs_sum, total_count + w.numel()
        if init_params is not None:
            dist_squares = _squared_norm(w - _matching("init_params", init_params, name, p).to(th.float64))
            entry["dist_from_init"] = math.sqrt(dist_squares)
            total_dist_squares += dist_squares
        stats[name] = entry
    stats[TOTAL] = {"l2_norm": math.sqrt(total_squares), "mean_abs": total_abs / max(total_count, 1)}
    if init_params is not None:
        stats[TOTAL]["dist_from_init"] = math.sqrt(total_dist_squares)
    return stats


@th.no_grad()
def update_stats(before: dict[str, th.Tensor], after: dict[str, th.Tensor]) -> dict[str, float]:
    """L2 norm of the last update ``after - before``, per parameter and in total.

    ``||after_p - before_p||_2`` per parameter, and ``sqrt(sum_p ||after_p - before_p||^2)`` in total.

    :param before: the parameters before the update, from :func:`snapshot`.
    :param after: the parameters after it, from :func:`snapshot`.
    :return: ``{name: norm}`` plus ``"total"``.
    :raises ValueError: the two have different names or shapes, or NaN/inf entries.
    """
    if before.keys() != after.keys():
        raise ValueError(f"before and after name different parameters: {sorted(before.keys() ^ after.keys())}")
    if TOTAL in after:
        raise ValueError(f"a parameter is named {TOTAL!r}, which clashes with the total entry")
    stats: dict[str, float] = {}
    total_squares = 0.0
    for name, new in after.items():
        check_finite(name, new)
        old = _matching("before", before, name, new)
        check_finite(name, old)
        squares = _squared_norm(new.to(th.float64) - old.to(th.float64))
        stats[name] = math.sqrt(squares)
        total_squares += squares
    stats[TOTAL] = math.sqrt(total_squares)
    return stats


@th.no_grad()
def grad_stats(model: nn.Module, clip_coef: float = 1.0) -> dict[str, float]:
    """L2 norm of the gradients before clipping, per parameter and in total.

    Gradient-norm clipping (``torch.nn.utils.clip_grad_norm_``, as SB3 uses it) multiplies every gradient
    by the same factor ``clip_coef = min(1, max_norm / (total_norm + 1e-6))``. Read after clipping, the
    pre-clip norm is therefore the stored norm divided by ``clip_coef``::

        grad_norm_p = ||p.grad||_2 / clip_coef,   total = sqrt(sum_p ||p.grad||^2) / clip_coef

    Pass ``clip_coef = 1`` (the default) when the gradients were not clipped or are read before clipping.
    Parameters without a gradient (``p.grad is None``: frozen or unused) are left out of the result and of
    the total; the total is 0 if no parameter has one.

    :param model: the network, after ``backward()``.
    :param clip_coef: the factor clipping multiplied the gradients by, in ``(0, 1]``.
    :return: ``{name: norm}`` plus ``"total"``.
    :raises ValueError: ``clip_coef`` out of range, or a gradient with NaN/inf entries.
    """
    if not (0.0 < clip_coef <= 1.0):
        raise ValueError(f"clip_coef must be in (0, 1], got {clip_coef}")
    stats: dict[str, float] = {}
    total_squares = 0.0
    for name, p in _named_parameters(model).items():
        if p.grad is None:
            continue
        check_finite(f"{name}.grad", p.grad)
        squares = _squared_norm(p.grad)
        stats[name] = math.sqrt(squares) / clip_coef
        total_squares += squares
    stats[TOTAL] = math.sqrt(total_squares) / clip_coef
    return stats


add_probe(
    ProbeSpec(
        "weights",
        "Weight norms, distance from init, and update and gradient norms per parameter (the monitor's own)",
        "light",
        ("weight_l2_norm", "weight_mean_abs", "weight_dist_from_init", "update_norm", "grad_norm"),
        "weights",
        charts=(
            ("weight norms", "weight_l2_norm/.*"),
            ("distance from init", "weight_dist_from_init/.*"),
            ("update norms", "update_norm/.*"),
            ("gradient norms", "grad_norm/.*"),
        ),
        order=80,
    )
)
