"""Separate copies of single tasks of a run's sequence, for the random-policy probe sets and evaluation.

A copy of task ``k`` is the run's own sequence (same name, options and sequence seed, so the same
permutation or game settings) built with ``order=explicit, task_order=[k]`` and a schedule that never
switches: it plays task ``k`` exactly as training does, but shares no env, RNG or state with training.
``reset(seed=s)`` seeds the task's game with :func:`envs.task_game_seed` ``(s, k)``, as in training.

A fresh-network run for task ``k`` (``env.order=explicit env.task_order=[k]``, see ``rlp sweep --fresh``)
and a continual run with the same seed build the same copies of task ``k``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from envs import TaskSequenceEnv, make_sequence

#: The schedule of a copy: so long that it never switches (a copy plays one task only).
_NEVER = 2**62


def derived_seed(*words: int) -> int:
    """A seed in ``[0, 2**32)`` from a tuple of non-negative integers (NumPy's ``SeedSequence``).

    Distinct tuples give independent streams, so a seed made for one purpose (a probe set, an evaluation
    episode) never coincides with training's.
    """
    return int(np.random.SeedSequence([int(w) for w in words]).generate_state(1)[0])


def sequence_seed(env: Mapping[str, Any], run_seed: int) -> int:
    """The seed of a run's task family and random order: ``env.sequence_seed``, or the run seed when it is null."""
    seed = env.get("sequence_seed")
    return int(run_seed if seed is None else seed)


def sequence_args(env: Mapping[str, Any], run_seed: int) -> dict[str, Any]:
    """:func:`envs.make_sequence`'s keyword arguments for a run's ``env:`` section: the name, the schedule, the
    number of envs, the sequence seed (:func:`sequence_seed`) and the sequence's own options.

    The one place that maps the config's ``env`` keys to the sequence: the runner builds its training envs with
    it, and the report rebuilds a run's sequence (for its task names) from the saved ``config.yaml`` with it.

    :param env: the ``env`` section as a mapping (``EnvConfig.model_dump()``, or read from ``config.yaml``).
    :param run_seed: the run's ``seed``.
    :raises KeyError: ``env`` lacks a key of the schedule.
    """
    return dict(
        name=env["sequence"],
        switch_every=env["switch_every"],
        order=env["order"],
        task_order=env.get("task_order"),
        seed=sequence_seed(env, run_seed),
        num_envs=env["n_envs"],
        **(env.get("options") or {}),
    )


@dataclass
class TaskEnvs:
    """Makes copies of single tasks of a sequence (see the module docstring).

    :param sequence: the registered sequence name (``env.sequence``).
    :param options: the sequence's options (``env.options``).
    :param sequence_seed: the resolved sequence seed (``env.sequence_seed``, or the run seed).
    :param run_seed: the run seed (``seed``).
    """

    sequence: str
    options: dict[str, Any]
    sequence_seed: int
    run_seed: int
    task_names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.task_names:
            probe = self.make(0)
            self.task_names = list(probe.task_names)
            probe.close()

    @classmethod
    def from_config(cls, cfg: Any) -> TaskEnvs:
        """The copies of a :class:`~rl_plasticity.config.RunConfig`'s sequence."""
        env = cfg.env.model_dump()
        return cls(env["sequence"], env["options"], sequence_seed(env, cfg.seed), int(cfg.seed))

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    def make(self, task_id: int) -> TaskSequenceEnv:
        """A new copy of task ``task_id`` (gymnasium env; ``reset(seed=...)`` before stepping)."""
        return make_sequence(
            self.sequence,
            switch_every=_NEVER,
            order="explicit",
            task_order=[task_id],
            seed=self.sequence_seed,
            num_envs=1,
            **self.options,
        )
