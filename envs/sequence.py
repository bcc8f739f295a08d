"""A single gymnasium env that plays a sequence of tasks on a step-count schedule.

The schedule counts environment steps over all parallel copies together: SB3 VecEnvs step their
copies in lockstep, so each copy knows the global step count as its own step count times
``num_envs``, and all copies switch task at the same vec step without talking to each other.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, SupportsFloat

import gymnasium as gym
import numpy as np

Order = Literal["cyclic", "random", "explicit"]
ORDERS: tuple[str, ...] = ("cyclic", "random", "explicit")
"""Valid values of the ``order`` argument of :class:`TaskSequenceEnv`."""

# Stream keys for the SeedSequence draws made here (the task families use 1 and 2).
_ORDER_STREAM = 3
_GAME_SEED_STREAM = 4


@dataclass(frozen=True)
class Task:
    """One task of a sequence.

    :param name: readable, e.g. ``"space_invaders"`` or ``"breakout/perm3"``
    :param make: creates the task's env; called once, on the task's first visit
    """

    name: str
    make: Callable[[], gym.Env]


def task_game_seed(reset_seed: int, task_index: int) -> int:
    """Seed given to a task env, derived from the seed passed to :meth:`TaskSequenceEnv.reset`.

    :param reset_seed: seed passed to ``reset``
    :param task_index: index of the task
    :return: a seed in ``[0, 2**32)``
    """
    state = np.random.SeedSequence([reset_seed, _GAME_SEED_STREAM, task_index]).generate_state(1)
    return int(state[0])


class TaskSequenceEnv(gym.Env):
    """Plays ``tasks`` in turn, switching every ``switch_every`` environment steps.

    Segment ``k`` (global steps ``[k * switch_every, (k + 1) * switch_every)``) runs task
    :meth:`task_at` ``(k)``. The step that reaches a segment boundary ends the episode in flight as
    truncated (unless it terminated anyway), with ``info["task_switch"] = True`` and
    ``info["next_task_id"]``; the next ``reset()`` starts the new task. Every ``info`` carries the
    ``task_id`` and ``task_name`` of the task the transition belongs to, and every step's ``info``
    carries ``task_switch`` (``False`` except on boundary steps).

    Task envs are created on first visit and kept, so a revisit continues the same env: same
    permutation, same RNG stream. ``reset(seed=s)`` seeds each task env at its next reset with a
    seed derived from ``(s, task_index)``; without a seed the task envs are never seeded.

    :param tasks: the tasks; their observation and action spaces must all equal task 0's
    :param switch_every: environment steps per segment, counted over all ``num_envs`` copies
    :param order: ``"cyclic"`` (0, 1, ..., n-1, 0, ...), ``"random"`` (a fresh seeded permutation
        of all tasks in every cycle) or ``"explicit"`` (``task_order`` repeated)
    :param task_order: task indices for ``order="explicit"``
    :param seed: sequence seed; fixes the random order (task families take it at build time)
    :param num_envs: number of parallel copies stepped in lockstep; must divide ``switch_every``
    """

    metadata: dict[str, Any] = {"render_modes": []}

    def __init__(
        self,
        tasks: Sequence[Task],
        switch_every: int,
        order: Order = "cyclic",
        task_order: Sequence[int] | None = None,
        seed: int = 0,
        num_envs: int = 1,
    ):
        self._tasks = tuple(tasks)
        if not self._tasks:
            raise ValueError("tasks must not be empty.")
        if switch_every <= 0:
            raise ValueError(f"switch_every must be positive, got {switch_every}.")
        if num_envs <= 0:
            raise ValueError(f"num_envs must be positive, got {num_envs}.")
        if switch_every % num_envs != 0:
            raise ValueError(
                f"switch_every ({switch_every}) must be a multiple of num_envs ({num_envs}) so that "
                "all parallel copies switch at the same step."
            )
        if order not in ORDERS:
            raise ValueError(f"Unknown order {order!r}; valid orders are {', '.join(ORDERS)}.")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}.")
        self._order = order
        self._task_order = self._check_task_order(order, task_order, len(self._tasks))
        self._seed = seed
        self._switch_every = switch_every
        self._num_envs = num_envs
        self._local_switch_every = switch_every // num_envs
        self._random_cycle: tuple[int, np.ndarray] | None = None

        self._envs: dict[int, gym.Env] = {}
        # Task 0 defines the spaces, so it is created up front.
        first = self._tasks[0].make()
        self._envs[0] = first
        self.observation_space = first.observation_space
        self.action_space = first.action_space

        self._local_step = 0
        self._current_task = self.task_at(0)
        self._switch_pending = False
        self._episode_active = False
        self._game_seed: int | None = None
        self._tasks_to_seed: set[int] = set()

    @staticmethod
    def _check_task_order(order: str, task_order: Sequence[int] | None, num_tasks: int) -> tuple[int, ...]:
        """Validate ``task_order`` against ``order`` and return it as a tuple."""
        if order != "explicit":
            if task_order is not None:
                raise ValueError(f"task_order is only used with order='explicit', not {order!r}.")
            return ()
        if task_order is None or len(task_order) == 0:
            raise ValueError("order='explicit' needs a non-empty task_order.")
        for index in task_order:
            if not (isinstance(index, (int, np.integer)) and 0 <= index < num_tasks):
                raise ValueError(
                    f"task_order entry {index!r} is not a task index; valid indices are 0..{num_tasks - 1}."
                )
        return tuple(int(index) for index in task_order)

    # --- Read-only schedule information ----------------------------------------------------

    @property
    def num_tasks(self) -> int:
        """Number of tasks in the sequence."""
        return len(self._tasks)

    @property
    def task_names(self) -> list[str]:
        """Names of the tasks, by task index."""
        return [task.name for task in self._tasks]

    @property
    def current_task_id(self) -> int:
        """Task of the segment in progress (until a pending switch is taken by ``reset``)."""
        return self._current_task

    @property
    def current_env(self) -> gym.Env:
        """Env of the current task, created if it was never visited."""
        return self._task_env(self._current_task)

    @property
    def global_step(self) -> int:
        """Environment steps taken so far over all parallel copies (local steps * ``num_envs``)."""
        return self._local_step * self._num_envs

    @property
    def switch_every(self) -> int:
        """Global environment steps per segment."""
        return self._switch_every

    @property
    def num_envs(self) -> int:
        """Number of parallel copies the schedule is counted over."""
        return self._num_envs

    def task_at(self, segment: int) -> int:
        """Task index that segment ``segment`` runs.

        :param segment: segment index, ``global_step // switch_every``
        :return: task index
        """
        if segment < 0:
            raise ValueError(f"segment must be non-negative, got {segment}.")
        n = len(self._tasks)
        if self._order == "cyclic":
            return segment % n
        if self._order == "explicit":
            return self._task_order[segment % len(self._task_order)]
        cycle, position = divmod(segment, n)
        if self._random_cycle is None or self._random_cycle[0] != cycle:
            rng = np.random.default_rng(np.random.SeedSequence([self._seed, _ORDER_STREAM, cycle]))
            self._random_cycle = (cycle, rng.permutation(n))
        return int(self._random_cycle[1][position])

    # --- Checkpointing -----------------------------------------------------------------------

    def get_state(self) -> dict[str, Any]:
        """Schedule position, for checkpoint and resume.

        Task envs (and their RNG states) are not part of it. After :meth:`set_state` the next call
        must be ``reset()``.

        :return: ``{"local_step", "current_task_id", "switch_pending"}``
        """
        return {
            "local_step": self._local_step,
            "current_task_id": self._current_task,
            "switch_pending": self._switch_pending,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        """Restore a schedule position saved by :meth:`get_state`.

        The state is checked against this env's schedule (``switch_every``, ``num_envs``, order),
        so restoring into a differently configured sequence fails instead of drifting silently.

        :param state: dict returned by :meth:`get_state`
        """
        expected = {"local_step", "current_task_id", "switch_pending"}
        if set(state) != expected:
            raise ValueError(f"state must have exactly the keys {sorted(expected)}, got {sorted(state)}.")
        local_step = int(state["local_step"])
        current_task = int(state["current_task_id"])
        switch_pending = bool(state["switch_pending"])
        if local_step < 0:
            raise ValueError(f"local_step must be non-negative, got {local_step}.")
        at_boundary = local_step > 0 and local_step % self._local_switch_every == 0
        if switch_pending and not at_boundary:
            raise ValueError(f"A switch cannot be pending at local step {local_step}: not a boundary.")
        segment = local_step // self._local_switch_every - (1 if switch_pending else 0)
        if current_task != self.task_at(segment):
            raise ValueError(
                f"current_task_id {current_task} does not match this schedule, which runs task "
                f"{self.task_at(segment)} at local step {local_step}."
            )
        self._local_step = local_step
        self._current_task = current_task
        self._switch_pending = switch_pending
        self._episode_active = False

    # --- gymnasium API -----------------------------------------------------------------------

    def _task_env(self, task_id: int) -> gym.Env:
        """Env of ``task_id``, created (and checked against the sequence's spaces) on first use."""
        env = self._envs.get(task_id)
        if env is None:
            task = self._tasks[task_id]
            env = task.make()
            for kind, space, expected in (
                ("observation", env.observation_space, self.observation_space),
                ("action", env.action_space, self.action_space),
            ):
                if space != expected:
                    env.close()
                    raise ValueError(
                        f"Task {task_id} ({task.name!r}) has {kind} space {space}, but the sequence "
                        f"uses task 0's {expected}."
                    )
            self._envs[task_id] = env
        return env

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
        """Start an episode of the current task, first taking a pending task switch.

        :param seed: if given, every task env is seeded at its next reset with
            :func:`task_game_seed` ``(seed, task_index)``
        :param options: passed to the task env's ``reset``
        :return: observation and info (with ``task_id`` and ``task_name``)
        """
        super().reset(seed=seed)
        if seed is not None:
            self._game_seed = seed
            self._tasks_to_seed = set(range(len(self._tasks)))
        if self._switch_pending:
            self._current_task = self.task_at(self._local_step // self._local_switch_every)
            self._switch_pending = False
        task_id = self._current_task
        env = self._task_env(task_id)
        task_seed = None
        if self._game_seed is not None and task_id in self._tasks_to_seed:
            task_seed = task_game_seed(self._game_seed, task_id)
            self._tasks_to_seed.discard(task_id)
        obs, info = env.reset(seed=task_seed, options=options)
        info = dict(info)  # never mutate a dict the task env might keep
        info["task_id"] = task_id
        info["task_name"] = self._tasks[task_id].name
        self._episode_active = True
        return obs, info

    def step(self, action: Any) -> tuple[Any, SupportsFloat, bool, bool, dict[str, Any]]:
        """Step the current task; on a segment boundary, end the episode as truncated.

        :param action: action for the current task env
        :return: ``(obs, reward, terminated, truncated, info)``; ``info`` has ``task_id``,
            ``task_name`` and ``task_switch``, plus ``next_task_id`` on a boundary step
        """
        if not self._episode_active:
            raise RuntimeError(
                "Call reset() before step(): no episode is running (after a task switch, set_state() or at the start)."
            )
        task_id = self._current_task
        obs, reward, terminated, truncated, info = self._envs[task_id].step(action)
        self._local_step += 1
        info = dict(info)  # never mutate a dict the task env might keep
        info["task_id"] = task_id
        info["task_name"] = self._tasks[task_id].name
        if self._local_step % self._local_switch_every == 0:
            self._switch_pending = True
            self._episode_active = False
            info["task_switch"] = True
            info["next_task_id"] = self.task_at(self._local_step // self._local_switch_every)
            # Truncated, not terminated: the state is not terminal, so value targets bootstrap.
            truncated = not terminated
        else:
            info["task_switch"] = False
        return obs, reward, terminated, truncated, info

    def close(self) -> None:
        """Close every task env created so far."""
        for env in self._envs.values():
            env.close()
        self._envs.clear()
