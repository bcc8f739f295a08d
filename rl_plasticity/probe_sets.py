"""Fixed probe sets, per task: the data the monitor probes the network on.

Probing a fixed set separates changes of the network from changes of the data it is probed on (rank on
fresh on-policy batches is confounded by the policy's own data; docs/reference/metrics.md, "Probe data"). Two sources:

- :class:`RandomProbeSets` (the default, ``@probe_set``): per task, transitions of a seeded uniform-random
  policy on a separate copy of the task (:mod:`rl_plasticity.task_envs`), played for at least
  ``min_episodes`` episodes and subsampled. The set depends only on the run seed, the sequence seed and
  the task index, never on the network, the intervention or the arm: a fresh network and a continual one
  are probed on the same data. Without this, the data alone moves the probes: a network's first samples of
  a task are random play for a fresh network but the previous task's policy's play for a continual one.
- :class:`ProbeSets` (``@first_visit``, off by default): the first samples the run itself met on the
  task's first visit, then frozen (the monitor's earlier and only source).

A set holds what the agent's own training loss needs, so the curvature probes can use that loss on it:
transitions for DQN; for PPO the first-visit set keeps rollout samples (with their advantages and returns
as collected), and the random-policy set's transitions are turned into rollout samples at probe time
(:func:`rollout_samples`).
"""

from __future__ import annotations

import copy
import io
import time
from pathlib import Path
from typing import Any, NamedTuple

import gymnasium as gym
import numpy as np
import torch as th
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.buffers import ReplayBufferSamples, RolloutBufferSamples

from rl_plasticity.task_envs import TaskEnvs, derived_seed

#: Fields kept per sample, in the order of the SB3 sample tuple each agent's loss takes.
DQN_FIELDS = ("observations", "actions", "next_observations", "dones", "rewards")
PPO_FIELDS = ("observations", "actions", "old_values", "old_log_prob", "advantages", "returns")
#: Stream key of the random-policy probe sets' seeds (see :func:`~rl_plasticity.task_envs.derived_seed`).
PROBE_SET_STREAM = 11
#: The random policy plays at least this many times the set's size in transitions before subsampling.
POOL_FACTOR = 4


def random_policy_transitions(
    env: gym.Env, size: int, seed: int, min_episodes: int = 10, max_episode_steps: int = 1000
) -> tuple[dict[str, np.ndarray], int]:
    """``size`` transitions of a uniform-random policy on ``env``, subsampled from whole episodes.

    It plays episodes (each reset with a seed drawn from ``seed``, and cut after ``max_episode_steps``)
    until it has at least ``min_episodes`` of them and at least ``POOL_FACTOR * size`` transitions, then
    keeps ``size`` of them drawn uniformly without replacement, so the set holds many distinct states from
    many episodes rather than one episode's consecutive frames. They are kept in the draw's random order, so
    any prefix (the Gram probe takes the first ``gram_size``) is a uniform subsample too.

    :param env: a gymnasium env of one task, used by nothing else.
    :param seed: the only source of randomness (episode seeds, actions, the subsample).
    :return: the fields of :data:`DQN_FIELDS` (observations ``(size, *obs_shape)``, actions ``(size, 1)``
        int64 for discrete actions, next_observations, dones ``(size, 1)`` (1 only for a terminal state: a
        cut episode bootstraps), rewards ``(size, 1)``), and the number of episodes played.
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0]))
    space = copy.deepcopy(env.action_space)
    space.seed(derived_seed(seed, 1))
    columns: dict[str, list[Any]] = {name: [] for name in DQN_FIELDS}
    episodes = 0
    while episodes < min_episodes or len(columns["rewards"]) < POOL_FACTOR * size:
        obs, _ = env.reset(seed=derived_seed(seed, 2, episodes))
        for _ in range(max_episode_steps):
            action = space.sample()
            next_obs, reward, terminated, truncated, _ = env.step(action)
            for name, value in (
                ("observations", obs),
                ("actions", action),
                ("next_observations", next_obs),
                ("dones", float(terminated)),
                ("rewards", float(reward)),
            ):
                columns[name].append(value)
            obs = next_obs
            if terminated or truncated:
                break
        episodes += 1
    pool = len(columns["rewards"])
    keep = rng.choice(pool, size=size, replace=False)
    arrays = {name: np.asarray(values)[keep] for name, values in columns.items()}
    arrays["actions"] = arrays["actions"].reshape(size, -1)
    if isinstance(env.action_space, gym.spaces.Discrete):
        arrays["actions"] = arrays["actions"].astype(np.int64)
    arrays["dones"] = arrays["dones"].astype(np.float32).reshape(size, 1)
    arrays["rewards"] = arrays["rewards"].astype(np.float32).reshape(size, 1)
    return arrays, episodes


class RandomProbeSets:
    """Per-task probe sets of a seeded uniform-random policy (see the module docstring), built when first
    asked for. Building one touches no RNG and no env of training, so it may happen at any time: the set is
    the same. ``build_seconds`` records what each cost.

    :param task_envs: makes the separate copy of each task.
    :param size: samples per set.
    :param min_episodes: episodes the random policy plays at least.
    :param max_episode_steps: steps after which a random episode is cut.
    """

    def __init__(self, task_envs: TaskEnvs, size: int, min_episodes: int = 10, max_episode_steps: int = 1000) -> None:
        self.task_envs = task_envs
        self.size, self.min_episodes, self.max_episode_steps = size, min_episodes, max_episode_steps
        self._sets: dict[int, dict[str, np.ndarray]] = {}
        self.episodes: dict[int, int] = {}
        self.build_seconds: dict[int, float] = {}

    def seed(self, task_id: int) -> int:
        """The set's seed: from the run seed, the sequence seed and the task index only."""
        envs = self.task_envs
        return derived_seed(envs.run_seed, envs.sequence_seed, PROBE_SET_STREAM, task_id)

    def built(self, task_id: int) -> bool:
        return task_id in self._sets

    def arrays(self, task_id: int) -> dict[str, np.ndarray]:
        """The set of ``task_id`` (built now if it was not yet)."""
        if task_id not in self._sets:
            start = time.perf_counter()
            env = self.task_envs.make(task_id)
            try:
                self._sets[task_id], self.episodes[task_id] = random_policy_transitions(
                    env, self.size, self.seed(task_id), self.min_episodes, self.max_episode_steps
                )
            finally:
                env.close()
            self.build_seconds[task_id] = time.perf_counter() - start
        return self._sets[task_id]

    def batch(self, task_id: int, agent: BaseAlgorithm, ppo: bool) -> NamedTuple:
        """The set of ``task_id`` as the SB3 sample tuple the agent's ``training_loss`` takes."""
        arrays = self.arrays(task_id)
        tensors = [th.as_tensor(arrays[name], device=agent.device) for name in DQN_FIELDS]
        transitions = ReplayBufferSamples(*tensors)
        return rollout_samples(agent, transitions) if ppo else transitions

    def save(self, path: Path) -> None:
        """Write the sets built so far atomically (temporary file, then rename)."""
        state = {
            "source": "random_policy",
            "size": self.size,
            "min_episodes": self.min_episodes,
            "max_episode_steps": self.max_episode_steps,
            "sets": self._sets,
            "seeds": {task: self.seed(task) for task in self._sets},
            "episodes": dict(self.episodes),
            "task_names": list(self.task_envs.task_names),
        }
        save_atomic(state, path)


def save_atomic(obj: Any, path: Path) -> None:
    """``torch.save`` ``obj`` to ``path`` atomically (temporary file, then rename).

    It is serialised in memory and written plainly, so a full disk raises ``OSError(ENOSPC)`` (``torch.save``
    to a file turns it into a ``RuntimeError``).
    """
    tmp = path.with_suffix(path.suffix + ".tmp")
    buffer = io.BytesIO()
    th.save(obj, buffer)
    tmp.write_bytes(buffer.getvalue())
    tmp.replace(path)


def rollout_samples(agent: BaseAlgorithm, transitions: ReplayBufferSamples) -> RolloutBufferSamples:
    """PPO's loss inputs on fixed transitions, as at the first epoch of an update on them.

    The old values and log-probabilities are the current network's (so the probability ratio is 1), the
    returns the one-step TD targets ``r + gamma (1 - done) V(s')`` and the advantages ``returns - V(s)``,
    all from the current network and held constant (no graph). The transitions are fixed; what the loss
    makes of them is the network's, as in training.
    """
    policy = agent.policy
    actions = (
        transitions.actions.long().flatten()
        if isinstance(agent.action_space, gym.spaces.Discrete)
        else transitions.actions
    )
    with th.no_grad():
        values, log_prob, _ = policy.evaluate_actions(transitions.observations, actions)
        next_values = policy.predict_values(transitions.next_observations)
    values, next_values = values.flatten(), next_values.flatten()
    returns = transitions.rewards.flatten() + agent.gamma * (1.0 - transitions.dones.flatten()) * next_values
    return RolloutBufferSamples(
        transitions.observations, transitions.actions.float(), values, log_prob, returns - values, returns
    )


class ProbeSets:
    """Per-task fixed probe sets, filled in arrival order until ``size`` samples, then frozen.

    :param size: samples per task.
    :param fields: the sample fields stored (:data:`DQN_FIELDS` or :data:`PPO_FIELDS`).
    """

    def __init__(self, size: int, fields: tuple[str, ...]) -> None:
        self.size = size
        self.fields = fields
        self._parts: dict[int, dict[str, list[np.ndarray]]] = {}
        self._counts: dict[int, int] = {}
        self._frozen: dict[int, dict[str, np.ndarray]] = {}

    def full(self, task_id: int) -> bool:
        """Whether the set of ``task_id`` is complete (and so frozen)."""
        return task_id in self._frozen

    def add(self, task_id: int, samples: dict[str, np.ndarray]) -> bool:
        """Add a block of samples (first axis = samples) to an unfinished set.

        :return: ``True`` if this block completed the set.
        """
        if self.full(task_id):
            return False
        parts = self._parts.setdefault(task_id, {name: [] for name in self.fields})
        take = min(self.size - self._counts.get(task_id, 0), len(samples[self.fields[0]]))
        for name in self.fields:
            # Copies: SB3 reuses some of its arrays between steps.
            parts[name].append(np.array(samples[name][:take], copy=True))
        self._counts[task_id] = self._counts.get(task_id, 0) + take
        if self._counts[task_id] < self.size:
            return False
        self._frozen[task_id] = {name: np.concatenate(parts[name]) for name in self.fields}
        del self._parts[task_id]
        return True

    def arrays(self, task_id: int) -> dict[str, np.ndarray] | None:
        """The samples of ``task_id`` so far (frozen or not), or ``None`` if there are none."""
        if task_id in self._frozen:
            return self._frozen[task_id]
        parts = self._parts.get(task_id)
        if not parts or not parts[self.fields[0]]:
            return None
        return {name: np.concatenate(chunks) for name, chunks in parts.items()}

    def batch(self, task_id: int, device: th.device, limit: int | None = None) -> NamedTuple | None:
        """The set of ``task_id`` as the SB3 sample tuple the agent's ``training_loss`` takes."""
        arrays = self.arrays(task_id)
        if arrays is None:
            return None
        tensors = [th.as_tensor(arrays[name][:limit], device=device) for name in self.fields]
        return ReplayBufferSamples(*tensors) if self.fields == DQN_FIELDS else RolloutBufferSamples(*tensors)

    def state_dict(self) -> dict[str, Any]:
        """Frozen sets only: an unfinished set is re-collected on resume."""
        return {"size": self.size, "fields": self.fields, "frozen": self._frozen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.size, self.fields = state["size"], tuple(state["fields"])
        self._frozen = dict(state["frozen"])
        self._parts, self._counts = {}, {task: self.size for task in self._frozen}

    def save(self, path: Path) -> None:
        """Write the frozen sets atomically (temporary file, then rename), so a kill never leaves half a file."""
        save_atomic(self.state_dict(), path)
