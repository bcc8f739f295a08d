"""Do the probes warn before the return falls? Each probe at a task switch against the next visit's return.

A probe is useful as a warning of lost plasticity if its value on the network that *meets* a task predicts how
well that network then learns the task. Each point here is one pair of consecutive complete task visits of one
continual run: the probe at the end of the earlier visit (the network at the switch, on the earlier task's fixed
probe set: the last value before the new task's data reaches it) against the later visit's main return, divided
by the fresh networks' mean return on the later task (so tasks of different scales pool; raw when the sweep has
no fresh arm).

Three correlations per probe (Pearson's r, 95% interval by Fisher's z, two-sided p):

- **pooled** over every pair of every arm. Arms that differ in both the probe and the return make it large even
  when, inside an arm, the probe says nothing about which run or task goes worse: it ranks interventions.
- **within arms**: the partial correlation given the arm (both values centred on their arm's mean). What is left
  mixes the seeds with the switches: the trend over the sequence and the differences between tasks stay in.
- **within arm and switch**: the partial correlation given the arm and the switch's place in the run (centred
  on each cell's mean, so only the seeds of one arm at one switch are compared): does a probe tell which run of a
  method will learn the next task better?

For a partial correlation given ``g`` group means the interval's standard error is ``1 / sqrt(n - g - 2)`` and
the t-test has ``n - g - 1`` degrees of freedom. A first row, ``(return at the switch)``, puts the earlier visit's
return (relative to fresh on its own task) in the probe's place: a probe that predicts no better than the return
already does moves with the return, not before it.

Spearman's rank correlation of the pooled pairs is given beside, as a check against a few extreme points.
Pairs of one run are not independent, so every interval is optimistic; and every probe column is tested, so
some pass p < 0.05 by chance (the columns are correlated, so not simply one in 20). Where the tasks are different
games, the switches into each game differ in both probe and return for the game's sake, so the table is clearest
on a family of like tasks.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

from rl_plasticity.probes.registry import probe_tag_prefixes
from rl_plasticity.report.correlation import RETURN_NAMES, correlation_row, fresh_baseline, relative_to_fresh
from rl_plasticity.report.stats import CONFIDENCE

#: The reference row: the return at the switch in a probe's place.
RETURN_AT_SWITCH = "(return at the switch)"
_CONTROLS = ("within", "switch")  # within arms; within arm and switch
COLUMNS = [
    "probe",
    "return",
    "n",
    "arms",
    "pearson_r",
    "ci_low",
    "ci_high",
    "p_value",
    "spearman_rho",
    *(f"{c}_{s}" for c in _CONTROLS for s in ("r", "ci_low", "ci_high", "p")),
]
#: A tag the probes log that is not a measure of the network: NC's count of classes on the probe set.
_NOT_MEASURES = ("num_classes/",)


def probe_columns(rows: pd.DataFrame) -> list[str]:
    """The per-layer probe columns of the report's visit rows (``<tag>/<layer>`` of a registered probe's tag),
    in their order."""
    tags = tuple(t for t in probe_tag_prefixes() if t not in _NOT_MEASURES)
    return [c for c in rows.columns if c.startswith(tags) and pd.api.types.is_numeric_dtype(rows[c])]


def switch_pairs(rows: pd.DataFrame, column: str) -> pd.DataFrame:
    """Consecutive complete visits of each continual run: one row per switch.

    :param rows: the report's visit rows (``visits_by_run.csv``): ``run, kind, arm, task, start_step, end_step,
        complete``, the probe columns and ``column``.
    :param column: the return (``eval_mean``, ``eval_return`` or ``mean_return``).
    :return: ``arm, run, task`` (the later visit's), ``from_task`` (the earlier visit's), ``switch`` (the later
        visit's place in its run: 1 for the first switch), ``next_return`` and :data:`RETURN_AT_SWITCH` (the
        earlier visit's), both relative to fresh on their own task when there is a fresh arm, ``relative`` (bool)
        and every probe column taken from the earlier visit.
    """
    probes = probe_columns(rows)
    done = rows[rows["complete"].astype(bool)]
    continual = done[done["kind"] != "fresh"].sort_values(["run", "start_step"])
    out = []
    for _, visits in continual.groupby("run", sort=False):
        for (_, before), (_, after) in zip(visits.iloc[:-1].iterrows(), visits.iloc[1:].iterrows()):
            if before["end_step"] != after["start_step"]:  # a visit in between is incomplete
                continue
            out.append(
                {
                    "arm": after["arm"],
                    "run": after["run"],
                    "task": after["task"],
                    "from_task": before["task"],
                    "switch": int((visits["start_step"] < after["start_step"]).sum()),
                    "next_return": float(after[column]),
                    RETURN_AT_SWITCH: float(before[column]),
                }
                | {p: float(before[p]) for p in probes}
            )
    columns = ["arm", "run", "task", "from_task", "switch", "next_return", RETURN_AT_SWITCH, *probes]
    frame = pd.DataFrame(out, columns=columns)
    relative = bool((done["kind"] == "fresh").any())
    if relative:
        baseline = fresh_baseline(done, column)
        frame["next_return"] = relative_to_fresh(frame["next_return"].to_numpy(), frame["task"], baseline)
        frame[RETURN_AT_SWITCH] = relative_to_fresh(frame[RETURN_AT_SWITCH].to_numpy(), frame["from_task"], baseline)
    return frame.assign(relative=relative)


def partial_correlation(x: np.ndarray, y: np.ndarray, groups: np.ndarray) -> tuple[float, float, float, float]:
    """Partial correlation of ``x`` and ``y`` given the group means: r, its 95% interval and two-sided p.

    Both are centred on their group's mean (least squares with one intercept per group); NaN with fewer than
    2 residual degrees of freedom or no spread left.
    """
    nan = (float("nan"),) * 4
    dof = len(x) - len(np.unique(groups)) - 1
    if dof < 2:
        return nan
    xc = x - pd.Series(x).groupby(groups).transform("mean").to_numpy()
    yc = y - pd.Series(y).groupby(groups).transform("mean").to_numpy()
    if np.ptp(xc) < 1e-12 * max(1.0, np.abs(x).max()) or np.ptp(yc) < 1e-12 * max(1.0, np.abs(y).max()):
        return nan
    r = float(np.clip(np.corrcoef(xc, yc)[0, 1], -1.0, 1.0))
    half = stats.norm.ppf(0.5 + CONFIDENCE / 2) / np.sqrt(dof - 1)
    low, high = np.tanh(np.arctanh(np.clip(r, -0.999999, 0.999999)) + np.array([-half, half]))
    t = r * np.sqrt(dof / max(1.0 - r * r, 1e-300))
    return r, float(low), float(high), float(2 * stats.t.sf(abs(t), dof))


def probe_lead_correlations(rows: pd.DataFrame, column: str = "mean_return") -> pd.DataFrame:
    """The table of the module docstring: the return at the switch first, then the probe columns, strongest
    pooled correlation first.

    :param rows: the report's per-run visit rows (``visits_by_run.csv``).
    :param column: the return, as in :func:`~rl_plasticity.report.correlation.nc1_return_correlations`.
    :return: columns :data:`COLUMNS`; empty without a switch between two complete visits.
    """
    needed = {"run", "kind", "arm", "task", "start_step", "end_step", "complete", column}
    if rows.empty or not needed.issubset(rows.columns):
        return pd.DataFrame(columns=COLUMNS)
    pairs = switch_pairs(rows, column)
    if pairs.empty:
        return pd.DataFrame(columns=COLUMNS)
    name = RETURN_NAMES.get(column, column)
    what = f"next visit's {name}" + (" / fresh" if bool(pairs["relative"].iloc[0]) else "")
    y_all = pairs["next_return"].to_numpy(dtype=float)
    cells = (pairs["arm"].astype(str) + "|" + pairs["switch"].astype(str)).to_numpy()
    out = []
    for probe in [RETURN_AT_SWITCH, *probe_columns(pairs)]:
        x_all = pairs[probe].to_numpy(dtype=float)
        keep = np.isfinite(x_all) & np.isfinite(y_all)
        x, y, arms = x_all[keep], y_all[keep], pairs["arm"].to_numpy()[keep]
        pooled = correlation_row(probe, what, x, y)
        row = {
            "probe": probe,
            "return": what,
            "n": pooled["n"],
            "arms": len(np.unique(arms)),
            **{k: pooled[k] for k in ("pearson_r", "ci_low", "ci_high", "p_value", "spearman_rho")},
        }
        for control, groups in zip(_CONTROLS, (arms, cells[keep])):
            values = partial_correlation(x, y, groups)
            row |= dict(zip((f"{control}_{s}" for s in ("r", "ci_low", "ci_high", "p")), values))
        out.append(row)
    table = pd.DataFrame(out, columns=COLUMNS)
    probes = table.iloc[1:]
    order = probes["pearson_r"].abs().fillna(-1).sort_values(ascending=False, kind="stable").index
    return pd.concat([table.iloc[:1], probes.loc[order]]).reset_index(drop=True)
