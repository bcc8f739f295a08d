"""Correlation between value-head neural collapse (NC1) and return, across task visits.

The seed paper's finding to compare with: in its continual setting NC1 and per-task return correlate
negatively (r = -0.94). Here each point is one complete task visit of one continual run: NC1 of the
value-head features on the task's fixed probe set at the end of the visit, against the visit's return: the
evaluation return at its end when the runs have one, else the mean training return over the visit. Returns of different
games have different scales, so besides the pooled correlation the
table gives it within each task, and pooled over tasks after dividing each return by the fresh-network
arm's mean return on that task (when the sweep has that arm).

Pearson's r with its 95% interval (Fisher's z, ``scipy.stats.pearsonr(...).confidence_interval()``) and
two-sided p-value, and Spearman's rank correlation with its p-value (``scipy.stats.spearmanr``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

from rl_plasticity.report.stats import CONFIDENCE

COLUMNS = ["scope", "return", "n", "pearson_r", "ci_low", "ci_high", "p_value", "spearman_rho", "spearman_p"]


def correlation_row(scope: str, what: str, nc1: np.ndarray, returns: np.ndarray) -> dict[str, object]:
    """One row of the table: Pearson (with its 95% interval) and Spearman correlation of ``nc1`` and
    ``returns`` over their finite pairs; NaN where there are too few pairs (fewer than 3) or no spread."""
    nc1, returns = np.asarray(nc1, dtype=float), np.asarray(returns, dtype=float)
    keep = np.isfinite(nc1) & np.isfinite(returns)
    x, y = nc1[keep], returns[keep]
    row: dict[str, object] = {"scope": scope, "return": what, "n": int(keep.sum())}
    nan = float("nan")
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return {**row, **dict.fromkeys(COLUMNS[3:], nan)}
    pearson = stats.pearsonr(x, y)
    interval = pearson.confidence_interval(confidence_level=CONFIDENCE)
    spearman = stats.spearmanr(x, y)
    return {
        **row,
        "pearson_r": float(pearson.statistic),
        "ci_low": float(interval.low),
        "ci_high": float(interval.high),
        "p_value": float(pearson.pvalue),
        "spearman_rho": float(spearman.statistic),
        "spearman_p": float(spearman.pvalue),
    }


#: How the table names each return column.
RETURN_NAMES = {
    "eval_mean": "eval return over the visit",
    "eval_return": "eval return at the visit's end",
    "mean_return": "mean return",
}


def fresh_baseline(done: pd.DataFrame, column: str) -> pd.Series:
    """Task -> the fresh networks' mean ``column`` on it (empty without a fresh run), from complete visit rows."""
    fresh = done[done["kind"] == "fresh"]
    return pd.to_numeric(fresh[column], errors="coerce").groupby(fresh["task"]).mean()


def relative_to_fresh(returns: np.ndarray, tasks: pd.Series, baseline: pd.Series) -> np.ndarray:
    """Each return divided by the fresh baseline of its task; NaN where the baseline is missing or not positive."""
    scale = tasks.map(baseline).to_numpy(dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(scale > 0, np.asarray(returns, dtype=float) / scale, np.nan)


def nc1_return_correlations(rows: pd.DataFrame, column: str = "mean_return") -> pd.DataFrame:
    """The table described in the module docstring, from the report's per-run visit rows.

    :param rows: one row per run and task visit, with ``arm, kind, task, complete, nc1`` and ``column``
        (the report's ``visits_by_run.csv``).
    :param column: the return: ``eval_mean`` (evaluation over the visit), ``eval_return`` (at its end) or
        ``mean_return`` (training).
    :return: columns :data:`COLUMNS`; empty when no visit has both values.
    """
    if rows.empty or "nc1" not in rows or column not in rows:
        return pd.DataFrame(columns=COLUMNS)
    name = RETURN_NAMES.get(column, column)
    done = rows[rows["complete"].astype(bool)]
    continual = done[done["kind"] != "fresh"]
    nc1 = pd.to_numeric(continual["nc1"], errors="coerce")
    ret = pd.to_numeric(continual[column], errors="coerce")
    out = [correlation_row("all visits", name, nc1.to_numpy(), ret.to_numpy())]

    if (done["kind"] == "fresh").any():
        relative = relative_to_fresh(ret.to_numpy(), continual["task"], fresh_baseline(done, column))
        out.append(correlation_row("all visits", f"{name} / fresh {name}", nc1.to_numpy(), relative))
    for task in continual["task"].unique():
        mine = continual["task"] == task
        out.append(correlation_row(f"task {task}", name, nc1[mine].to_numpy(), ret[mine].to_numpy()))
    return pd.DataFrame(out, columns=COLUMNS)
