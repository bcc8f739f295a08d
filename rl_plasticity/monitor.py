"""The plasticity monitor: an SB3 callback that probes the network as the tasks change.

Every ``probe_every`` gradient steps, and at every task switch, it runs the configured probes on the
current task's fixed probe set (:mod:`rl_plasticity.probe_sets`: a seeded random policy's transitions, the
same for every arm) and on the latest training batch, and logs them through SB3's logger as
``plasticity/<probe>/<layer>@probe_set`` and ``...@batch`` (and ``...@first_visit`` on the run's own first
samples of the task, with ``monitor.first_visit``). At a switch it also runs the heavier probes (Hessian
spectrum, Gram, trainability) on the finished task's probe set and appends one row per task visit to
``task_summary.csv``, with the visit's training returns and, when evaluation is on, the evaluation returns
at its end. It draws no random numbers from the training RNG and adds no loss, so training with the monitor
on is bit-for-bit training with it off.

A non-finite probe value (other than neural collapse's, NaN by definition when undefined) stops the run
with :class:`~agents.plastic.NonFiniteError`. :meth:`MonitorCallback.state_dict` is what a checkpoint keeps
of it, so that a resumed run probes and summarises exactly as the uninterrupted one.
"""

from __future__ import annotations

import contextlib
import csv
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch as th
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.logger import TensorBoardOutputFormat

from agents import Intervention
from agents.plastic import NonFiniteError
from rl_plasticity.layout import FIRST_VISIT_FILE, PROBE_SETS_FILE, SUMMARY_FILE
from rl_plasticity.probe_sets import DQN_FIELDS, PPO_FIELDS, ProbeSets, RandomProbeSets
from rl_plasticity.probes import grad_stats, snapshot, update_stats, weight_stats
from rl_plasticity.probes.registry import layout_groups, may_be_nan_prefixes
from rl_plasticity.probing import probe_batch, probed_module
from rl_plasticity.task_envs import TaskEnvs
from rl_plasticity.task_logging import TB_ONLY, step_events

#: The data sources a probe round may probe, in the order it probes them.
PROBE_SET, FIRST_VISIT, BATCH = "probe_set", "first_visit", "batch"
#: Probe values that may be NaN by definition (the registry's, e.g. neural collapse with fewer than two classes,
#: or no between-class scatter); any other non-finite probe value stops the run (:class:`NonFiniteError`).
MAY_BE_NAN = may_be_nan_prefixes()


@dataclass(frozen=True)
class MonitorSettings:
    """What the monitor probes, how often and on how much data: the ``monitor:`` config keys but ``enabled``
    (their defaults and meanings are the config's; the runner builds this from the validated section).

    The last six are the probes' own parameters, handed to them by name (:func:`probe_settings`).
    """

    probe_every: int
    probes: list[str]
    switch_probes: list[str]
    on_batch: bool
    batch_probes: list[str]
    probe_set_size: int
    probe_set_episodes: int
    probe_set_max_episode_steps: int
    first_visit: bool
    first_visit_size: int
    histograms: bool
    dormant_tau: float
    hessian_order: int
    hessian_vectors: int
    gram_size: int
    trainability_steps: int
    trainability_lr: float


def probe_settings(settings: MonitorSettings) -> dict[str, Any]:
    """The settings by name, as :func:`~rl_plasticity.probing.probe_batch` takes them (each probe picks its own)."""
    return {f.name: getattr(settings, f.name) for f in fields(MonitorSettings)}


def check_probe_values(scalars: dict[str, float], source: str | None, env_step: int) -> None:
    """Raise :class:`NonFiniteError` for the first non-finite probe value that should be finite.

    :param source: the data source of the tag (``probe_set``, ``batch``), or ``None`` for untagged values.
    """
    for key, value in scalars.items():
        if not math.isfinite(value) and not key.startswith(MAY_BE_NAN):
            raise NonFiniteError(f"plasticity/{key}" + (f"@{source}" if source else ""), value, env_step)


@contextlib.contextmanager
def _non_finite_inputs(term: str, env_step: int) -> Iterator[None]:
    """The probes refuse NaN/inf inputs with a ValueError; here that means the network diverged."""
    try:
        yield
    except ValueError as exc:
        if "NaN" not in str(exc):
            raise
        raise NonFiniteError(f"{term} ({exc})", float("nan"), env_step) from None


class _TrainingObserver(Intervention):
    """Sees each gradient step from inside ``train()``: keeps the latest batch, and the update and
    gradient statistics of the steps right before a probe round. It returns no loss terms."""

    name = "monitor"

    def __init__(self, monitor: MonitorCallback) -> None:
        self.monitor = monitor
        self.last_batch: NamedTuple | None = None
        self._before: dict[str, th.Tensor] | None = None
        self.update: dict[str, float] = {}
        self.grads: dict[str, float] = {}

    def _due(self, agent: Any) -> bool:
        return "weights" in self.monitor.settings.probes and agent.num_gradient_steps + 1 >= self.monitor.next_probe

    def loss_terms(self, agent: Any, batch: NamedTuple, features: th.Tensor, loss: th.Tensor) -> dict[str, th.Tensor]:
        self.last_batch = batch
        if self._due(agent):
            self._before = snapshot(probed_module(agent))
        return {}

    def on_update(self, agent: Any, num_gradient_steps: int) -> None:
        if self._before is None:
            return
        module = probed_module(agent)
        after = snapshot(module)
        # An intervention that rebuilt a layer (plasticity injection) leaves no update to measure.
        self.update = update_stats(self._before, after) if after.keys() == self._before.keys() else {}
        self._before = None
        # The gradients left after the step are clipped; clipping scaled them all by one factor.
        total = float(agent.last_grad_norm)
        if not math.isfinite(total):
            raise NonFiniteError("train/grad_norm", total, int(agent.num_timesteps), num_gradient_steps)
        clip_coef = min(1.0, agent.max_grad_norm / (total + 1e-6))
        self.grads = grad_stats(module, clip_coef=clip_coef)


@dataclass
class _Visit:
    """One visit of a task: where it started and the returns of its episodes."""

    task_id: int
    visit: int
    start_step: int
    returns: list[float] = field(default_factory=list)


class MonitorCallback(BaseCallback):
    """Probes the agent's network during training (see the module docstring).

    :param settings: what to probe, how often and on how much data.
    :param run_dir: where ``task_summary.csv`` and the probe sets (``probe_sets.pt``, ``first_visit_sets.pt``) go.
    :param task_envs: the run's task copies (the random-policy probe sets are played on them); they also name
        the tasks.
    :param final_episodes: episodes averaged for a visit's "final return".
    :param evaluation: the run's :class:`~rl_plasticity.evaluation.EvalCallback`, if evaluation is on: a
        visit's row in ``task_summary.csv`` takes its evaluation at the visit's end.
    """

    def __init__(
        self,
        settings: MonitorSettings,
        run_dir: Path,
        task_envs: TaskEnvs,
        final_episodes: int = 10,
        evaluation: Any | None = None,
    ) -> None:
        super().__init__()
        self.settings = settings
        self.run_dir = Path(run_dir)
        self.task_envs = task_envs
        self.task_names = list(task_envs.task_names)
        self.final_episodes = final_episodes
        self.evaluation = evaluation
        self.probe_sets = RandomProbeSets(
            task_envs, settings.probe_set_size, settings.probe_set_episodes, settings.probe_set_max_episode_steps
        )
        self.next_probe = settings.probe_every
        self.nc_undefined = 0
        self.visits: dict[int, int] = {}
        self._observer = _TrainingObserver(self)
        self._rollout_tasks: list[int] = []
        self._summary_fields: list[str] | None = None
        self._resume: dict[str, Any] | None = None

    # -- checkpoints ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to probe and summarise exactly as an uninterrupted one: the
        first-visit sets (frozen and partly filled), the initial weights, the probe schedule, the visit in
        progress with its returns, the CSV header and length, and the latest training batch with its update
        statistics. The random-policy probe sets are not in it, only the tasks that have one: a resumed run
        rebuilds the same sets."""
        sets = self.first_visit_sets
        observer = self._observer
        batch = observer.last_batch
        summary = self.run_dir / SUMMARY_FILE
        return {
            "first_visit": None
            if sets is None
            else {**sets.state_dict(), "parts": sets._parts, "counts": sets._counts},
            "probe_set_tasks": [task for task in range(len(self.task_names)) if self.probe_sets.built(task)],
            "init_params": {name: value.detach().cpu() for name, value in self.init_params.items()},
            "next_probe": self.next_probe,
            "nc_undefined": self.nc_undefined,
            "visits": dict(self.visits),
            "visit": asdict(self.visit),
            "rollout_tasks": list(self._rollout_tasks),
            "summary_fields": self._summary_fields,
            "summary_bytes": summary.stat().st_size if self._summary_fields is not None and summary.exists() else 0,
            "last_batch": None if batch is None else _to_device(batch, "cpu"),
            "update": dict(observer.update),
            "grads": dict(observer.grads),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`; applied when training starts (the callback needs its model)."""
        self._resume = state

    def _apply_resume(self, state: dict[str, Any]) -> None:
        sets = state.get("first_visit")
        if self.first_visit_sets is not None and sets is not None:
            self.first_visit_sets.load_state_dict(sets)
            self.first_visit_sets._parts, self.first_visit_sets._counts = dict(sets["parts"]), dict(sets["counts"])
        device = self.model.device
        self.init_params = {name: value.to(device) for name, value in state["init_params"].items()}
        self.next_probe = int(state["next_probe"])
        self.nc_undefined = int(state["nc_undefined"])
        self.visits = {int(k): int(v) for k, v in state["visits"].items()}
        self.visit = _Visit(**state["visit"])
        self._rollout_tasks = list(state["rollout_tasks"])
        self._summary_fields = state["summary_fields"]
        observer = self._observer
        batch = state["last_batch"]
        observer.last_batch = None if batch is None else _to_device(batch, device)
        observer.update, observer.grads = dict(state["update"]), dict(state["grads"])
        # Rows written after the checkpoint (by a run killed without one) are written again from here.
        summary = self.run_dir / SUMMARY_FILE
        if self._summary_fields is None:
            summary.unlink(missing_ok=True)
        elif summary.exists() and summary.stat().st_size > state["summary_bytes"]:
            with summary.open("r+b") as f:
                f.truncate(state["summary_bytes"])
        if self.first_visit_sets is not None and self.first_visit_sets._frozen:
            self.first_visit_sets.save(self.run_dir / FIRST_VISIT_FILE)
        # probe_sets.pt keeps every set built so far, as in the uninterrupted run.
        tasks = state.get("probe_set_tasks", [])
        for task in tasks:
            self.probe_sets.arrays(task)
        if tasks:
            self.probe_sets.save(self.run_dir / PROBE_SETS_FILE)

    # -- setup ------------------------------------------------------------------------------------
    def _init_callback(self) -> None:
        agent = self.model
        self.uses_replay = agent.uses_replay
        self.first_visit_sets = (
            ProbeSets(self.settings.first_visit_size, DQN_FIELDS if self.uses_replay else PPO_FIELDS)
            if self.settings.first_visit
            else None
        )
        self.init_params = snapshot(probed_module(agent))
        agent.interventions.append(self._observer)
        if self._resume is not None:
            # The layout is in the run's first events file already.
            self._apply_resume(self._resume)
            self._resume = None
            return
        first_task = int(self.training_env.get_attr("current_task_id")[0])
        self.visit = self._start_visit(first_task, agent.num_timesteps)
        self._add_layout()

    def _on_training_end(self) -> None:
        # A visit cut short by the end of training gets its row too, marked incomplete.
        if self.num_timesteps > self.visit.start_step:
            self._write_summary(self._probe_round(heavy=True), complete=False)
        self.model.interventions.remove(self._observer)

    def _start_visit(self, task_id: int, step: int) -> _Visit:
        self.visits[task_id] = self.visits.get(task_id, 0) + 1
        return _Visit(task_id, self.visits[task_id], step)

    # -- every env step -----------------------------------------------------------------------------
    def _on_step(self) -> bool:
        infos = self.locals["infos"]
        episodes, switch = step_events(infos)
        self.visit.returns.extend(float(info["episode"]["r"]) for info in episodes)
        if self.first_visit_sets is not None:
            if self.uses_replay:
                self._collect_transitions(infos)
            else:
                self._rollout_tasks.append(int(infos[0]["task_id"]))

        if switch is not None:
            self._write_summary(self._probe_round(heavy=True), complete=True)
            self.visit = self._start_visit(int(switch["next_task_id"]), self.num_timesteps)
        elif self.model.num_gradient_steps >= self.next_probe:
            self._probe_round(heavy=False)
        return True

    def _collect_transitions(self, infos: list[dict[str, Any]]) -> None:
        """DQN: the step's transitions go into the first-visit set of their task until it is full."""
        task = int(infos[0]["task_id"])
        sets = self.first_visit_sets
        assert sets is not None
        if sets.full(task):
            return
        new_obs = np.array(self.locals["new_obs"], copy=True)
        dones = np.asarray(self.locals["dones"], dtype=np.float32)
        for i, info in enumerate(infos):
            if dones[i]:
                new_obs[i] = info["terminal_observation"]
                # A truncated episode (time limit or task switch) still bootstraps.
                dones[i] = 0.0 if info.get("TimeLimit.truncated", False) else 1.0
        samples = {
            "observations": self.model._last_obs,
            "actions": np.asarray(self.locals["buffer_actions"]).reshape(len(infos), -1).astype(np.int64),
            "next_observations": new_obs,
            "dones": dones.reshape(-1, 1),
            "rewards": np.asarray(self.locals["rewards"], dtype=np.float32).reshape(-1, 1),
        }
        if sets.add(task, samples):
            sets.save(self.run_dir / FIRST_VISIT_FILE)

    def _on_rollout_end(self) -> None:
        """PPO: samples of this rollout go into the first-visit set of their task, with advantages and returns."""
        sets = self.first_visit_sets
        if self.uses_replay or sets is None:
            return
        buf = self.model.rollout_buffer
        for t, task in enumerate(self._rollout_tasks):
            if sets.full(task):
                continue
            samples = {
                "observations": buf.observations[t],
                "actions": buf.actions[t],
                "old_values": buf.values[t],
                "old_log_prob": buf.log_probs[t],
                "advantages": buf.advantages[t],
                "returns": buf.returns[t],
            }
            if sets.add(task, samples):
                sets.save(self.run_dir / FIRST_VISIT_FILE)
        self._rollout_tasks = []

    # -- probing ----------------------------------------------------------------------------------------
    def _probe_sets(self, task_id: int) -> dict[str, NamedTuple]:
        """The fixed sets of ``task_id`` to probe, by source (the random-policy set is built when first asked)."""
        agent = self.model
        built = self.probe_sets.built(task_id)
        sources = {PROBE_SET: self.probe_sets.batch(task_id, agent, ppo=not self.uses_replay)}
        if not built:
            self.probe_sets.save(self.run_dir / PROBE_SETS_FILE)
        first = self.first_visit_sets.batch(task_id, agent.device) if self.first_visit_sets is not None else None
        if first is not None and len(first.observations) >= 2:
            sources[FIRST_VISIT] = first
        return sources

    def _probe_round(self, heavy: bool) -> dict[str, float]:
        """Probe the current task's fixed sets (and the training batch), log, and return the fixed sets' values
        (the first-visit set's with ``@first_visit`` appended to their keys)."""
        agent = self.model
        logger = self.logger
        fixed_values: dict[str, float] = {}
        sources = self._probe_sets(self.visit.task_id)
        if self.settings.on_batch and self._observer.last_batch is not None:
            sources[BATCH] = self._observer.last_batch

        for source, batch in sources.items():
            fixed = source != BATCH
            with _non_finite_inputs(f"plasticity/*@{source}", self.num_timesteps):
                probes = self.settings.probes if fixed else self.settings.batch_probes
                if heavy and fixed:
                    probes = [*probes, *self.settings.switch_probes]
                result = probe_batch(agent, batch, probes, probe_settings(self.settings))
            check_probe_values(result.scalars, source, self.num_timesteps)
            for key, value in result.scalars.items():
                logger.record(f"plasticity/{key}@{source}", value, exclude=TB_ONLY)
            if self.settings.histograms:
                for key, values in result.histograms.items():
                    logger.record(f"plasticity/{key}@{source}", values, exclude=TB_ONLY)
            if source == PROBE_SET:
                fixed_values.update(result.scalars)
                if np.isnan(result.scalars.get("nc1/value_head", 0.0)):
                    self.nc_undefined += 1
            elif source == FIRST_VISIT:
                fixed_values.update({f"{key}@{FIRST_VISIT}": value for key, value in result.scalars.items()})
        if "weights" in self.settings.probes:
            with _non_finite_inputs("plasticity/weight_*", self.num_timesteps):
                weight_scalars = self._weight_scalars()
            check_probe_values(weight_scalars, None, self.num_timesteps)
            for key, value in weight_scalars.items():
                logger.record(f"plasticity/{key}", value, exclude=TB_ONLY)
        logger.record("plasticity/nc_undefined_count", self.nc_undefined, exclude=TB_ONLY)
        agent.record_logged_values()
        logger.dump(step=self.num_timesteps)
        self.next_probe = (agent.num_gradient_steps // self.settings.probe_every + 1) * self.settings.probe_every
        return fixed_values

    def _weight_scalars(self) -> dict[str, float]:
        module = probed_module(self.model)
        # A parameter added during training (plasticity injection's new head) starts from its first value.
        for name, p in module.named_parameters():
            self.init_params.setdefault(name, p.detach().clone())
        out: dict[str, float] = {}
        for name, stats in weight_stats(module, self.init_params).items():
            for key, value in stats.items():
                out[f"weight_{key}/{name}"] = value
        for name, value in self._observer.update.items():
            out[f"update_norm/{name}"] = value
        for name, value in self._observer.grads.items():
            out[f"grad_norm/{name}"] = value
        # Logged once: a later round (say, at a switch) has not measured a new update.
        self._observer.update, self._observer.grads = {}, {}
        return out

    # -- outputs --------------------------------------------------------------------------------------------
    def _write_summary(self, probes: dict[str, float], complete: bool) -> None:
        """Append one row for the visit that just ended (written as it happens, so a crash loses no row).

        :param complete: the visit ended at a task switch (not cut short by the end of training).
        """
        visit, returns = self.visit, self.visit.returns
        row: dict[str, Any] = {
            "task_id": visit.task_id,
            "task": self.task_names[visit.task_id],
            "visit": visit.visit,
            "start_step": visit.start_step,
            "end_step": self.num_timesteps,
            "episodes": len(returns),
            "mean_return": float(np.mean(returns)) if returns else float("nan"),
            "final_return": float(np.mean(returns[-self.final_episodes :])) if returns else float("nan"),
            "complete": complete,
        }
        row.update(self._eval_columns(visit.task_id))
        row.update(sorted(probes.items()))
        path = self.run_dir / SUMMARY_FILE
        if self._summary_fields is None:
            self._summary_fields = list(row)
            with path.open("w", newline="") as f:
                csv.DictWriter(f, self._summary_fields).writeheader()
        with path.open("a", newline="") as f:
            # Probes missing on this visit (say, a probe set too small) stay empty, and new ones are left out.
            csv.DictWriter(f, self._summary_fields, extrasaction="ignore").writerow(row)

    def _eval_columns(self, task_id: int) -> dict[str, float]:
        """The evaluation at the visit's end: ``eval_return`` and ``eval_return_std`` of the visit's task and,
        with ``eval.tasks: all``, ``eval_return/<task>`` of every task (empty without evaluation)."""
        evaluation = self.evaluation
        if evaluation is None:
            return {}
        nan = float("nan")
        latest = evaluation.latest if evaluation.last_step == self.num_timesteps else {}
        own = latest.get(task_id)
        columns = {"eval_return": own.mean if own else nan, "eval_return_std": own.std if own else nan}
        if evaluation.settings.tasks == "all":
            for task, name in enumerate(self.task_names):
                result = latest.get(task)
                columns[f"eval_return/{name}"] = result.mean if result else nan
        return columns

    def _add_layout(self) -> None:
        """Group the charts in TensorBoard's Custom Scalars tab."""
        for fmt in self.logger.output_formats:
            if isinstance(fmt, TensorBoardOutputFormat):
                fmt.writer.add_custom_scalars(tensorboard_layout())


def _to_device(batch: NamedTuple, device: th.device | str) -> NamedTuple:
    """An SB3 sample tuple with its tensors on ``device`` (``None`` fields stay ``None``)."""
    return type(batch)(*[None if t is None else t.to(device) for t in batch])


def tensorboard_layout() -> dict[str, dict[str, list[Any]]]:
    """Custom Scalars layout: returns per task (training and evaluation), then each registered probe's charts
    by its group (ranks, dormancy, collapse, curvature, weights, ...)."""
    return {
        "returns": {
            "episode return per task": ["Multiline", [r"task/.*/episode_return"]],
            "task id": ["Multiline", [r"task/id"]],
        },
        "eval": {
            title: ["Multiline", [regex]]
            for title, regex in (
                ("evaluation return per task", r"eval/.+/mean_return"),
                ("evaluation return of the current task", r"eval/mean_return"),
                ("evaluation return std per task", r"eval/.*/std_return"),
                ("evaluation episode length per task", r"eval/.*/mean_length"),
            )
        },
        **layout_groups(prefix="plasticity/"),
    }
