"""Cut an episode that has gone on long with almost no return (C-CHAIN's Seaquest fix).

In MinAtar Seaquest a submarine that never dives keeps its oxygen and never dies, so an episode can go on
forever with a return of zero. C-CHAIN (bluecontra/C-CHAIN, ``crl_minatar/crl_run_double_dqn.py``: the training
loop's ``if ep_step_count >= 1000 and ep_reward < 0.1: break`` and the same test in ``evaluate_policy``, both
"BugFixed for Seaquest never done case") ends such an episode after 1000 steps with a return below 0.1, in
training and in evaluation. The transition is stored with ``done = 0`` there, so it is a truncation here:
value targets bootstrap through it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, SupportsFloat

import gymnasium as gym

#: The keys of the ``low_return_cutoff`` sequence option (see :func:`check_cutoff`).
CUTOFF_KEYS = ("steps", "min_return", "games")


class LowReturnCutoff(gym.Wrapper):
    """Ends an episode as truncated on the first step at or after its ``steps``-th whose return is below
    ``min_return``.

    The return is the sum of the rewards the wrapped env gave this episode, the current step's included, and the
    test runs after every step from the ``steps``-th on (as C-CHAIN's). The step that cuts the episode has
    ``info["low_return_cutoff"] = True``. ``reset()`` starts the count again.

    :param env: the env to wrap
    :param steps: episode length (steps) from which the test applies, e.g. 1000
    :param min_return: an episode whose return is still below this is cut, e.g. 0.1
    """

    def __init__(self, env: gym.Env, steps: int, min_return: float) -> None:
        super().__init__(env)
        if steps <= 0:
            raise ValueError(f"steps must be positive, got {steps}.")
        self.steps = steps
        self.min_return = min_return
        self._episode_steps = 0
        self._episode_return = 0.0

    def reset(self, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
        """Reset the wrapped env and the episode's step count and return."""
        self._episode_steps, self._episode_return = 0, 0.0
        return self.env.reset(**kwargs)

    def step(self, action: Any) -> tuple[Any, SupportsFloat, bool, bool, dict[str, Any]]:
        """Step the wrapped env; truncate if the episode is long enough and its return still too low."""
        obs, reward, terminated, truncated, info = self.env.step(action)
        self._episode_steps += 1
        self._episode_return += float(reward)
        if (
            not (terminated or truncated)
            and self._episode_steps >= self.steps
            and self._episode_return < self.min_return
        ):
            info = dict(info)  # never mutate a dict the wrapped env might keep
            info["low_return_cutoff"] = True
            truncated = True
        return obs, reward, terminated, truncated, info


def task_game(task_name: str) -> str:
    """The game (base env) of a task: its name up to the first ``/`` (``breakout/perm3`` -> ``breakout``)."""
    return task_name.split("/", 1)[0]


def check_cutoff(value: Any, known_games: Sequence[str]) -> dict[str, Any] | None:
    """Validate the ``low_return_cutoff`` sequence option and return it with its defaults filled in.

    :param value: ``None`` (off) or a mapping ``{steps: int > 0, min_return: number, games: list of game names}``;
        ``games`` is optional (default: every task).
    :param known_games: the game names a task can have (:func:`task_game`), to catch a misspelt one
    :return: ``None`` or ``{"steps", "min_return", "games"}`` (``games`` ``None`` for every task)
    :raises ValueError: a one-line message naming the bad key
    """
    if value is None:
        return None
    where = "Option 'low_return_cutoff'"
    if not isinstance(value, Mapping):
        raise ValueError(f"{where} must be null or a mapping with keys {', '.join(CUTOFF_KEYS)}, got {value!r}.")
    unknown = sorted(set(value) - set(CUTOFF_KEYS))
    if unknown:
        raise ValueError(
            f"{where} has unknown key(s) {', '.join(map(str, unknown))}; valid keys: {', '.join(CUTOFF_KEYS)}."
        )
    steps, min_return, games = value.get("steps"), value.get("min_return"), value.get("games")
    if not (isinstance(steps, int) and not isinstance(steps, bool) and steps > 0):
        raise ValueError(f"{where}: steps must be a positive integer, got {steps!r}.")
    if not (isinstance(min_return, (int, float)) and not isinstance(min_return, bool) and math.isfinite(min_return)):
        raise ValueError(f"{where}: min_return must be a number, got {min_return!r}.")
    if games is not None:
        if isinstance(games, str) or not isinstance(games, Sequence) or not games:
            raise ValueError(f"{where}: games must be a non-empty list of game names, got {games!r}.")
        for game in games:
            if game not in known_games:
                raise ValueError(f"{where}: '{game}' is not a game; valid: {', '.join(known_games)}.")
        games = list(games)
    return {"steps": steps, "min_return": float(min_return), "games": games}


def with_cutoff(make: Callable[[], gym.Env], steps: int, min_return: float) -> gym.Env:
    """``make()`` wrapped in :class:`LowReturnCutoff` (module-level, so that tasks hold picklable partials)."""
    return LowReturnCutoff(make(), steps, min_return)
