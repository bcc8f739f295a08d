"""Tests for the envs package: MinAtar layout, task families, schedules, registry."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
from gymnasium import spaces
from minatar.gym import BaseEnv
from stable_baselines3.common.vec_env import DummyVecEnv

import envs
from envs import (
    MINATAR_GAMES,
    SEQUENCES,
    Task,
    TaskSequenceEnv,
    apply_observation_permutation,
    invert_observation_permutation,
    make_cartpole,
    make_minatar_game,
    make_sequence,
    observation_permutation,
    permute_observations,
    scale_reward,
    shuffle_actions,
)

MINATAR_SEQUENCES = [name for name in SEQUENCES if name != "cartpole_shift"]
REPO_ROOT = Path(__file__).resolve().parents[1]


def cartpole_tasks(n: int) -> list[Task]:
    """``n`` cheap, distinct tasks."""
    return envs.registry.build_cartpole_shift(values=tuple(0.5 + 0.25 * i for i in range(n)))


def run_schedule(env: TaskSequenceEnv, steps: int, action: Any = 0) -> list[dict[str, Any]]:
    """Step ``env`` (resetting whenever an episode ends) and return every step's info."""
    infos = []
    for _ in range(steps):
        _, _, terminated, truncated, info = env.step(action)
        infos.append(info)
        if terminated or truncated:
            env.reset()
    return infos


def segment_tasks(env: TaskSequenceEnv, num_segments: int) -> list[int]:
    """Task id of each segment as actually played, read from the step infos."""
    env.reset(seed=0)
    infos = run_schedule(env, num_segments * env.switch_every)
    return [infos[k * env.switch_every]["task_id"] for k in range(num_segments)]


def rollout(env: gym.Env, seed: int, actions: np.ndarray) -> tuple[list[np.ndarray], list[float]]:
    """Observations and rewards of ``actions`` played from ``reset(seed=seed)``, resetting on done."""
    obs, _ = env.reset(seed=seed)
    observations, rewards = [obs], []
    for action in actions:
        obs, reward, terminated, truncated, _ = env.step(int(action))
        observations.append(obs)
        rewards.append(float(reward))
        if terminated or truncated:
            obs, _ = env.reset()
            observations.append(obs)
    return observations, rewards


class RecordingEnv(gym.Env):
    """Discrete(6) env that records the actions it receives."""

    observation_space = spaces.Box(0, 1, (1,), np.float32)
    action_space = spaces.Discrete(6)

    def __init__(self) -> None:
        self.received: list[int] = []

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        return np.zeros(1, np.float32), {}

    def step(self, action):
        self.received.append(int(action))
        return np.zeros(1, np.float32), 0.0, False, False, {}


# --- MinAtar layout --------------------------------------------------------------------------


@pytest.mark.parametrize("game", MINATAR_GAMES)
def test_minatar_obs_is_raw_state_channel_first_and_zero_padded(game: str) -> None:
    env = make_minatar_game(game)
    raw = BaseEnv(game, use_minimal_action_set=False)
    assert env.observation_space == spaces.Box(0, 1, (10, 10, 10), np.uint8)
    assert env.action_space == spaces.Discrete(6)
    obs, _ = env.reset(seed=3)
    raw_obs, _ = raw.reset(seed=3)
    actions = np.random.default_rng(0).integers(0, 6, 30)
    for step in range(len(actions) + 1):
        channels = raw_obs.shape[-1]
        assert obs.shape == (10, 10, 10) and obs.dtype == np.uint8
        assert obs in env.observation_space
        np.testing.assert_array_equal(obs[:channels], raw_obs.transpose(2, 0, 1))
        assert not obs[channels:].any()
        if step == len(actions):
            break
        obs, reward, done, _, _ = env.step(int(actions[step]))
        raw_obs, raw_reward, raw_done, _, _ = raw.step(int(actions[step]))
        assert type(reward) is float and reward == raw_reward
        assert done == raw_done
        if done:
            obs, _ = env.reset()
            raw_obs, _ = raw.reset()


def test_minatar_same_seed_same_trajectory_different_seed_different() -> None:
    actions = np.random.default_rng(1).integers(0, 6, 300)
    obs_a, rew_a = rollout(make_minatar_game("asterix"), 7, actions)
    obs_b, rew_b = rollout(make_minatar_game("asterix"), 7, actions)
    obs_c, _ = rollout(make_minatar_game("asterix"), 8, actions)
    assert rew_a == rew_b
    assert all(np.array_equal(a, b) for a, b in zip(obs_a, obs_b, strict=True))
    assert len(obs_a) != len(obs_c) or any(not np.array_equal(a, c) for a, c in zip(obs_a, obs_c, strict=True))


def test_minatar_seeded_reset_does_not_depend_on_history() -> None:
    # With a high sticky probability, a leftover action from the previous episode would be replayed.
    actions = np.random.default_rng(2).integers(0, 6, 40)
    for seed in range(10):
        used = make_minatar_game("breakout", sticky_action_prob=0.5)
        used.reset(seed=100 + seed)
        for _ in range(5):
            used.step(3)  # move right: differs from the fresh env's NOOP
        fresh = make_minatar_game("breakout", sticky_action_prob=0.5)
        obs_used, rew_used = rollout(used, seed, actions)
        obs_fresh, rew_fresh = rollout(fresh, seed, actions)
        assert rew_used == rew_fresh
        assert all(np.array_equal(a, b) for a, b in zip(obs_used, obs_fresh, strict=True))


def test_importing_envs_without_seaborn_is_quiet() -> None:
    # Blocking seaborn makes MinAtar take its logging.warning path at import.
    code = (
        "import sys, logging; sys.modules['seaborn'] = None; import envs; "
        "assert not logging.getLogger().handlers, logging.getLogger().handlers; "
        "assert logging.getLogger().level == logging.WARNING"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert "seaborn" not in result.stderr and "WARNING" not in result.stderr


# --- Spaces of every sequence -----------------------------------------------------------------


@pytest.mark.parametrize("name", list(SEQUENCES))
def test_every_task_of_every_sequence_has_the_same_spaces(name: str) -> None:
    env = make_sequence(name, switch_every=1)
    if name in MINATAR_SEQUENCES:
        assert env.observation_space == spaces.Box(0, 1, (10, 10, 10), np.uint8)
        assert env.action_space == spaces.Discrete(6)
    for task in SEQUENCES[name].build():
        task_env = task.make()
        assert task_env.observation_space == env.observation_space, task.name
        assert task_env.action_space == env.action_space, task.name
    # Visit every task through the schedule (one step per segment).
    seen = set()
    for _ in range(env.num_tasks):
        obs, info = env.reset(seed=0)
        assert obs in env.observation_space
        seen.add(info["task_id"])
        obs, *_ = env.step(env.action_space.sample())
        assert obs in env.observation_space
    assert seen == set(range(env.num_tasks))
    env.close()


def test_task_with_other_spaces_is_rejected_on_creation() -> None:
    tasks = [cartpole_tasks(1)[0], Task("breakout", lambda: make_minatar_game("breakout"))]
    env = TaskSequenceEnv(tasks, switch_every=1)
    env.reset()
    env.step(0)
    with pytest.raises(ValueError, match="'breakout'"):
        env.reset()


# --- Switching ----------------------------------------------------------------------------------


def test_switch_at_exact_step_single_env() -> None:
    env = make_sequence("continual_minatar", switch_every=5)
    obs, info = env.reset(seed=0)
    assert (info["task_id"], info["task_name"]) == (0, "space_invaders")
    for step in range(1, 5):
        _, _, terminated, truncated, info = env.step(0)
        assert not terminated and not truncated
        assert info["task_id"] == 0 and info["task_switch"] is False
        assert env.global_step == step
    _, _, terminated, truncated, info = env.step(0)
    assert truncated and not terminated
    assert info["task_switch"] is True and info["next_task_id"] == 1
    assert (info["task_id"], info["task_name"]) == (0, "space_invaders")
    with pytest.raises(RuntimeError):
        env.step(0)  # the new task must be started with reset()
    _, info = env.reset()
    assert (info["task_id"], info["task_name"]) == (1, "asterix")
    assert env.current_task_id == 1
    _, _, _, _, info = env.step(0)
    assert info["task_id"] == 1


def test_switch_on_terminal_step_is_terminated_not_truncated() -> None:
    # CartPole pushed one way always falls before step 20; find that step, then switch right on it.
    probe = make_cartpole("length", 0.5)
    probe.reset(seed=envs.task_game_seed(0, 0))  # the seed the sequence gives task 0
    fall = next(t for t in range(1, 100) if probe.step(1)[2])
    env = TaskSequenceEnv(cartpole_tasks(2), switch_every=fall)
    env.reset(seed=0)
    for _ in range(fall - 1):
        env.step(1)
    _, _, terminated, truncated, info = env.step(1)
    assert terminated and not truncated
    assert info["task_switch"] is True and info["next_task_id"] == 1


def test_switch_with_dummy_vec_env_counts_steps_over_all_copies() -> None:
    vec = DummyVecEnv([lambda: make_sequence("continual_minatar", switch_every=8, num_envs=4) for _ in range(4)])
    vec.seed(0)
    vec.reset()
    _, _, dones, infos = vec.step(np.zeros(4, dtype=np.int64))
    assert not dones.any()
    assert all(info["task_id"] == 0 and not info["task_switch"] for info in infos)
    _, _, dones, infos = vec.step(np.zeros(4, dtype=np.int64))
    assert dones.all()
    for info in infos:
        assert info["task_switch"] is True and info["next_task_id"] == 1
        assert info["task_id"] == 0
        assert info["TimeLimit.truncated"] is True
        assert "terminal_observation" in info
    assert [info["task_id"] for info in vec.reset_infos] == [1, 1, 1, 1]
    assert vec.get_attr("current_task_id") == [1, 1, 1, 1]
    assert vec.get_attr("global_step") == [8, 8, 8, 8]
    _, _, _, infos = vec.step(np.zeros(4, dtype=np.int64))
    assert [info["task_id"] for info in infos] == [1, 1, 1, 1]
    vec.close()


def test_switch_every_must_be_a_multiple_of_num_envs() -> None:
    with pytest.raises(ValueError, match="multiple of num_envs"):
        make_sequence("cartpole_shift", switch_every=10, num_envs=4)


# --- Orders -------------------------------------------------------------------------------------


def test_cyclic_order() -> None:
    env = TaskSequenceEnv(cartpole_tasks(3), switch_every=3)
    assert segment_tasks(env, 7) == [0, 1, 2, 0, 1, 2, 0]


def test_explicit_order() -> None:
    env = TaskSequenceEnv(cartpole_tasks(3), switch_every=2, order="explicit", task_order=[2, 0, 2, 1])
    assert segment_tasks(env, 6) == [2, 0, 2, 1, 2, 0]
    assert env.task_at(4) == 2


def test_random_order_is_seeded_and_visits_every_task_once_per_cycle() -> None:
    n, cycles = 5, 4

    def order(seed: int) -> list[int]:
        env = TaskSequenceEnv(cartpole_tasks(n), switch_every=2, order="random", seed=seed)
        return [env.task_at(k) for k in range(n * cycles)]

    first = order(3)
    for cycle in range(cycles):
        assert sorted(first[cycle * n : (cycle + 1) * n]) == list(range(n))
    assert order(3) == first
    assert order(4) != first
    assert first != [k % n for k in range(n * cycles)]
    # The schedule actually plays that order.
    env = TaskSequenceEnv(cartpole_tasks(n), switch_every=2, order="random", seed=3)
    assert segment_tasks(env, 2 * n) == first[: 2 * n]


# --- Task families ------------------------------------------------------------------------------


def test_observation_permutation_is_deterministic_distinct_and_valid() -> None:
    pos, chan = observation_permutation(5, 2, (10, 10, 10), permute_channels=True)
    pos_again, chan_again = observation_permutation(5, 2, (10, 10, 10), permute_channels=True)
    np.testing.assert_array_equal(pos, pos_again)
    np.testing.assert_array_equal(chan, chan_again)
    assert sorted(pos) == list(range(100)) and sorted(chan) == list(range(10))
    assert not np.array_equal(pos, np.arange(100))
    assert not np.array_equal(pos, observation_permutation(5, 3)[0])
    assert not np.array_equal(pos, observation_permutation(6, 2)[0])
    assert observation_permutation(5, 2)[1] is None


def test_observation_permutation_inverts_exactly() -> None:
    obs = np.random.default_rng(0).integers(0, 2, (10, 10, 10), dtype=np.uint8)
    for permute_channels in (False, True):
        pos, chan = observation_permutation(1, 0, obs.shape, permute_channels)
        permuted = apply_observation_permutation(obs, pos, chan)
        assert not np.array_equal(permuted, obs)
        np.testing.assert_array_equal(invert_observation_permutation(permuted, pos, chan), obs)


@pytest.mark.parametrize("permute_channels", [False, True])
def test_permute_observations_wrapper(permute_channels: bool) -> None:
    env = permute_observations(make_minatar_game("seaquest"), 4, 1, permute_channels)
    base = make_minatar_game("seaquest")
    pos, chan = observation_permutation(4, 1, (10, 10, 10), permute_channels)
    np.testing.assert_array_equal(env.pos_perm, pos)
    assert env.observation_space == base.observation_space
    obs, _ = env.reset(seed=9)
    base_obs, _ = base.reset(seed=9)
    for action in (1, 3, 5, 0, 2):
        np.testing.assert_array_equal(obs, apply_observation_permutation(base_obs, pos, chan))
        np.testing.assert_array_equal(env.invert(obs), base_obs)
        if not permute_channels:
            # The same position permutation in every channel.
            for c in range(10):
                np.testing.assert_array_equal(obs[c].ravel(), base_obs[c].ravel()[pos])
        obs, *_ = env.step(action)
        base_obs, *_ = base.step(action)


def test_shuffle_actions_maps_agent_action_to_perm() -> None:
    recorder = RecordingEnv()
    env = shuffle_actions(recorder, seed=2, task_index=3)
    assert sorted(env.perm) == list(range(6))
    assert env.action_space == spaces.Discrete(6)
    env.reset()
    for action in range(6):
        env.step(np.int64(action))
    assert recorder.received == [int(env.perm[a]) for a in range(6)]
    assert recorder.received != list(range(6))
    assert not np.array_equal(env.perm, shuffle_actions(RecordingEnv(), seed=2, task_index=4).perm)
    np.testing.assert_array_equal(env.perm, shuffle_actions(RecordingEnv(), seed=2, task_index=3).perm)


def test_scale_reward_multiplies_base_reward() -> None:
    actions = np.random.default_rng(3).integers(0, 6, 400)
    _, base_rewards = rollout(make_minatar_game("breakout"), 5, actions)
    for scale in (-1.0, 2.5):
        _, scaled = rollout(scale_reward(make_minatar_game("breakout"), scale), 5, actions)
        assert scaled == [r * scale for r in base_rewards]
    assert any(r != 0 for r in base_rewards)


def test_reward_flip_sequence_flips_second_task() -> None:
    env = make_sequence("reward_flip_minatar", switch_every=10_000)
    assert env.task_names == ["breakout/reward+1.0", "breakout/reward-1.0"]
    flipped = SEQUENCES["reward_flip_minatar"].build()[1].make()
    actions = np.random.default_rng(4).integers(0, 6, 400)
    _, base_rewards = rollout(make_minatar_game("breakout"), 1, actions)
    _, flipped_rewards = rollout(flipped, 1, actions)
    assert any(r != 0 for r in base_rewards)
    assert flipped_rewards == [-r for r in base_rewards]


@pytest.mark.parametrize(("param", "value"), [("length", 1.5), ("gravity", 3.0), ("masspole", 0.4)])
def test_make_cartpole_sets_parameter_and_derived_quantities(param: str, value: float) -> None:
    env = make_cartpole(param, value)
    cartpole = env.unwrapped
    assert getattr(cartpole, param) == value
    assert cartpole.polemass_length == pytest.approx(cartpole.masspole * cartpole.length)
    assert cartpole.total_mass == pytest.approx(cartpole.masspole + cartpole.masscart)
    assert env.spec.max_episode_steps == 500
    default = gym.make("CartPole-v1")
    obs, _ = env.reset(seed=0)
    default_obs, _ = default.reset(seed=0)
    np.testing.assert_array_equal(obs, default_obs)
    for _ in range(5):
        obs, *_ = env.step(1)
        default_obs, *_ = default.step(1)
    assert not np.allclose(obs, default_obs)


# --- Revisits and seeding through the sequence ------------------------------------------------


def test_revisit_reuses_the_same_task_env_and_permutation() -> None:
    env = make_sequence("permuted_minatar", switch_every=3, num_tasks=2, seed=11)
    env.reset(seed=0)
    first_env = env.current_env
    first_perm = first_env.pos_perm.copy()
    run_schedule(env, 3)  # segment 0 -> task 0
    env.reset()
    second_env = env.current_env
    assert env.current_task_id == 1 and second_env is not first_env
    assert not np.array_equal(second_env.pos_perm, first_perm)
    run_schedule(env, 3)  # segment 1 -> task 1
    obs, info = env.reset()
    assert info["task_id"] == 0
    assert env.current_env is first_env
    np.testing.assert_array_equal(env.current_env.pos_perm, first_perm)
    np.testing.assert_array_equal(first_perm, observation_permutation(11, 0)[0])
    state = env.current_env.unwrapped.game.state()
    restored = env.current_env.invert(obs)
    np.testing.assert_array_equal(restored[: state.shape[-1]], state.transpose(2, 0, 1))


def test_sequence_same_reset_seed_same_trajectory_across_switch() -> None:
    actions = np.random.default_rng(5).integers(0, 6, 120)

    def play(reset_seed: int) -> tuple[list[np.ndarray], list[float]]:
        return rollout(make_sequence("continual_minatar", switch_every=40), reset_seed, actions)

    obs_a, rew_a = play(1)
    obs_b, rew_b = play(1)
    obs_c, _ = play(2)
    assert rew_a == rew_b
    assert all(np.array_equal(a, b) for a, b in zip(obs_a, obs_b, strict=True))
    assert len(obs_a) != len(obs_c) or any(not np.array_equal(a, c) for a, c in zip(obs_a, obs_c, strict=True))


# --- Registry -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SEQUENCES))
def test_gym_make_each_registered_id(name: str) -> None:
    spec = SEQUENCES[name]
    env = gym.make(spec.gym_id)
    sequence = env.unwrapped
    assert isinstance(sequence, TaskSequenceEnv)
    assert sequence.num_tasks == len(spec.build())
    assert sequence.switch_every == spec.default_switch_every
    obs, info = env.reset(seed=0)
    assert obs in env.observation_space and info["task_id"] == 0
    env.close()
    short = gym.make(spec.gym_id, switch_every=2).unwrapped
    short.reset(seed=0)
    short.step(0)
    assert short.step(0)[4]["task_switch"] is True


def test_sequence_options_and_task_names() -> None:
    env = make_sequence("permuted_minatar", switch_every=10, game="asterix", num_tasks=3)
    assert env.task_names == ["asterix/perm0", "asterix/perm1", "asterix/perm2"]
    env = make_sequence("shuffled_actions_minatar", switch_every=10, num_tasks=2)
    assert env.task_names == ["breakout/actions0", "breakout/actions1"]
    env = make_sequence("cartpole_shift", switch_every=10, param="gravity", values=[9.8, 20.0])
    assert env.task_names == ["cartpole/gravity=9.8", "cartpole/gravity=20"]
    env = make_sequence("minatar_games", switch_every=10, games=["freeway", "breakout"])
    assert env.task_names == ["freeway", "breakout"]
    assert make_sequence("continual_minatar_freeway", switch_every=10).task_names[-1] == "freeway"
    assert SEQUENCES["permuted_minatar"].defaults["num_tasks"] == 6


# --- Checkpoint state ---------------------------------------------------------------------------


@pytest.mark.parametrize("steps_before", [5, 8])
def test_state_round_trip_continues_schedule(steps_before: int) -> None:
    def make() -> TaskSequenceEnv:
        return TaskSequenceEnv(cartpole_tasks(3), switch_every=4, order="random", seed=1)

    original = make()
    original.reset(seed=0)
    episode_over = False
    for _ in range(steps_before):
        if episode_over:
            original.reset()
        _, _, terminated, truncated, _ = original.step(0)
        episode_over = terminated or truncated
    state = original.get_state()
    assert state["switch_pending"] == (steps_before % 4 == 0)
    resumed = make()
    resumed.set_state(state)
    assert resumed.get_state() == state
    assert resumed.global_step == original.global_step
    with pytest.raises(RuntimeError):
        resumed.step(0)
    resumed.reset(seed=0)
    if episode_over:
        original.reset()
    keys = ("task_id", "task_switch", "next_task_id")
    follow = [[info.get(k) for k in keys] for info in run_schedule(original, 30)]
    resumed_follow = [[info.get(k) for k in keys] for info in run_schedule(resumed, 30)]
    assert resumed_follow == follow
    assert resumed.get_state() == original.get_state()


def test_set_state_rejects_inconsistent_state() -> None:
    env = TaskSequenceEnv(cartpole_tasks(3), switch_every=4)
    with pytest.raises(ValueError, match="does not match"):
        env.set_state({"local_step": 5, "current_task_id": 0, "switch_pending": False})
    with pytest.raises(ValueError, match="not a boundary"):
        env.set_state({"local_step": 5, "current_task_id": 1, "switch_pending": True})
    with pytest.raises(ValueError, match="keys"):
        env.set_state({"local_step": 5})


# --- Bad input ----------------------------------------------------------------------------------


def test_unknown_game() -> None:
    with pytest.raises(ValueError, match="pong.*asterix, breakout, freeway, seaquest, space_invaders"):
        make_minatar_game("pong")
    with pytest.raises(ValueError, match="space_invaders"):
        make_sequence("minatar_games", switch_every=10, games=["breakout", "pong"])


def test_unknown_sequence() -> None:
    with pytest.raises(ValueError, match="'nope'.*continual_minatar.*cartpole_shift"):
        make_sequence("nope", switch_every=10)


def test_unknown_option() -> None:
    with pytest.raises(ValueError, match="'colour'.*game, num_tasks, permute_channels"):
        make_sequence("permuted_minatar", switch_every=10, colour="red")


def test_bad_order() -> None:
    with pytest.raises(ValueError, match="'shuffled'.*cyclic, random, explicit"):
        make_sequence("cartpole_shift", switch_every=10, order="shuffled")


def test_bad_task_order() -> None:
    with pytest.raises(ValueError, match=r"3.*0\.\.2"):
        make_sequence("cartpole_shift", switch_every=10, order="explicit", task_order=[0, 3])
    with pytest.raises(ValueError, match="non-empty task_order"):
        make_sequence("cartpole_shift", switch_every=10, order="explicit")


@pytest.mark.parametrize("switch_every", [0, -5])
def test_non_positive_switch_every(switch_every: int) -> None:
    with pytest.raises(ValueError, match="switch_every must be positive"):
        make_sequence("cartpole_shift", switch_every=switch_every)


def test_bad_cartpole_param() -> None:
    with pytest.raises(ValueError, match="'mass'.*length, gravity, masspole"):
        make_cartpole("mass", 1.0)
    with pytest.raises(ValueError, match="length, gravity, masspole"):
        make_sequence("cartpole_shift", switch_every=10, param="mass")


# --- Low-return episode cut (C-CHAIN's Seaquest fix) ------------------------------------------------------


class ScriptedRewards(gym.Env):
    """Gives ``rewards[t]`` at step ``t`` of every episode; terminates after ``length`` steps (None: never)."""

    observation_space = spaces.Discrete(1)
    action_space = spaces.Discrete(1)

    def __init__(self, rewards: list[float], length: int | None = None) -> None:
        self.rewards, self.length, self.t = rewards, length, 0

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
        self.t = 0
        return 0, {}

    def step(self, action: int) -> tuple[int, float, bool, bool, dict[str, Any]]:
        reward = self.rewards[self.t] if self.t < len(self.rewards) else 0.0
        self.t += 1
        return 0, reward, self.length is not None and self.t >= self.length, False, {}


def steps_until_end(env: gym.Env, limit: int = 100) -> tuple[int, bool, bool, dict[str, Any]]:
    env.reset()
    for n in range(1, limit + 1):
        _, _, terminated, truncated, info = env.step(0)
        if terminated or truncated:
            return n, terminated, truncated, info
    return limit, False, False, {}


@pytest.mark.parametrize(
    "rewards,length,expected",
    [
        ([], None, (10, False, True)),  # never any reward: cut at the 10th step
        ([0.005] * 20, None, (10, False, True)),  # a return of 0.05 at the 10th step
        ([0.0] * 9 + [0.1], None, (100, False, False)),  # reaches 0.1 on the 10th step itself: never cut
        ([0.0] * 12 + [0.5], None, (10, False, True)),  # a reward after the 10th step comes too late
        ([0.5] + [0.0] * 15 + [-0.5] * 10, None, (17, False, True)),  # the return first falls below at step 17
        ([], 7, (7, True, False)),  # the env ends on its own before
        ([], 10, (10, True, False)),  # ... or on the same step: terminated, not truncated
    ],
)
def test_low_return_cutoff_on_scripted_rewards(rewards: list[float], length: int | None, expected: tuple) -> None:
    env = envs.LowReturnCutoff(ScriptedRewards(rewards, length), steps=10, min_return=0.1)
    n, terminated, truncated, info = steps_until_end(env)
    assert (n, terminated, truncated) == expected
    assert info.get("low_return_cutoff", False) == truncated
    # reset() starts the count again: the next episode is cut at the same step
    assert steps_until_end(env)[0] == n


def test_low_return_cutoff_applies_to_the_listed_games_of_every_copy() -> None:
    cut = {"steps": 1000, "min_return": 0.1, "games": ["seaquest"]}
    for _ in range(2):  # any copy built from the same options (a training or an evaluation env) has it
        env = make_sequence("continual_minatar", switch_every=10, low_return_cutoff=cut)
        wrapped = {task.name: isinstance(task.make(), envs.LowReturnCutoff) for task in env._tasks}
        assert wrapped == {"space_invaders": False, "asterix": False, "seaquest": True}
    permuted = make_sequence(
        "permuted_minatar",
        switch_every=10,
        num_tasks=2,
        game="seaquest",
        low_return_cutoff={"steps": 5, "min_return": 1.0},
    )  # games omitted: every task
    assert all(isinstance(task.make(), envs.LowReturnCutoff) for task in permuted._tasks)
    assert "low_return_cutoff" in SEQUENCES["cartpole_shift"].defaults  # listed by rlp list sequences


def test_low_return_cutoff_ends_a_never_diving_seaquest_episode_in_the_sequence() -> None:
    # A Seaquest submarine that never dives never dies: with the cut, the sequence truncates its episode.
    env = make_sequence(
        "minatar_games",
        switch_every=5000,
        games=["seaquest"],
        sticky_action_prob=0.0,
        low_return_cutoff={"steps": 1000, "min_return": 0.1, "games": ["seaquest"]},
    )
    env.reset(seed=0)
    for n in range(1, 1501):  # noqa: B007 (n is read after the loop)
        _, _, terminated, truncated, info = env.step(0)
        if terminated or truncated:
            break
    assert (n, terminated, truncated, info["low_return_cutoff"], info["task_switch"]) == (
        1000,
        False,
        True,
        True,
        False,
    )
    plain = make_sequence("minatar_games", switch_every=5000, games=["seaquest"], sticky_action_prob=0.0)
    plain.reset(seed=0)
    assert not any(any(plain.step(0)[2:4]) for _ in range(1500))
