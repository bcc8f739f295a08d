"""Input checks shared by the probes: every bad input is a ``ValueError`` that says what was wrong."""

from __future__ import annotations

import torch as th


def check_matrix(name: str, x: th.Tensor, min_rows: int = 1) -> th.Tensor:
    """Check that ``x`` is a finite 2-D ``(n, d)`` tensor with at least ``min_rows`` rows.

    :return: ``x`` detached, in float64 on its own device (ranks and spectra need the precision).
    :raises ValueError: wrong type or shape, too few rows, or NaN/inf entries.
    """
    if not isinstance(x, th.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D (n samples, d units), got shape {tuple(x.shape)}")
    if x.shape[0] < min_rows:
        raise ValueError(f"{name} needs at least {min_rows} samples, got {x.shape[0]}")
    if x.shape[1] < 1:
        raise ValueError(f"{name} needs at least one column, got shape {tuple(x.shape)}")
    if not th.isfinite(x).all():
        raise ValueError(f"{name} has NaN or inf entries")
    return x.detach().to(th.float64)


def check_finite(name: str, x: th.Tensor) -> None:
    """Raise ``ValueError`` if ``x`` has NaN or inf entries."""
    if not th.isfinite(x).all():
        raise ValueError(f"{name} has NaN or inf entries")


def check_threshold(name: str, value: float, low: float = 0.0, high: float | None = None) -> None:
    """Raise ``ValueError`` unless ``low <= value`` (and ``value <= high`` when given)."""
    if not (value >= low and (high is None or value <= high)):
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be in {bound}, got {value}")
