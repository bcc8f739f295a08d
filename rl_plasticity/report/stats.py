"""Statistics over seeds: mean with a 95% percentile-bootstrap interval, and the interquartile mean.

The interval is SciPy's ``scipy.stats.bootstrap`` (percentile method, seeded); the IQM is
``scipy.stats.trim_mean(x, 0.25)``, the definition rliable uses (Agarwal et al. 2021): the mean of the
middle 50% of the values. NaN values (a probe undefined in a run, a curve a run has not reached yet) are
left out, and ``n`` says how many values remained.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Summary:
    """Mean, 95% bootstrap interval and IQM of the finite values (NaN interval with fewer than two)."""

    n: int
    mean: float
    ci_low: float
    ci_high: float
    iqm: float

    @classmethod
    def empty(cls) -> Summary:
        """No finite value: n = 0 and every statistic NaN."""
        nan = float("nan")
        return cls(0, nan, nan, nan, nan)


def iqm(values: np.ndarray) -> float:
    """Interquartile mean (rliable's ``IQM``): ``trim_mean(values, 0.25)`` over the finite values."""
    x = _finite(values)
    return float(stats.trim_mean(x, 0.25)) if len(x) else float("nan")


def summarize(values: np.ndarray, n_resamples: int = 10_000, seed: int = 0) -> Summary:
    """:class:`Summary` of the finite values: the mean's interval is a seeded percentile bootstrap."""
    x = _finite(values)
    if len(x) == 0:
        return Summary.empty()
    low, high = _bootstrap(x[:, None], n_resamples, seed)
    return Summary(len(x), float(np.mean(x)), float(low[0]), float(high[0]), iqm(x))


def relative_summary(
    returns: np.ndarray, tasks: np.ndarray, fresh: np.ndarray, n_resamples: int = 10_000, seed: int = 0
) -> Summary:
    """:class:`Summary` of each run's mean return relative to a fresh network, over runs.

    A run's value is the mean over its visits ``v`` of ``returns[run, v] / b[tasks[run, v]]``, where ``b`` is the
    fresh networks' mean return on each task (over their seeds; NaN where it is not positive). The interval
    resamples the runs and the fresh seeds independently (SciPy's two-sample percentile bootstrap), so the
    uncertainty of the baseline is in it too; with one fresh seed the baseline is taken as exact.

    :param returns: runs x visits.
    :param tasks: runs x visits, the column of ``fresh`` for each visit's task.
    :param fresh: fresh seeds x tasks, complete (a resample must have a baseline for every task).
    """
    returns, tasks, fresh = np.asarray(returns, dtype=float), np.asarray(tasks, dtype=int), np.asarray(fresh, float)

    def relative(runs: np.ndarray, seeds: np.ndarray) -> float:
        with np.errstate(invalid="ignore", divide="ignore"):
            base = np.mean(fresh[np.asarray(seeds, dtype=int)], axis=0)
            base = np.where(base > 0, base, np.nan)
            rows = np.asarray(runs, dtype=int)
            return float(np.mean(np.mean(returns[rows] / base[tasks[rows]], axis=1)))

    everyone = np.arange(len(fresh))
    per_run = np.array([relative(np.array([i]), everyone) for i in range(len(returns))])
    x = _finite(per_run)
    if len(x) == 0:
        return Summary.empty()
    low = high = float("nan")
    if len(x) >= 2 and len(x) == len(per_run):
        data = (np.arange(len(returns)),) + ((everyone,) if len(fresh) >= 2 else ())
        statistic = relative if len(fresh) >= 2 else (lambda runs: relative(runs, everyone))
        result = stats.bootstrap(
            data,
            statistic,
            paired=False,
            vectorized=False,
            n_resamples=n_resamples,
            confidence_level=CONFIDENCE,
            method="percentile",
            rng=np.random.default_rng(seed),
        )
        low, high = float(result.confidence_interval.low), float(result.confidence_interval.high)
    return Summary(len(x), float(np.mean(x)), low, high, iqm(x))


def band(matrix: np.ndarray, n_resamples: int = 2_000, seed: int = 0) -> dict[str, np.ndarray]:
    """Per column of ``matrix`` (runs x points): ``n``, ``mean``, ``ci_low``, ``ci_high`` over the finite runs.

    Columns are bootstrapped in groups that share the same finite runs, so a run that stops early (an
    incomplete one) leaves the interval of the points it has not reached to the others.
    """
    matrix = np.atleast_2d(np.asarray(matrix, dtype=float))
    finite = np.isfinite(matrix)
    n = finite.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(n > 0, np.nansum(np.where(finite, matrix, 0.0), axis=0) / np.maximum(n, 1), np.nan)
    low = np.full(matrix.shape[1], np.nan)
    high = np.full(matrix.shape[1], np.nan)
    patterns: dict[bytes, list[int]] = {}
    for col in np.flatnonzero(n >= 2):
        patterns.setdefault(finite[:, col].tobytes(), []).append(int(col))
    for key, cols in patterns.items():
        rows = np.frombuffer(key, dtype=bool)
        low[cols], high[cols] = _bootstrap(matrix[np.ix_(rows, cols)], n_resamples, seed)
    return {"n": n, "mean": mean, "ci_low": low, "ci_high": high}


def _bootstrap(samples: np.ndarray, n_resamples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Percentile-bootstrap interval of the mean of each column (samples x columns); NaN with < 2 samples."""
    if samples.shape[0] < 2:
        return np.full(samples.shape[1], np.nan), np.full(samples.shape[1], np.nan)
    result = stats.bootstrap(
        (samples,),
        np.mean,
        axis=0,
        vectorized=True,
        n_resamples=n_resamples,
        confidence_level=CONFIDENCE,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    return np.asarray(result.confidence_interval.low), np.asarray(result.confidence_interval.high)


def _finite(values: np.ndarray) -> np.ndarray:
    x = np.asarray(values, dtype=float).ravel()
    return x[np.isfinite(x)]


def interpolate(steps: np.ndarray, values: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """``values`` logged at ``steps``, linearly interpolated onto ``grid``; NaN outside the logged range
    (no extrapolation: an incomplete run has no value past its last log)."""
    steps, values = np.asarray(steps, dtype=float), np.asarray(values, dtype=float)
    keep = np.isfinite(values)
    steps, values = steps[keep], values[keep]
    out = np.full(len(grid), np.nan)
    if len(steps) == 0:
        return out
    order = np.argsort(steps, kind="stable")
    steps, values = steps[order], values[order]
    inside = (grid >= steps[0]) & (grid <= steps[-1])
    out[inside] = np.interp(grid[inside], steps, values)
    return out
