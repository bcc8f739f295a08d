"""From runs to the report's numbers: per task visit and arm, statistics over seeds; per arm, curves on a
common step grid with a bootstrap band; the fresh-network arm aligned to the continual arms by task.

The fresh arm (one run per task and seed, each on that task alone) is matched to a continual visit by task
name: its numbers stand beside every visit of that task, and its curves are shifted to start where the
continual runs first meet the task.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from rl_plasticity.report.runs import EVAL_RETURN, MAIN_PROBES, TRAIN_RETURN, RunData
from rl_plasticity.report.stats import Summary, band, interpolate, relative_summary, summarize

#: Per-visit returns: the evaluation return over the visit (mean of its rounds) and at its end, then the
#: training returns over the visit (mean over its episodes, and over its last 10).
RETURN_METRICS = ("eval_mean", "eval_return", "mean_return", "final_return")


def main_return(rows: pd.DataFrame) -> str:
    """The report's main return: the first of :data:`RETURN_METRICS` that some run has (``eval_mean``, the
    evaluation return over the visit, for runs with evaluation; else the training ``mean_return``)."""
    for metric in RETURN_METRICS:
        if metric in rows and pd.to_numeric(rows[metric], errors="coerce").notna().any():
            return metric
    return "mean_return"


@dataclass(frozen=True)
class VisitKey:
    """A task visit as the continual runs have it (``start``/``end``: median over the runs that completed it, or
    over all runs while none has)."""

    index: int
    task: str
    visit: int
    start: int
    end: int


def arm_order(runs: list[RunData], preferred: list[str]) -> list[str]:
    """Arms in the sweep's order when known, else sorted with ``none`` first; ``fresh`` always last."""
    arms = {run.arm for run in runs}
    order = [a for a in preferred if a in arms]
    rest = sorted(arms - set(order), key=lambda a: (a != "none", a))
    order += rest
    return [a for a in order if a != "fresh"] + (["fresh"] if "fresh" in arms else [])


def visit_keys(runs: list[RunData]) -> list[VisitKey]:
    """The task visits of the continual runs in step order (or the fresh runs' tasks if there are none)."""
    rows = [run.visits.assign(_run=i) for i, run in enumerate(runs) if run.kind == "continual" and len(run.visits)]
    if rows:
        frame = pd.concat(rows, ignore_index=True)
        # A visit's span from the runs that completed it: a run stopped inside it would pull the median short.
        if "complete" in frame:
            done = frame["complete"].fillna(False).astype(bool)
            frame = frame[done | ~done.groupby([frame["task"], frame["visit"]]).transform("any")]
        grouped = frame.groupby(["task", "visit"], sort=False).agg(
            start=("start_step", "median"), end=("end_step", "median")
        )
        grouped = grouped.sort_values("start").reset_index()
        return [
            VisitKey(i + 1, str(r.task), int(r.visit), int(r.start), int(r.end))
            for i, r in enumerate(grouped.itertuples())
        ]
    tasks: list[str] = []
    for run in runs:
        if run.task is not None and run.task not in tasks:
            tasks.append(run.task)
    return [VisitKey(i + 1, task, 1, 0, 0) for i, task in enumerate(tasks)]


def _metric_columns(frame: pd.DataFrame) -> list[str]:
    columns = [m for m in (*RETURN_METRICS, *MAIN_PROBES) if m in frame]
    columns += sorted(c for c in frame.columns if any(c.startswith(f"{p}/") for p in MAIN_PROBES))
    return columns


def visit_rows(runs: list[RunData]) -> pd.DataFrame:
    """Every run's visits in one table, with its arm, seed, kind and directory."""
    frames = []
    for run in runs:
        if len(run.visits):
            frames.append(
                run.visits.assign(arm=run.arm, seed=run.seed, kind=run.kind, run=str(run.path), source=run.visit_source)
            )
    if not frames:
        return pd.DataFrame(columns=["arm", "seed", "kind", "run", "task", "visit", "complete"])
    frame = pd.concat(frames, ignore_index=True)
    first = ["arm", "seed", "kind", "task", "visit", "start_step", "end_step", "complete", "source", "run"]
    return frame[[c for c in first if c in frame] + [c for c in frame.columns if c not in first]]


def visit_stats(rows: pd.DataFrame, keys: list[VisitKey], arms: list[str], n_resamples: int, seed: int) -> pd.DataFrame:
    """Per visit, arm and metric: ``n, mean, ci_low, ci_high, iqm`` over the runs whose visit is complete.

    The fresh arm's row for a visit is its runs on that visit's task (each trained on it alone).
    """
    columns = [
        "index",
        "task",
        "visit",
        "start_step",
        "end_step",
        "arm",
        "metric",
        "n",
        "mean",
        "ci_low",
        "ci_high",
        "iqm",
    ]
    out: list[dict[str, object]] = []
    if rows.empty:
        return pd.DataFrame(columns=columns)
    metrics = _metric_columns(rows)
    done = rows[rows["complete"].astype(bool)]
    for key in keys:
        for arm in arms:
            if arm == "fresh":
                sel = done[(done["arm"] == arm) & (done["task"] == key.task)]
            else:
                sel = done[
                    (done["arm"] == arm)
                    & (done["kind"] != "fresh")
                    & (done["task"] == key.task)
                    & (done["visit"] == key.visit)
                ]
            if sel.empty:
                continue
            for metric in metrics:
                values = pd.to_numeric(sel[metric], errors="coerce").to_numpy(dtype=float)
                s = summarize(values, n_resamples, seed)
                out.append(
                    {
                        "index": key.index,
                        "task": key.task,
                        "visit": key.visit,
                        "start_step": key.start,
                        "end_step": key.end,
                        "arm": arm,
                        "metric": metric,
                        "n": s.n,
                        "mean": s.mean,
                        "ci_low": s.ci_low,
                        "ci_high": s.ci_high,
                        "iqm": s.iqm,
                    }
                )
    return pd.DataFrame(out, columns=columns)


def sequence_stats(
    rows: pd.DataFrame, keys: list[VisitKey], arms: list[str], n_resamples: int, seed: int
) -> pd.DataFrame:
    """Per arm, over the visits after the first (those where a network has trained on another task before):
    ``n, mean, ci_low, ci_high, iqm`` over runs of per-run numbers, for each return of :data:`RETURN_METRICS`
    that some run has (the evaluation return at the visit's end, the training mean and final returns).

    - ``eval_return`` (``mean_return``, ``final_return``): the run's mean over these visits of that return
      (raw returns: across different games, the one with larger returns weighs more);
    - ``eval_return/fresh`` (...): the same mean of each visit's return divided by the fresh arm's on that
      task (mean over its seeds); 1 means as good as a new network. Its interval
      resamples the runs and the fresh seeds independently (:func:`~rl_plasticity.report.stats.relative_summary`).

    A continual run counts only if it has completed all ``len(keys)`` visits; its own first visit (by
    step) is left out, so runs whose task order differs (a random order per seed) each drop their own.
    The fresh arm is matched as in :func:`visit_stats` (``arm == "fresh"``): one value per seed and task
    (the mean if a seed has several runs on a task). Only the fresh seeds with a run on every task the
    later visits meet make the baseline and the fresh row; with none, the relative values are undefined.
    """
    columns = ["arm", "metric", "visits", "n", "mean", "ci_low", "ci_high", "iqm"]
    if len(keys) < 2 or rows.empty:
        return pd.DataFrame(columns=columns)
    done = rows[rows["complete"].astype(bool)]
    out = []
    for metric in RETURN_METRICS:
        if metric in done and pd.to_numeric(done[metric], errors="coerce").notna().any():
            out += _sequence_metric(done, metric, keys, arms, n_resamples, seed)
    frame = pd.DataFrame(out, columns=columns)
    order = {arm: i for i, arm in enumerate(arms)}
    return frame.sort_values("arm", key=lambda a: a.map(order), kind="stable").reset_index(drop=True)


def _fresh_by_seed_and_task(done: pd.DataFrame, metric: str) -> pd.DataFrame:
    """The fresh arm's ``metric``, seeds x tasks (the mean where a seed has several runs on a task)."""
    return done[done["arm"] == "fresh"].groupby(["seed", "task"])[metric].mean().unstack("task")


def whole_run_stats(
    rows: pd.DataFrame, keys: list[VisitKey], arms: list[str], metric: str, n_resamples: int, seed: int
) -> pd.DataFrame:
    """Per arm, over runs: each run's mean of ``metric`` over **all** its visits, the first included (every
    task weighs the same when the visits are equally long). For continual MinAtar with ``metric`` =
    ``eval_mean`` this is the summary of C-CHAIN's Table 4: the evaluation return over the whole run, averaged
    over the games. Columns ``arm, metric, visits, n, mean, sem, ci_low, ci_high, iqm, vs_none``: ``sem`` is the
    standard error over runs (``std(ddof=1) / sqrt(n)``, the paper's "+-"), ``vs_none`` the arm's mean over
    ``none``'s (1: the same; C-CHAIN's 29.51 / 22.04 = 1.34).

    Only runs with all ``len(keys)`` visits complete count. The fresh arm's value for a seed is the mean, over
    the keys, of its return on the key's task (a fresh network stands beside every visit of its task); only
    seeds with a run on every such task count.
    """
    columns = ["arm", "metric", "visits", "n", "mean", "sem", "ci_low", "ci_high", "iqm", "vs_none"]
    if not keys or rows.empty or metric not in rows:
        return pd.DataFrame(columns=columns)
    done = rows[rows["complete"].astype(bool)]
    per_arm: dict[str, list[float]] = {}
    for _, run in done[(done["arm"] != "fresh") & (done["kind"] != "fresh")].groupby("run"):
        if len(run) == len(keys):
            per_arm.setdefault(str(run["arm"].iloc[0]), []).append(float(run[metric].astype(float).mean()))
    fresh = _fresh_by_seed_and_task(done, metric)
    wanted = [k.task for k in keys]
    if len(fresh) and set(wanted) <= set(fresh.columns):
        per_arm["fresh"] = fresh[wanted].dropna().astype(float).mean(axis=1).tolist()
    out = []
    for arm in arms:
        values = np.array(per_arm.get(arm, []), dtype=float)
        values = values[np.isfinite(values)]
        if not len(values):
            continue
        s = summarize(values, n_resamples, seed)
        sem = float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else np.nan
        out.append(
            {
                "arm": arm,
                "metric": metric,
                "visits": len(keys),
                "n": s.n,
                "mean": s.mean,
                "sem": sem,
                "ci_low": s.ci_low,
                "ci_high": s.ci_high,
                "iqm": s.iqm,
            }
        )
    frame = pd.DataFrame(out, columns=columns)
    base = frame.loc[frame["arm"] == "none", "mean"]
    frame["vs_none"] = frame["mean"] / float(base.iloc[0]) if len(base) and base.iloc[0] != 0 else np.nan
    return frame


def _sequence_metric(
    done: pd.DataFrame, metric: str, keys: list[VisitKey], arms: list[str], n_resamples: int, seed: int
) -> list[dict[str, object]]:
    """The rows of :func:`sequence_stats` for one per-visit return column (``mean_return``, ``final_return``)."""
    per_arm: dict[str, tuple[list[list[float]], list[list[str]]]] = {}
    continual = done[(done["arm"] != "fresh") & (done["kind"] != "fresh")]
    for _, run in continual.groupby("run"):
        if len(run) != len(keys):
            continue
        later = run.sort_values("start_step").iloc[1:]
        returns, tasks = per_arm.setdefault(str(run["arm"].iloc[0]), ([], []))
        returns.append(later[metric].astype(float).tolist())
        tasks.append(later["task"].astype(str).tolist())
    # The baseline: the fresh seeds with a run on every task these visits meet (so every resample has one).
    fresh = _fresh_by_seed_and_task(done, metric)
    wanted = [k.task for k in keys[1:]]
    needed = sorted({t for _, tasks in per_arm.values() for run in tasks for t in run} | set(wanted))
    fresh = fresh[[t for t in needed if t in fresh.columns]].dropna()
    if list(fresh.columns) != needed:
        fresh = fresh.iloc[0:0]
    fresh_matrix = fresh.to_numpy(dtype=float)  # fresh seeds x needed tasks
    column = {task: j for j, task in enumerate(fresh.columns)}
    for _, values in fresh.iterrows():  # a fresh network meets each task once: it stands for every visit
        returns, tasks = per_arm.setdefault("fresh", ([], []))
        returns.append([float(values[task]) for task in wanted])
        tasks.append(wanted)

    out = []
    for arm in arms:
        if arm not in per_arm:
            continue
        returns = np.array(per_arm[arm][0], dtype=float)
        raw = summarize(returns.mean(axis=1), n_resamples, seed)
        if len(fresh_matrix):
            index = np.array([[column[t] for t in run] for run in per_arm[arm][1]])
            rel = relative_summary(returns, index, fresh_matrix, n_resamples, seed)
        else:
            rel = Summary.empty()
        for name, s in ((metric, raw), (f"{metric}/fresh", rel)):
            out.append(
                {
                    "arm": arm,
                    "metric": name,
                    "visits": returns.shape[1],
                    "n": s.n,
                    "mean": s.mean,
                    "ci_low": s.ci_low,
                    "ci_high": s.ci_high,
                    "iqm": s.iqm,
                }
            )
    return out


def fresh_offsets(runs: list[RunData], keys: list[VisitKey]) -> dict[str, int]:
    """Step at which the continual runs first meet each task (the fresh arm's curves start there)."""
    offsets: dict[str, int] = {}
    for key in keys:
        offsets.setdefault(key.task, key.start)
    for run in runs:  # tasks the continual runs never reached: where the schedule would put them
        if run.kind == "fresh" and run.task is not None and run.task not in offsets:
            index = run.tasks.index(run.task) if run.task in run.tasks else 0
            offsets[run.task] = index * (run.switch_every or 0)
    return offsets


def step_grid(runs: list[RunData], offsets: dict[str, int], points: int) -> np.ndarray:
    """``points`` steps from 0 to the longest run (fresh runs counted where they are placed)."""
    ends = [max(run.progress.total_steps or 0, run.last_step) for run in runs if run.kind == "continual"]
    ends += [
        offsets.get(run.task or "", 0) + max(run.progress.total_steps or 0, run.last_step)
        for run in runs
        if run.kind == "fresh"
    ]
    return np.linspace(0, max(ends + [1]), points)


def curve_bands(
    runs: list[RunData], arms: list[str], grid: np.ndarray, offsets: dict[str, int], n_resamples: int, seed: int
) -> pd.DataFrame:
    """Per metric and arm, the mean curve over seeds on ``grid`` with its 95% bootstrap band.

    Each run is interpolated onto the grid (NaN outside its logged range); a fresh seed's curve is its
    per-task runs placed one after another.
    """
    metrics = sorted({m for run in runs for m in run.curves}, key=lambda m: (m not in (EVAL_RETURN, TRAIN_RETURN), m))
    out = []
    for metric in metrics:
        for arm in arms:
            matrix = _arm_matrix([r for r in runs if r.arm == arm], metric, grid, offsets)
            if matrix is None:
                continue
            b = band(matrix, n_resamples, seed)
            keep = b["n"] > 0
            out.append(
                pd.DataFrame(
                    {
                        "metric": metric,
                        "arm": arm,
                        "step": grid[keep],
                        "n": b["n"][keep],
                        "mean": b["mean"][keep],
                        "ci_low": b["ci_low"][keep],
                        "ci_high": b["ci_high"][keep],
                    }
                )
            )
    if not out:
        return pd.DataFrame(columns=["metric", "arm", "step", "n", "mean", "ci_low", "ci_high"])
    return pd.concat(out, ignore_index=True)


def _arm_matrix(runs: list[RunData], metric: str, grid: np.ndarray, offsets: dict[str, int]) -> np.ndarray | None:
    """Seeds x grid points for one arm (``None`` if no run has the metric)."""
    by_seed: dict[int, list[np.ndarray]] = {}
    for run in runs:
        if metric not in run.curves:
            continue
        steps, values = run.curves[metric]
        shift = offsets.get(run.task or "", 0) if run.kind == "fresh" else 0
        by_seed.setdefault(run.seed, []).append(interpolate(steps + shift, values, grid))
    if not by_seed:
        return None
    rows = []
    for parts in by_seed.values():
        stack = np.vstack(parts)
        count = np.isfinite(stack).sum(axis=0)
        total = np.where(np.isfinite(stack), stack, 0.0).sum(axis=0)
        rows.append(np.where(count > 0, total / np.maximum(count, 1), np.nan))
    return np.vstack(rows)
