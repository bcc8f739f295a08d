"""A sweep's plan: its trials (arm x grid point x seed, plus the fresh-network arm), each validated as a full
run config before anything is written, and its manifest ``sweep.json``.

Layout of a sweep directory::

    <sweep dir>/
      sweep.json                      the plan and every trial's status (written by the driver only)
      <label>/<date-time>_seed<k>/    each trial's ordinary run directory (the run's name is the label)
      logs/<label>_seed<k>.out, .err  each trial's stdout and stderr, appended over attempts
"""

from __future__ import annotations

import datetime as dt
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from rl_plasticity.catalog import registries
from rl_plasticity.config import ConfigError, RunConfig, flat_config, load_config
from rl_plasticity.rundirs import trial_runs
from rl_plasticity.sweep.grid import (
    SweepError,
    check_not_sweep_key,
    expand_grid,
    load_arms,
    override_key,
    render_value,
    sanitize_label,
)

MANIFEST = "sweep.json"
LOGS_DIR = "logs"
FRESH = "fresh"
#: Config keys a trial's identity does not depend on: a sweep re-run may change them.
VOLATILE_KEYS = ("threads", "logging.root_dir", "logging.progress_bar")
#: Keys in which a fresh-network trial may differ from a continual trial whose first visit it is: its name and
#: what the fresh overrides set (``interventions=[]`` is not among them: the continual trial must have none too).
FRESH_KEYS = ("name", "env.order", "env.task_order", "total_steps")


@dataclass(frozen=True)
class Trial:
    """One run of the sweep.

    :param label: its folder under the sweep directory and its run ``name`` (the arm and grid point).
    :param arm: what ``rlp report`` groups it under: the label, or ``fresh`` for the fresh-network arm.
    :param overrides: what it sets on top of the base config, before the keys the sweep owns.
    :param task: fresh-network trials: the name of the one task they train on.
    :param reused_from: a fresh-network trial that is not run: the id of the continual trial whose first
        ``env.switch_every`` steps are the same run (:func:`same_first_visit`); ``rlp report`` takes its first visit.
    """

    label: str
    arm: str
    seed: int
    overrides: tuple[str, ...]
    task: str | None = None
    reused_from: str | None = None

    @property
    def id(self) -> str:
        """``<label>/seed<k>``: unique within a sweep."""
        return f"{self.label}/seed{self.seed}"

    @property
    def log_stem(self) -> str:
        """``<label>_seed<k>``: the name of its log files under ``logs/``."""
        return f"{self.label}_seed{self.seed}"

    def run_overrides(self, sweep_dir: Path, cpus: int) -> list[str]:
        """Every override of ``rlp train CONFIG ...`` for this trial, the sweep's own keys last."""
        return [
            *self.overrides,
            f"seed={self.seed}",
            f"name={render_value(self.label)}",
            f"logging.root_dir={render_value(str(sweep_dir))}",
            f"threads={cpus}",
            "logging.progress_bar=false",
        ]


@dataclass
class SweepPlan:
    """Everything ``rlp sweep`` will run, already validated."""

    config: Path
    sweep_dir: Path
    overrides: tuple[str, ...]
    grid: tuple[str, ...]
    arms: tuple[str, ...]
    fresh: bool
    seeds: list[int]
    cpus_per_trial: int
    trials: list[Trial]
    tasks: list[str]
    configs: dict[str, dict[str, Any]] = field(default_factory=dict)

    def trial(self, trial_id: str) -> Trial:
        """The trial with this id."""
        return next(t for t in self.trials if t.id == trial_id)


def trial_config(cfg: RunConfig) -> dict[str, Any]:
    """The flattened config without :data:`VOLATILE_KEYS`: what identifies a trial (empty mappings kept)."""
    return {k: v for k, v in flat_config(cfg, keep_empty=True).items() if k not in VOLATILE_KEYS}


def _first_task(config: dict[str, Any]) -> int | None:
    """The task a run's schedule starts with (``None``: a random order, drawn per cycle)."""
    order = config.get("env.order")
    if order == "cyclic":
        return 0
    task_order = config.get("env.task_order")
    return int(task_order[0]) if order == "explicit" and task_order else None


def same_first_visit(continual: dict[str, Any], fresh: dict[str, Any]) -> bool:
    """Whether the first ``env.switch_every`` steps of a continual trial are the very run of a fresh-network trial
    (equal ``task_summary.csv`` row, evaluations, curves and parameters at the switch), from their
    :func:`trial_config`.

    They are if the configs differ only in :data:`FRESH_KEYS`, the continual schedule starts with the fresh
    trial's task and runs at least one ``env.switch_every``, and nothing depends on the run's length: epsilon
    decays over ``agent.exploration_steps``, not a fraction of ``total_steps``. Everything else a run draws is
    seeded by the seed, the task and the step (exploration, probe sets, evaluation episodes), and the monitor and
    the evaluation close a visit at the switch step alike in both (the fresh schedule switches to its task again).
    """
    keys = set(continual) | set(fresh)
    if any(continual.get(k, "(unset)") != fresh.get(k, "(unset)") for k in keys - set(FRESH_KEYS)):
        return False
    total = continual.get("total_steps")
    return (
        _first_task(continual) is not None
        and _first_task(continual) == _first_task(fresh)
        and (total is None or total >= continual["env.switch_every"])
        and continual.get("agent.exploration_fraction") is None
    )


def _reuse(trial: Trial, trials: list[Trial], configs: dict[str, dict[str, Any]], sweep_dir: Path) -> Trial:
    """A fresh-network trial marked as reused from the first continual trial of its seed with the same first visit
    (:func:`same_first_visit`); unchanged if there is none, or if it has a run directory already (a sweep made
    before reuse existed: its run is kept and used)."""
    if trial.arm != FRESH or trial_runs(sweep_dir, trial.label, trial.seed):
        return trial
    for source in trials:
        if source.arm == FRESH or source.seed != trial.seed:
            continue
        if same_first_visit(configs[source.id], configs[trial.id]):
            return replace(trial, reused_from=source.id)
    return trial


def _task_names(cfg: RunConfig) -> list[str]:
    """The task names of the config's sequence; building the env also checks its options (as a run would)."""
    from rl_plasticity.runner import build_env  # torch and SB3: only once the cheap checks passed

    env = build_env(cfg)
    try:
        return list(env.get_attr("task_names")[0])
    finally:
        env.close()


def build_plan(
    config: Path,
    overrides: tuple[str, ...] | list[str],
    grids: tuple[str, ...] | list[str],
    arm_names: list[str],
    arms_file: Path,
    fresh: bool,
    seeds: list[int] | None,
    sweep_dir: Path | None,
    cpus_per_trial: int,
    fresh_reuse: bool = True,
) -> SweepPlan:
    """Expand and validate the sweep: every trial's full config is loaded and checked here, so a bad grid,
    arm or override fails before anything is written.

    :param arm_names: named arms of ``arms_file``; ``fresh`` among them is the same as ``fresh=True``.
    :param fresh: add the fresh-network arm: per seed and per task ``k`` of the sequence, a run of the base
        config (the common overrides, no intervention) on task ``k`` alone for one ``env.switch_every``. With
        ``agent.exploration_steps`` its epsilon decays as a continual run's first task; an
        ``agent.exploration_fraction`` follows its own length.
    :param fresh_reuse: a fresh-network trial whose run a continual trial of its seed makes anyway as its first
        visit (:func:`same_first_visit`: normally ``fresh_task0`` and the ``none`` arm) is not run but reused.
    :param seeds: the seeds (default: the config's own ``seed``).
    :param sweep_dir: default ``<logging.root_dir>/<name>_sweep`` of the base config.
    :raises SweepError: any bad input, one line.
    """
    config = Path(config).resolve()
    known = registries()  # the names every trial's config is checked against
    for override in overrides:
        if "=" in override:
            check_not_sweep_key(override_key(override), f"override '{override}'")
    try:
        base = load_config(config, overrides, registries=known)
    except ConfigError as exc:
        raise SweepError(str(exc)) from None
    if cpus_per_trial < 1:
        raise SweepError(f"--cpus-per-trial: must be at least 1 (got {cpus_per_trial})")
    seeds = [base.seed] if seeds is None else seeds
    if sweep_dir is None:
        sweep_dir = Path(base.logging.root_dir) / f"{base.name}_sweep"
    sweep_dir = Path(sweep_dir).resolve()

    fresh = fresh or FRESH in arm_names
    arms = load_arms(arms_file, [a for a in arm_names if a != FRESH]) if arm_names else []
    points = expand_grid(list(grids))
    combos: list[tuple[str, tuple[str, ...]]] = []
    for arm_label, arm_overrides in arms or [("", ())]:
        for point_label, point_overrides in points:
            label = "_".join(p for p in (arm_label, point_label) if p) or sanitize_label(base.name)
            combos.append((label, (*arm_overrides, *point_overrides)))
    labels = [label for label, _ in combos]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise SweepError(
            f"--grid/--arms: several trials would be named {', '.join(duplicates)}; give the values distinct names"
        )

    try:
        base_tasks = _task_names(base)
    except ConfigError as exc:
        raise SweepError(str(exc)) from None
    if fresh:
        changed_env = sorted({override_key(o) for _, ov in combos for o in ov if override_key(o).startswith("env")})
        if changed_env:
            raise SweepError(
                f"--fresh: the arms or the grid change {', '.join(changed_env)}; the fresh-network arm "
                "needs one task sequence (set env keys as plain overrides)"
            )
    # Seed-major order: a sweep stopped part way (say, at the end of a working session) has whole seeds of
    # every arm done, not every seed of a few arms.
    trials = []
    for seed in seeds:
        trials += [Trial(label, label, seed, (*overrides, *arm_ov)) for label, arm_ov in combos]
        if fresh:
            for k, task in enumerate(base_tasks):
                fresh_overrides = (
                    *overrides,
                    "interventions=[]",
                    "env.order=explicit",
                    f"env.task_order=[{k}]",
                    "total_steps=null",
                )
                trials.append(Trial(f"{FRESH}_task{k}", FRESH, seed, fresh_overrides, task))

    configs: dict[str, dict[str, Any]] = {}
    checked_envs = {json.dumps(base.env.model_dump(mode="json"), sort_keys=True)}
    for trial in trials:
        try:
            cfg = load_config(config, trial.run_overrides(sweep_dir, cpus_per_trial), registries=known)
        except ConfigError as exc:
            raise SweepError(f"trial {trial.id}: {exc}") from None
        env_key = json.dumps(cfg.env.model_dump(mode="json"), sort_keys=True)
        if env_key not in checked_envs:  # bad env options only show when the env is built
            checked_envs.add(env_key)
            try:
                _task_names(cfg)
            except ConfigError as exc:
                raise SweepError(f"trial {trial.id}: {exc}") from None
        configs[trial.id] = trial_config(cfg)
    if fresh_reuse:
        trials = [_reuse(trial, trials, configs, sweep_dir) for trial in trials]
    return SweepPlan(
        config,
        sweep_dir,
        tuple(overrides),
        tuple(grids),
        tuple(arm_names),
        fresh,
        list(seeds),
        cpus_per_trial,
        trials,
        base_tasks,
        configs,
    )


# -- the manifest ----------------------------------------------------------------------------------


def read_manifest(sweep_dir: Path) -> dict[str, Any] | None:
    """``sweep.json`` of ``sweep_dir`` (``None`` if there is none).

    :raises SweepError: the file is unreadable.
    """
    path = Path(sweep_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SweepError(f"{path}: unreadable sweep manifest ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("trials"), dict):
        raise SweepError(f"{path}: not a sweep manifest (no 'trials')")
    return data


def check_sweep_dir(plan: SweepPlan) -> dict[str, Any] | None:
    """The existing manifest of the plan's sweep directory, checked against the plan.

    A re-run of the same sweep (to resume it, or to add seeds or arms) is fine; a trial whose config has
    changed is refused, as is a directory that holds something other than a sweep.

    :raises SweepError: one line naming the trial and the first key that differs.
    """
    sweep_dir = plan.sweep_dir
    if sweep_dir.exists() and not sweep_dir.is_dir():
        raise SweepError(f"--out: {sweep_dir} exists and is not a directory")
    old = read_manifest(sweep_dir)
    if old is None:
        if sweep_dir.is_dir() and any(not p.name.startswith(".") for p in sweep_dir.iterdir()):  # .lock is ours
            raise SweepError(
                f"--out: {sweep_dir} is not empty and holds no {MANIFEST}: not a sweep directory; choose another --out"
            )
        return None
    for trial in plan.trials:
        entry = old["trials"].get(trial.id)
        if entry is None:
            continue
        before, now = entry.get("config", {}), plan.configs[trial.id]
        diff = [k for k in sorted(set(before) | set(now)) if before.get(k, "(unset)") != now.get(k, "(unset)")]
        if diff:
            key = diff[0]
            raise SweepError(
                f"--out: {sweep_dir} ran trial {trial.id} with {key}={before.get(key, '(unset)')!r}, "
                f"this sweep has {key}={now.get(key, '(unset)')!r}"
                f"{f' (and {len(diff) - 1} more keys)' if len(diff) > 1 else ''}; "
                "a sweep re-run must keep every trial's config: choose another --out"
            )
    return old


def new_manifest(plan: SweepPlan, old: dict[str, Any] | None, command: list[str]) -> dict[str, Any]:
    """The manifest of this run of the sweep: the plan, and each trial's entry (kept from ``old`` if there)."""
    trials: dict[str, Any] = dict(old["trials"]) if old else {}
    for trial in plan.trials:
        entry = trials.get(
            trial.id,
            {"status": "pending", "run_dir": None, "error": None, "exit_code": None, "attempts": 0, "seconds": None},
        )
        entry.update(
            label=trial.label,
            arm=trial.arm,
            seed=trial.seed,
            task=trial.task,
            overrides=list(trial.overrides),
            config=plan.configs[trial.id],
            reused_from=trial.reused_from,
        )
        if trial.reused_from is not None:
            entry.update(status="reused", run_dir=None, error=None)
        elif entry["status"] == "reused":  # reused before, run now (--no-fresh-reuse)
            entry["status"] = "pending"
        trials[trial.id] = entry
    arms = list(dict.fromkeys([*(old or {}).get("arms_order", []), *(t.arm for t in plan.trials)]))
    return {
        "version": 1,
        "config": str(plan.config),
        "overrides": list(plan.overrides),
        "grid": list(plan.grid),
        "arms": list(plan.arms),
        "fresh": plan.fresh,
        "seeds": sorted(set((old or {}).get("seeds", [])) | set(plan.seeds)),
        "tasks": plan.tasks,
        "arms_order": arms,
        "cpus_per_trial": plan.cpus_per_trial,
        "command": command,
        "created": (old or {}).get("created", _now()),
        "updated": _now(),
        "trials": trials,
    }


def write_manifest(sweep_dir: Path, manifest: dict[str, Any]) -> None:
    """Write ``sweep.json`` atomically (a temporary file, then a rename): a kill never leaves half of it."""
    manifest["updated"] = _now()
    path = Path(sweep_dir) / MANIFEST
    tmp = path.with_name(f".{MANIFEST}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, path)


def _now() -> str:
    return dt.datetime.now().isoformat(timespec="seconds")
