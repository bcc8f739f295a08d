"""Separate copies of single tasks of a run's sequence, for the random-policy probe sets and evaluation.

A copy of task ``k`` is the run's own sequence (same name, options and sequence seed, so the same
permutation or game settings) built with ``order=explicit, task_order=[k]`` and a schedule that never
switches: it plays task ``k`` exactly as training does, but shares no env, RNG or state with training.
``reset(seed=s)`` seeds the task's game with :func:`envs.task_game_seed` ``(s, k)``, as in training.

A fresh-network run for task ``k`` (``env.order=explicit env.task_order=[k]``, see ``rlp sweep --fresh``)
and a continual run with the same seed build the same copies of task ``k``.
"""

from __future__ import annotations

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
        env = cfg.env
        seed = cfg.seed if env.sequence_seed is None else env.sequence_seed
        return cls(env.sequence, dict(env.options), int(seed), int(cfg.seed))

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
