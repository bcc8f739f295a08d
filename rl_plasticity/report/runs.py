"""Read run directories for the report: the arm and seed of each run, its task visits and its curves.

- **Arm**: from the sweep manifest (``sweep.json`` two levels up: ``<sweep>/<label>/<run>``) when there is
  one; otherwise from the run's config: its interventions and architecture options joined by ``+``
  (``none`` without any), and ``fresh`` for a run on one task alone (``env.order=explicit`` with one task).
- **Visits**: the rows of ``task_summary.csv`` (the monitor writes it; exact): the evaluation return at the
  visit's end (``eval_return``, with evaluation on), the training returns (``mean_return``, ``final_return``)
  and the probes. A run without it (monitor off) gets them from its events instead: a visit per change of
  ``task/id``; its evaluation return is the last ``eval/<task>/mean_return`` point of the visit, its mean
  training return the mean of the ``task/<task>/episode_return`` points in the visit and its final return
  the last one (each point is SB3's mean over the episodes since the previous log, so both approximate the
  CSV's per-episode values); its probes are the last ``plasticity/<probe>@probe_set`` values of the visit.
  Every run also gets ``eval_mean``, the mean of the visit's evaluation rounds of its task, from its events
  (:func:`add_eval_means`).
- **Curves**, read with TensorBoard's ``EventAccumulator`` (all events files of the run directory, so a
  resumed run reads as one): the current task's evaluation return (``eval/mean_return``) and training return
  (all ``task/<task>/episode_return`` tags together, or SB3's ``rollout/ep_rew_mean`` if there are none),
  every task's evaluation return (``eval/<task>/mean_return``; a fresh run's own task only) and the main
  probes on the fixed probe set.
- **Reused trials**: a fresh-network trial that the sweep did not run because a continual trial's first visit is
  the same run (``reused_from`` in ``sweep.json``) is that first visit: the source run's row of the visit that
  starts at step 0 and its curves up to the switch, labelled as the fresh run (:func:`reused_runs`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rl_plasticity.layout import SUMMARY_FILE
from rl_plasticity.probes.registry import main_probes
from rl_plasticity.rundirs import RunProgress, read_config, run_progress, trial_state

#: The main probes of the report, as the probe registry declares them: the probe's key in tags and in
#: task_summary.csv -> title (effective rank, dormant fraction, NC1, K-FAC epsilon-rank).
MAIN_PROBES: dict[str, str] = main_probes()
#: Curves: the current task's evaluation and training returns, and each task's evaluation return (``eval_task/<task>``).
EVAL_RETURN, TRAIN_RETURN, EVAL_TASK = "eval_return", "train_return", "eval_task"
_RETURN_TAG = re.compile(r"^task/(.+)/episode_return$")
_EVAL_TAG = re.compile(r"^eval/(.+)/mean_return$")
_SIZE_GUIDANCE = {"scalars": 0, "histograms": 1, "compressedHistograms": 1, "tensors": 1, "images": 1, "audio": 1}


@dataclass
class RunData:
    """One run, as the report sees it.

    :param kind: ``continual``, or ``fresh`` for a network trained on one task alone.
    :param task: a fresh run's task.
    :param visits: one row per task visit: ``task, visit, start_step, end_step, complete, eval_mean,
        eval_return`` (with evaluation), ``mean_return, final_return`` (training), the probe columns and, per
        main probe, its mean over layers (column ``erank`` etc.).
    :param curves: metric (``eval_return``, ``train_return``, ``eval_task/<task>``, ``erank/value_head``,
        ``dormant/q_net.1``, ...) -> (steps, values).
    :param visit_source: ``task_summary.csv`` or ``events``.
    :param reused_from: a reused fresh trial (:func:`reused_runs`): the id of the continual trial it is the
        first visit of (``path`` is that trial's run directory).
    """

    path: Path
    arm: str
    seed: int
    kind: str
    task: str | None
    progress: RunProgress
    switch_every: int | None
    tasks: list[str]
    visits: pd.DataFrame
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    last_step: int = 0
    visit_source: str = "events"
    reused_from: str | None = None


def manifest_entry(run_dir: Path, seed: int, manifests: dict[Path, dict[str, Any] | None]) -> dict[str, Any] | None:
    """The sweep manifest's entry for this run, if it is a trial of a sweep (``<sweep>/<label>/<run>``)."""
    from rl_plasticity.sweep.grid import SweepError
    from rl_plasticity.sweep.plan import read_manifest  # no torch: plan imports config only

    sweep_dir = run_dir.parent.parent
    if sweep_dir not in manifests:
        try:
            manifests[sweep_dir] = read_manifest(sweep_dir)
        except SweepError:
            manifests[sweep_dir] = None
    manifest = manifests[sweep_dir]
    if manifest is None:
        return None
    return manifest["trials"].get(f"{run_dir.parent.name}/seed{seed}")


def config_arm(config: dict[str, Any]) -> tuple[str, str]:
    """``(arm, kind)`` from a run's config when no manifest names it (see the module docstring)."""
    env = config.get("env") or {}
    order = env.get("task_order") or []
    if env.get("order") == "explicit" and len(set(order)) == 1:
        return "fresh", "fresh"
    net = config.get("net") or {}
    parts = list(config.get("interventions") or [])
    parts += ["layer_norm"] if net.get("layer_norm") else []
    parts += ["crelu"] if net.get("activation") == "crelu" else []
    return ("+".join(parts) or "none"), "continual"


@lru_cache(maxsize=64)
def _task_names(args_json: str) -> tuple[str, ...]:
    import json

    from envs import make_sequence

    seq = make_sequence(**json.loads(args_json))
    try:
        return tuple(seq.task_names)
    finally:
        seq.close()


def task_names(config: dict[str, Any]) -> list[str]:
    """The run's task names by task id (building its sequence as the run did: :func:`sequence_args`); empty if
    that fails."""
    import json

    from rl_plasticity.task_envs import sequence_args

    try:
        args = sequence_args(config.get("env") or {}, config.get("seed", 0))
        return list(_task_names(json.dumps(args, sort_keys=True)))
    except (ValueError, TypeError, KeyError):  # an old or foreign config: visits then name tasks task<k>
        return []


def read_scalars(run_dir: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every scalar tag of the run's events files: tag -> (steps, values), in step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance=_SIZE_GUIDANCE)
    try:
        acc.Reload()
    except Exception:  # noqa: BLE001, S110 - a file still being written or cut short: use what was read
        pass
    out = {}
    for tag in acc.Tags().get("scalars", []):
        events = acc.Scalars(tag)
        steps = np.array([e.step for e in events], dtype=np.int64)
        values = np.array([e.value for e in events], dtype=float)
        order = np.argsort(steps, kind="stable")
        out[tag] = (steps[order], values[order])
    return out


def _merge_points(series: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Several (steps, values) series as one, in step order; values at the same step are averaged."""
    if not series:
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    frame = pd.DataFrame(
        {"step": np.concatenate([s for s, _ in series]), "value": np.concatenate([v for _, v in series])}
    )
    merged = frame.groupby("step", sort=True)["value"].mean()
    return merged.index.to_numpy(dtype=np.int64), merged.to_numpy(dtype=float)


def curves_from_scalars(
    scalars: dict[str, tuple[np.ndarray, np.ndarray]], own_task: str | None = None
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The report's curves (see the module docstring).

    :param own_task: a fresh run's task: of the per-task evaluation curves it keeps that task's only.
    """
    curves = {}
    if "eval/mean_return" in scalars:
        curves[EVAL_RETURN] = scalars["eval/mean_return"]
    returns = [series for tag, series in scalars.items() if _RETURN_TAG.match(tag)]
    if returns:
        curves[TRAIN_RETURN] = _merge_points(returns)
    elif "rollout/ep_rew_mean" in scalars:
        curves[TRAIN_RETURN] = scalars["rollout/ep_rew_mean"]
    for tag, series in scalars.items():
        match = _EVAL_TAG.match(tag)
        if match and own_task in (None, match.group(1)):
            curves[f"{EVAL_TASK}/{match.group(1)}"] = series
    for probe in MAIN_PROBES:
        pattern = re.compile(rf"^plasticity/{probe}/(.+)@probe_set$")
        for tag, series in scalars.items():
            match = pattern.match(tag)
            if match:
                curves[f"{probe}/{match.group(1)}"] = series
    return curves


def visits_from_summary(path: Path) -> pd.DataFrame:
    """The rows of a ``task_summary.csv`` (``complete`` as bool)."""
    frame = pd.read_csv(path)
    if "complete" in frame:
        frame["complete"] = frame["complete"].astype(str).str.lower().isin(["true", "1"])
    return frame


def visits_from_events(
    scalars: dict[str, tuple[np.ndarray, np.ndarray]], tasks: list[str], switch_every: int | None, end_step: int
) -> pd.DataFrame:
    """Task visits rebuilt from ``task/id`` and the per-task return tags (see the module docstring)."""
    if "task/id" not in scalars:
        return pd.DataFrame()
    steps, ids = scalars["task/id"]
    segments: list[list[int]] = []  # [task id, start]
    for step, task_id in zip(steps.tolist(), ids.astype(int).tolist()):
        if not segments:
            segments.append([task_id, 0])
        elif task_id != segments[-1][0]:
            segments.append([task_id, step])
    rows, seen = [], {}
    for i, (task_id, start) in enumerate(segments):
        end = segments[i + 1][1] if i + 1 < len(segments) else end_step
        if end <= start:
            continue
        name = tasks[task_id] if task_id < len(tasks) else f"task{task_id}"
        seen[name] = seen.get(name, 0) + 1
        row: dict[str, Any] = {
            "task_id": task_id,
            "task": name,
            "visit": seen[name],
            "start_step": start,
            "end_step": end,
            "complete": switch_every is not None and end - start == switch_every,
        }
        if f"eval/{name}/mean_return" in scalars:
            s, v = scalars[f"eval/{name}/mean_return"]
            inside = (s > start) & (s <= end)
            row["eval_return"] = float(v[inside][-1]) if inside.any() else math.nan
        s, v = scalars.get(f"task/{name}/episode_return", (np.zeros(0), np.zeros(0)))
        inside = (s > start) & (s <= end)
        row["mean_return"] = float(np.mean(v[inside])) if inside.any() else math.nan
        row["final_return"] = float(v[inside][-1]) if inside.any() else math.nan
        for tag, (ps, pv) in scalars.items():
            if tag.startswith("plasticity/") and tag.endswith("@probe_set"):
                inside = (ps > start) & (ps <= end)
                if inside.any():
                    row[tag[len("plasticity/") : -len("@probe_set")]] = float(pv[inside][-1])
        rows.append(row)
    return pd.DataFrame(rows)


def add_eval_means(visits: pd.DataFrame, scalars: dict[str, tuple[np.ndarray, np.ndarray]]) -> pd.DataFrame:
    """Per visit, ``eval_mean``: the mean of the evaluation rounds of the visit's task (``eval/<task>/mean_return``)
    at steps ``start_step`` to ``end_step``, both included, so the round at the switch that starts the visit (the
    network the task first meets, with ``eval.tasks: all``) counts, as C-CHAIN's evaluation at the start of each
    task does. It is the visit's evaluation curve averaged over its rounds (the area under it, per round): it
    rewards learning fast as well as ending high, and averages over ``every``-many rounds of ``eval.episodes``
    episodes, so it is less noisy than ``eval_return``, the last round alone. NaN without such rounds.

    A step logged twice (a resumed run) counts once, with its last value.
    """
    visits = visits.copy()
    means = []
    for task, start, end in zip(visits["task"], visits["start_step"], visits["end_step"]):
        steps, values = scalars.get(f"eval/{task}/mean_return", (np.zeros(0, dtype=np.int64), np.zeros(0)))
        inside = (steps >= start) & (steps <= end)
        # np.unique keeps each step's first index: reversed, that is its last value.
        _, last = np.unique(steps[inside][::-1], return_index=True)
        means.append(float(np.mean(values[inside][::-1][last])) if inside.any() else math.nan)
    visits["eval_mean"] = means
    return visits


def add_probe_means(visits: pd.DataFrame) -> pd.DataFrame:
    """Per main probe, a column with its mean over layers (``dormant`` = mean of ``dormant/<layer>``)."""
    visits = visits.copy()
    for probe in MAIN_PROBES:
        columns = [c for c in visits.columns if c.startswith(f"{probe}/")]
        visits[probe] = visits[columns].apply(pd.to_numeric, errors="coerce").mean(axis=1) if columns else np.nan
    return visits


def load_run(run_dir: Path, manifests: dict[Path, dict[str, Any] | None]) -> RunData:
    """Everything the report needs from one run directory (see the module docstring)."""
    config = read_config(run_dir)
    seed = int(config.get("seed", 0))
    entry = manifest_entry(run_dir, seed, manifests)
    if entry is not None:
        arm, kind, task = entry["arm"], ("fresh" if entry.get("task") is not None else "continual"), entry.get("task")
    else:
        arm, kind = config_arm(config)
        task = None
    env = config.get("env") or {}
    switch_every = env.get("switch_every")
    tasks = task_names(config)
    if kind == "fresh" and task is None:
        order = env.get("task_order") or [0]
        task = tasks[order[0]] if order[0] < len(tasks) else f"task{order[0]}"

    progress = run_progress(run_dir)
    scalars = read_scalars(run_dir)
    last_step = max((int(s[-1]) for s, _ in scalars.values() if len(s)), default=0)
    summary = run_dir / SUMMARY_FILE
    if summary.is_file() and summary.stat().st_size > 0:
        visits, source = visits_from_summary(summary), SUMMARY_FILE
    else:
        end = progress.total_steps if progress.complete and progress.total_steps else last_step
        visits, source = visits_from_events(scalars, tasks, switch_every, end), "events"
    visits = add_probe_means(add_eval_means(visits, scalars)) if len(visits) else visits
    return RunData(
        run_dir,
        arm,
        seed,
        kind,
        task,
        progress,
        switch_every,
        tasks,
        visits,
        curves_from_scalars(scalars, task if kind == "fresh" else None),
        last_step,
        source,
    )


def reused_runs(runs: list[RunData], manifests: dict[Path, dict[str, Any] | None]) -> list[RunData]:
    """The sweeps' reused fresh trials (``status: reused`` in ``sweep.json``), each as the run it stands for: the
    first visit of its source run (the visit that starts at step 0, the rows and curves up to its end), with the
    fresh trial's arm, kind, task and seed. The source run is the source trial's run that counts
    (:func:`~rl_plasticity.rundirs.trial_state`, the sweep's own rule); a trial whose source has none yet (no
    checkpoint), or whose run is not among ``runs``, is left out (the report lists it as not started).

    :param runs: the runs read so far (:func:`load_run`), the source runs among them.
    :param manifests: the manifests :func:`load_run` read, by sweep directory.
    """
    out = []
    for sweep_dir, manifest in manifests.items():
        trials = (manifest or {}).get("trials", {})
        for entry in trials.values():
            source_entry = trials.get(str(entry.get("reused_from"))) or {}
            if entry.get("status") != "reused" or not isinstance(source_entry.get("seed"), int):
                continue
            # The source trial's run that counts, as the sweep picks it (not the one the manifest names: that is
            # an earlier attempt's until the running one ends).
            state = trial_state(sweep_dir, str(source_entry.get("label")), source_entry["seed"])
            source = [r for r in runs if state is not None and r.path.resolve() == state.run_dir.resolve()]
            if source:
                out.append(_first_visit(source[0], entry, str(entry["reused_from"])))
    return out


def _first_visit(source: RunData, entry: dict[str, Any], source_id: str) -> RunData:
    """``source``'s first visit as a run of the reused fresh trial ``entry`` (see :func:`reused_runs`)."""
    visits = source.visits
    if len(visits) and "start_step" in visits:
        visits = visits[(visits["start_step"] == 0) & (visits["task"] == entry.get("task"))].head(1)
    else:
        visits = pd.DataFrame()
    complete = bool(len(visits) and visits["complete"].iloc[0])
    end = int(visits["end_step"].iloc[0]) if len(visits) else int(source.switch_every or source.last_step)
    task = entry.get("task")
    curves = {}
    for metric, (steps, values) in source.curves.items():
        if metric.startswith(f"{EVAL_TASK}/") and metric != f"{EVAL_TASK}/{task}":
            continue  # of every task's evaluation, a fresh run's report keeps its own task's
        inside = steps <= end
        curves[metric] = (steps[inside], values[inside])
    # A fresh run's length is one switch, whatever the source's last log: a source stopped inside its first visit
    # gives a fresh run that is as far on as its checkpoint, not a complete one.
    total = int(source.switch_every) if source.switch_every else end
    checkpoint = total if complete else source.progress.checkpoint_step
    progress = RunProgress(source.path, None if checkpoint is None else min(checkpoint, total), total)
    return RunData(
        source.path,
        str(entry.get("arm")),
        source.seed,
        "fresh",
        task,
        progress,
        source.switch_every,
        source.tasks,
        visits.reset_index(drop=True),
        curves,
        min(source.last_step, end),
        source.visit_source,
        source_id,
    )
