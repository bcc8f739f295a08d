"""Named task sequences, buildable by name and registered as gymnasium ids.

Each sequence is a builder returning a list of :class:`~envs.sequence.Task`; its keyword arguments
are the sequence's options. :func:`make_sequence` adds the schedule and returns a
:class:`~envs.sequence.TaskSequenceEnv`.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import gymnasium as gym

from envs.cutoff import check_cutoff, task_game, with_cutoff
from envs.families import CARTPOLE_PARAMS, make_cartpole, permute_observations, scale_reward, shuffle_actions
from envs.minatar import MINATAR_GAMES, check_minatar_game, make_minatar_game
from envs.sequence import Order, Task, TaskSequenceEnv


@dataclass(frozen=True)
class SequenceSpec:
    """Description of a named task sequence.

    :param name: key in :data:`SEQUENCES`, e.g. ``"continual_minatar"``
    :param gym_id: gymnasium id, e.g. ``"rlp/ContinualMinAtar-v0"``
    :param description: one line
    :param build: builder taking the sequence's options as keyword arguments (and ``seed``, the
        sequence seed, if the tasks depend on it) and returning the tasks
    :param defaults: the options and their default values (the builder's keyword defaults)
    :param default_switch_every: ``switch_every`` used by ``gym.make`` when none is passed
    """

    name: str
    gym_id: str
    description: str
    build: Callable[..., list[Task]]
    defaults: dict[str, Any]
    default_switch_every: int = 100_000


# --- Task constructors (module-level so tasks hold picklable partials, not closures) -----------


def _permuted_game(
    game: str,
    seed: int,
    task_index: int,
    permute_channels: bool,
    sticky_action_prob: float,
    difficulty_ramping: bool,
) -> gym.Env:
    env = make_minatar_game(game, sticky_action_prob, difficulty_ramping)
    return permute_observations(env, seed, task_index, permute_channels)


def _shuffled_game(
    game: str, seed: int, task_index: int, sticky_action_prob: float, difficulty_ramping: bool
) -> gym.Env:
    return shuffle_actions(make_minatar_game(game, sticky_action_prob, difficulty_ramping), seed, task_index)


def _scaled_game(game: str, scale: float, sticky_action_prob: float, difficulty_ramping: bool) -> gym.Env:
    return scale_reward(make_minatar_game(game, sticky_action_prob, difficulty_ramping), scale)


#: Largest family a builder makes: each task keeps its own env alive, so this bounds memory and build time.
MAX_TASKS = 1000


def _check_num_tasks(num_tasks: int) -> None:
    if not 1 <= num_tasks <= MAX_TASKS:
        raise ValueError(f"num_tasks must be between 1 and {MAX_TASKS}, got {num_tasks}.")


def _kind_of(default: Any) -> tuple[str, Callable[[Any], bool]]:
    """What an option must be, judged from its default: bool, int, number, str or a list of those."""
    if isinstance(default, bool):
        return "true or false", lambda v: isinstance(v, bool)
    if isinstance(default, int):
        return "an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)
    if isinstance(default, float):
        return "a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if isinstance(default, str):
        return "a string", lambda v: isinstance(v, str)
    item_kind, item_ok = _kind_of(default[0])
    return f"a list of {item_kind.removeprefix('an ').removeprefix('a ')}s", (
        lambda v: isinstance(v, (list, tuple)) and all(item_ok(x) for x in v)
    )


def _check_options(name: str, build: Callable[..., list[Task]], options: dict[str, Any]) -> None:
    """Every option has the kind of its default (so a bad value fails here, not deep inside an env)."""
    parameters = inspect.signature(build).parameters
    for option, value in options.items():
        kind, ok = _kind_of(parameters[option].default)
        if not ok(value):
            raise ValueError(f"Option {option!r} of sequence {name!r} must be {kind}, got {value!r}.")
    prob = options.get("sticky_action_prob")
    if prob is not None and not 0.0 <= prob <= 1.0:
        raise ValueError(f"Option 'sticky_action_prob' of sequence {name!r} must be in [0, 1], got {prob!r}.")


# --- Builders ----------------------------------------------------------------------------------


def build_minatar_games(
    *,
    games: Sequence[str] = MINATAR_GAMES,
    sticky_action_prob: float = 0.1,
    difficulty_ramping: bool = True,
) -> list[Task]:
    """One task per MinAtar game, in the given order."""
    if isinstance(games, str) or len(games) == 0:
        raise ValueError(f"games must be a non-empty list of game names from {', '.join(MINATAR_GAMES)}.")
    for game in games:
        check_minatar_game(game)
    return [Task(game, partial(make_minatar_game, game, sticky_action_prob, difficulty_ramping)) for game in games]


def _fixed_games(games: tuple[str, ...], doc: str) -> Callable[..., list[Task]]:
    """A builder for a fixed list of games; its options are the per-game ones only."""

    def build(*, sticky_action_prob: float = 0.1, difficulty_ramping: bool = True) -> list[Task]:
        return build_minatar_games(
            games=games, sticky_action_prob=sticky_action_prob, difficulty_ramping=difficulty_ramping
        )

    build.__doc__ = doc
    return build


build_continual_minatar = _fixed_games(
    ("space_invaders", "asterix", "seaquest"), "Continual MinAtar of C-CHAIN: space_invaders -> asterix -> seaquest."
)
build_continual_minatar_freeway = _fixed_games(
    ("space_invaders", "asterix", "freeway"), "Second continual MinAtar variant: space_invaders -> asterix -> freeway."
)


def build_permuted_minatar(
    *,
    seed: int = 0,
    game: str = "breakout",
    num_tasks: int = 6,
    permute_channels: bool = False,
    sticky_action_prob: float = 0.1,
    difficulty_ramping: bool = True,
) -> list[Task]:
    """One game under ``num_tasks`` fixed observation permutations drawn from ``(seed, task)``."""
    check_minatar_game(game)
    _check_num_tasks(num_tasks)
    return [
        Task(
            f"{game}/perm{i}",
            partial(_permuted_game, game, seed, i, permute_channels, sticky_action_prob, difficulty_ramping),
        )
        for i in range(num_tasks)
    ]


def build_shuffled_actions_minatar(
    *,
    seed: int = 0,
    game: str = "breakout",
    num_tasks: int = 6,
    sticky_action_prob: float = 0.1,
    difficulty_ramping: bool = True,
) -> list[Task]:
    """One game under ``num_tasks`` fixed action permutations drawn from ``(seed, task)``."""
    check_minatar_game(game)
    _check_num_tasks(num_tasks)
    return [
        Task(
            f"{game}/actions{i}",
            partial(_shuffled_game, game, seed, i, sticky_action_prob, difficulty_ramping),
        )
        for i in range(num_tasks)
    ]


def build_reward_flip_minatar(
    *,
    game: str = "breakout",
    reward_scales: Sequence[float] = (1.0, -1.0),
    sticky_action_prob: float = 0.1,
    difficulty_ramping: bool = True,
) -> list[Task]:
    """One game with its reward multiplied by each of ``reward_scales`` in turn."""
    check_minatar_game(game)
    if len(reward_scales) == 0:
        raise ValueError("reward_scales must not be empty.")
    return [
        Task(
            f"{game}/reward{float(scale):+}",
            partial(_scaled_game, game, float(scale), sticky_action_prob, difficulty_ramping),
        )
        for scale in reward_scales
    ]


def build_cartpole_shift(*, param: str = "length", values: Sequence[float] = (0.5, 1.5, 0.25)) -> list[Task]:
    """CartPole-v1 with ``param`` set to each of ``values`` in turn (the fast-test family)."""
    if param not in CARTPOLE_PARAMS:
        raise ValueError(f"Unknown CartPole parameter {param!r}; valid parameters are {', '.join(CARTPOLE_PARAMS)}.")
    if len(values) == 0:
        raise ValueError("values must not be empty.")
    return [Task(f"cartpole/{param}={float(value):g}", partial(make_cartpole, param, float(value))) for value in values]


# --- Registry ----------------------------------------------------------------------------------


def _option_names(build: Callable[..., list[Task]]) -> list[str]:
    """Options of a builder: its keyword parameters except ``seed``, which is the sequence seed."""
    return [name for name in inspect.signature(build).parameters if name != "seed"]


#: Options every sequence takes, applied by :func:`make_sequence` to the tasks the builder made.
#: ``low_return_cutoff``: null, or ``{steps, min_return, games}``: cut an episode of those games (default: all)
#: once it is ``steps`` long with a return below ``min_return`` (:class:`envs.cutoff.LowReturnCutoff`).
COMMON_OPTIONS: dict[str, Any] = {"low_return_cutoff": None}

#: Game names a task can have (:func:`envs.cutoff.task_game`).
GAMES: tuple[str, ...] = (*MINATAR_GAMES, "cartpole")


def _spec(
    name: str, gym_id: str, description: str, build: Callable[..., list[Task]], switch_every: int
) -> SequenceSpec:
    parameters = inspect.signature(build).parameters
    defaults = {option: parameters[option].default for option in _option_names(build)}
    return SequenceSpec(name, gym_id, description, build, {**defaults, **COMMON_OPTIONS}, switch_every)


SEQUENCES: dict[str, SequenceSpec] = {
    spec.name: spec
    for spec in (
        _spec(
            "continual_minatar",
            "rlp/ContinualMinAtar-v0",
            "C-CHAIN continual MinAtar: space_invaders -> asterix -> seaquest.",
            build_continual_minatar,
            100_000,
        ),
        _spec(
            "continual_minatar_freeway",
            "rlp/ContinualMinAtarFreeway-v0",
            "Continual MinAtar ending in Freeway: space_invaders -> asterix -> freeway.",
            build_continual_minatar_freeway,
            100_000,
        ),
        _spec(
            "minatar_games",
            "rlp/MinAtarGames-v0",
            "Any list of MinAtar games (default: all five).",
            build_minatar_games,
            100_000,
        ),
        _spec(
            "permuted_minatar",
            "rlp/PermutedMinAtar-v0",
            "One MinAtar game under fixed per-task permutations of the 10x10 positions (and channels).",
            build_permuted_minatar,
            100_000,
        ),
        _spec(
            "shuffled_actions_minatar",
            "rlp/ShuffledActionsMinAtar-v0",
            "One MinAtar game under fixed per-task permutations of the 6 actions.",
            build_shuffled_actions_minatar,
            100_000,
        ),
        _spec(
            "reward_flip_minatar",
            "rlp/RewardFlipMinAtar-v0",
            "One MinAtar game with a per-task reward scale (default: +1 then -1).",
            build_reward_flip_minatar,
            100_000,
        ),
        _spec(
            "cartpole_shift",
            "rlp/CartPoleShift-v0",
            "CartPole-v1 with a different pole length, gravity or pole mass per task (fast tests).",
            build_cartpole_shift,
            10_000,
        ),
    )
}
"""All named sequences, by name."""


def make_sequence(
    name: str,
    *,
    switch_every: int,
    order: Order = "cyclic",
    task_order: Sequence[int] | None = None,
    seed: int = 0,
    num_envs: int = 1,
    **options: Any,
) -> TaskSequenceEnv:
    """Build the named sequence as a :class:`~envs.sequence.TaskSequenceEnv`.

    :param name: a key of :data:`SEQUENCES`
    :param switch_every: environment steps per task segment, counted over all ``num_envs`` copies
    :param order: ``"cyclic"``, ``"random"`` or ``"explicit"``
    :param task_order: task indices for ``order="explicit"``
    :param seed: sequence seed (random order, permutations of the task families)
    :param num_envs: number of parallel copies stepped in lockstep
    :param options: the sequence's options, see ``SEQUENCES[name].defaults`` (its builder's and
        :data:`COMMON_OPTIONS`)
    :return: the sequence env
    """
    spec = SEQUENCES.get(name)
    if spec is None:
        raise ValueError(f"Unknown sequence {name!r}; valid sequences are {', '.join(SEQUENCES)}.")
    valid = _option_names(spec.build) + list(COMMON_OPTIONS)
    for option in options:
        if option not in valid:
            raise ValueError(f"Unknown option {option!r} for sequence {name!r}; valid options are {', '.join(valid)}.")
    cutoff = check_cutoff(options.pop("low_return_cutoff", None), GAMES)
    _check_options(name, spec.build, options)
    if "seed" in inspect.signature(spec.build).parameters:
        options["seed"] = seed
    tasks = spec.build(**options)
    if cutoff is not None:
        tasks = [
            Task(task.name, partial(with_cutoff, task.make, cutoff["steps"], cutoff["min_return"]))
            if cutoff["games"] is None or task_game(task.name) in cutoff["games"]
            else task
            for task in tasks
        ]
    return TaskSequenceEnv(tasks, switch_every, order=order, task_order=task_order, seed=seed, num_envs=num_envs)


def register_sequences() -> None:
    """Register every sequence of :data:`SEQUENCES` under its gymnasium id (once per process)."""
    for spec in SEQUENCES.values():
        if spec.gym_id in gym.registry:
            continue
        gym.register(
            id=spec.gym_id,
            entry_point=f"{__name__}:make_sequence",
            kwargs={"name": spec.name, "switch_every": spec.default_switch_every},
        )
