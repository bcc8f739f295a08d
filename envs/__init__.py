"""Task sequences for studying loss of plasticity.

- :mod:`envs.minatar`: the five MinAtar games with one padded, channel-first layout.
- :mod:`envs.families`: transforms that make many tasks from one env (permuted observations,
  shuffled actions, reward scales, CartPole parameter shifts).
- :mod:`envs.sequence`: :class:`TaskSequenceEnv`, which plays tasks on a step-count schedule.
- :mod:`envs.cutoff`: :class:`LowReturnCutoff`, C-CHAIN's cut of long episodes with almost no return.
- :mod:`envs.registry`: named sequences (:data:`SEQUENCES`, :func:`make_sequence`).

Importing this package registers every named sequence as a gymnasium id, e.g.
``gymnasium.make("rlp/ContinualMinAtar-v0", switch_every=1000)``.
"""

from envs.cutoff import LowReturnCutoff
from envs.families import (
    CARTPOLE_PARAMS,
    PermuteObservation,
    ScaleReward,
    ShuffleActions,
    action_permutation,
    apply_observation_permutation,
    invert_observation_permutation,
    make_cartpole,
    observation_permutation,
    permute_observations,
    scale_reward,
    shuffle_actions,
)
from envs.minatar import (
    MINATAR_ACTIONS,
    MINATAR_CHANNELS,
    MINATAR_GAMES,
    MINATAR_OBS_SHAPE,
    check_minatar_game,
    make_minatar_game,
)
from envs.registry import SEQUENCES, SequenceSpec, make_sequence, register_sequences
from envs.sequence import ORDERS, Task, TaskSequenceEnv, task_game_seed

register_sequences()

__all__ = [
    "CARTPOLE_PARAMS",
    "MINATAR_ACTIONS",
    "MINATAR_CHANNELS",
    "MINATAR_GAMES",
    "MINATAR_OBS_SHAPE",
    "ORDERS",
    "SEQUENCES",
    "LowReturnCutoff",
    "PermuteObservation",
    "ScaleReward",
    "SequenceSpec",
    "ShuffleActions",
    "Task",
    "TaskSequenceEnv",
    "action_permutation",
    "apply_observation_permutation",
    "check_minatar_game",
    "invert_observation_permutation",
    "make_cartpole",
    "make_minatar_game",
    "make_sequence",
    "observation_permutation",
    "permute_observations",
    "register_sequences",
    "scale_reward",
    "shuffle_actions",
    "task_game_seed",
]
