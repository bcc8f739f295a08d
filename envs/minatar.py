"""MinAtar games with a fixed, channel-first observation layout shared by all five games.

Every game is exposed with the full action set (``Discrete(6)``) and a ``(10, 10, 10)`` ``uint8``
observation: the game's own 4..10 channels first, zero padding after. This is the layout of the
continual MinAtar protocol (C-CHAIN), where one network plays every game in turn.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from gymnasium.wrappers import TransformObservation


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """Silence the root logger for the duration of the block, without configuring it.

    MinAtar calls ``logging.warning(...)`` at import when seaborn is missing. Besides the noise, that
    call runs ``logging.basicConfig()`` whenever the root logger has no handler, which would change the
    logging setup of the whole program. A temporary ``NullHandler`` prevents that and a raised level
    drops the message.
    """
    root = logging.getLogger()
    previous_level = root.level
    placeholder = logging.NullHandler()
    root.addHandler(placeholder)
    root.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        root.removeHandler(placeholder)
        root.setLevel(previous_level)


with _quiet_root_logger():
    from minatar.gym import BaseEnv


MINATAR_GAMES: tuple[str, ...] = ("asterix", "breakout", "freeway", "seaquest", "space_invaders")
"""Names of the five MinAtar games."""

MINATAR_CHANNELS = 10
"""Number of observation channels after padding (the largest game, Seaquest, has 10)."""

MINATAR_ACTIONS = 6
"""Size of the full MinAtar action set, shared by all games."""

MINATAR_OBS_SHAPE: tuple[int, int, int] = (MINATAR_CHANNELS, 10, 10)
"""Channel-first observation shape of every game returned by :func:`make_minatar_game`."""


def check_minatar_game(game: str) -> None:
    """Raise ``ValueError`` unless ``game`` is one of :data:`MINATAR_GAMES`.

    :param game: name of a MinAtar game
    """
    if game not in MINATAR_GAMES:
        raise ValueError(f"Unknown MinAtar game {game!r}; valid games are {', '.join(MINATAR_GAMES)}.")


class _MinAtarEnv(BaseEnv):
    """MinAtar's gymnasium env with ``float`` rewards and a seeded reset that fully determines what follows.

    MinAtar keeps the previous episode's last action as the action a sticky repeat replays, even
    across resets, so without this ``reset(seed=s)`` on a used env could diverge from a fresh env
    reset with the same seed. Some games return ``np.int64`` rewards, which gymnasium/SB3 checkers
    reject, so rewards are cast to ``float``.
    """

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        """Play one step of the game; the reward is returned as a Python ``float``."""
        obs, reward, terminated, truncated, info = super().step(action)
        return obs, float(reward), terminated, truncated, info

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Reset the game; with a seed, MinAtar's RNG is reseeded and the sticky action cleared."""
        if seed is not None:
            self.game.last_action = 0
        return super().reset(seed=seed, options=options)


def _channel_first_padder(n_channels: int) -> Callable[[np.ndarray], np.ndarray]:
    """Return a function mapping a ``(10, 10, n_channels)`` bool state to the padded uint8 layout.

    Writing the transposed view into a zeroed array is a single allocation and a single copy; it
    measured fastest among the options tried (``np.pad``, ``np.concatenate``, a reused buffer plus
    ``copy()``).
    """

    def convert(state: np.ndarray) -> np.ndarray:
        out = np.zeros(MINATAR_OBS_SHAPE, dtype=np.uint8)
        out[:n_channels] = state.transpose(2, 0, 1)
        return out

    return convert


def make_minatar_game(game: str, sticky_action_prob: float = 0.1, difficulty_ramping: bool = True) -> gym.Env:
    """Create a MinAtar game with the padded channel-first observation and the full action set.

    The env is constructed directly rather than through ``gym.make`` to keep the env checker and
    order enforcer off the hot path. ``reset(seed=s)`` seeds MinAtar's own RNG (sticky actions and
    game randomness), so equal seeds give equal trajectories for equal actions.

    :param game: one of :data:`MINATAR_GAMES`
    :param sticky_action_prob: probability of repeating the previous action instead of the chosen one
    :param difficulty_ramping: whether the game speeds up over an episode (MinAtar's default)
    :return: env with observation space ``Box(0, 1, (10, 10, 10), uint8)`` and ``Discrete(6)`` actions
    """
    check_minatar_game(game)
    base = _MinAtarEnv(
        game,
        use_minimal_action_set=False,
        sticky_action_prob=sticky_action_prob,
        difficulty_ramping=difficulty_ramping,
    )
    n_channels = base.observation_space.shape[-1]
    observation_space = spaces.Box(low=0, high=1, shape=MINATAR_OBS_SHAPE, dtype=np.uint8)
    return TransformObservation(base, _channel_first_padder(n_channels), observation_space)
