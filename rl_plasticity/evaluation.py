"""Evaluation of the agent's own policy on separate copies of the tasks, as C-CHAIN reports its returns.

C-CHAIN (Tang & Berseth 2025; repository bluecontra/C-CHAIN, ``crl_minatar/crl_run_double_dqn.py``,
``evaluate_policy``) plays 10 greedy episodes of the current task every 50k steps (and at the start of each
task) on an env seeded ``seed * 1234``. Here, every ``eval.every`` env steps, at the start of training and at
the end of every task visit (the switch step, and the end of training), :class:`EvalCallback` plays
``eval.episodes`` episodes of the current task, or with ``eval.tasks: all`` of every task of the sequence
(a task-by-task matrix of returns over time: forgetting and forward transfer), and logs through SB3's logger:

- ``eval/<task>/mean_return``, ``eval/<task>/std_return`` (population standard deviation over the episodes)
  and ``eval/<task>/mean_length``;
- ``eval/mean_return``: the current task's (at a switch step, the task that just ended).

A round at step ``t`` plays the network the agent acts with at step ``t``, as the monitor's probes do (at the
last step of training, the update that follows it is not in it). The policy is the agent's own: SB3's
``policy.predict(obs, deterministic=True)`` (DQN: the greedy action;
PPO: the distribution's mode), with probability ``eval.epsilon`` replaced by a uniform random action, as
SB3's epsilon-greedy rule does. The episodes of one task are played side by side, one forward pass per step.

Nothing here touches training: the env copies are separate (:mod:`rl_plasticity.task_envs`), the random
numbers (the games' seeds, epsilon's draws) come from ``eval.seed`` alone, the forward passes draw none from
torch, and the policy's training mode is restored. Episode ``i`` of task ``k`` is seeded from ``(eval.seed,
k, i)`` only, so every round, every arm (the fresh-network runs included) and a resumed run play the same
evaluation episodes: differences between them are the policy's. (C-CHAIN's evaluation env instead runs on,
so each round meets new episodes.)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import gymnasium as gym
import numpy as np
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback

from rl_plasticity.task_envs import TaskEnvs, derived_seed
from rl_plasticity.task_logging import TB_ONLY, step_events

#: Stream key of the evaluation episodes' seeds (see :func:`~rl_plasticity.task_envs.derived_seed`).
EVAL_STREAM = 12
#: C-CHAIN seeds its evaluation env with ``seed * 1234`` (``crl_run_double_dqn.py``).
C_CHAIN_SEED_FACTOR = 1234


@dataclass(frozen=True)
class EvalSettings:
    """When and how the policy is evaluated: the ``eval:`` config keys but ``enabled`` (their defaults and
    meanings are the config's; the runner builds this from the validated section).

    :param every: env steps between rounds (``None``: ``switch_every // 10``).
    :param episodes: episodes per task and round.
    :param epsilon: the evaluation policy's epsilon.
    :param tasks: ``current`` (the task being trained) or ``all`` (every task of the sequence).
    :param seed: seed of the episodes (``None``: the run seed x :data:`C_CHAIN_SEED_FACTOR`).
    :param max_episode_steps: steps after which an episode is cut.
    """

    every: int | None
    episodes: int
    epsilon: float
    tasks: Literal["current", "all"]
    seed: int | None
    max_episode_steps: int


@dataclass(frozen=True)
class EvalResult:
    """Returns and lengths of the evaluation episodes of one task at one step."""

    step: int
    task_id: int
    returns: tuple[float, ...]
    lengths: tuple[int, ...]

    @property
    def mean(self) -> float:
        return float(np.mean(self.returns))

    @property
    def std(self) -> float:
        return float(np.std(self.returns))

    @property
    def mean_length(self) -> float:
        return float(np.mean(self.lengths))


def play_episodes(
    agent: BaseAlgorithm, envs: list[gym.Env], seeds: list[int], epsilon: float = 0.0, max_episode_steps: int = 10_000
) -> tuple[np.ndarray, np.ndarray]:
    """One episode on each env, side by side, with the agent's deterministic policy (epsilon-greedy if asked).

    :param envs: gymnasium envs of one task (the same spaces); each plays one episode.
    :param seeds: per env, the seed of its reset, of its epsilon draws and of its random actions.
    :param max_episode_steps: an episode still running after this many steps is cut there.
    :return: the episodes' undiscounted returns and lengths, shape ``(len(envs),)`` each.
    """
    n = len(envs)
    rngs = [np.random.default_rng(np.random.SeedSequence([seed, 1])) for seed in seeds]
    spaces = []
    for env, seed in zip(envs, seeds):
        space = env.action_space
        space.seed(derived_seed(seed, 2))
        spaces.append(space)
    obs = [env.reset(seed=seed)[0] for env, seed in zip(envs, seeds)]
    returns, lengths = np.zeros(n), np.zeros(n, dtype=np.int64)
    active = list(range(n))
    policy = agent.policy
    was_training = policy.training
    try:
        while active:
            actions, _ = policy.predict(np.stack([obs[i] for i in active]), deterministic=True)
            still = []
            for i, action in zip(active, actions):
                if epsilon > 0 and rngs[i].random() < epsilon:
                    action = spaces[i].sample()
                obs[i], reward, terminated, truncated, _ = envs[i].step(action)
                returns[i] += float(reward)
                lengths[i] += 1
                if not (terminated or truncated or lengths[i] >= max_episode_steps):
                    still.append(i)
            active = still
    finally:
        policy.set_training_mode(was_training)
    return returns, lengths


class Evaluator:
    """Plays the evaluation episodes of a task (see the module docstring) on env copies kept between rounds.

    :param settings: how many episodes, with which epsilon and seed.
    :param task_envs: makes the separate copies of each task.
    """

    def __init__(self, settings: EvalSettings, task_envs: TaskEnvs) -> None:
        self.settings = settings
        self.task_envs = task_envs
        self.seed = settings.seed if settings.seed is not None else task_envs.run_seed * C_CHAIN_SEED_FACTOR
        self._copies: dict[int, list[gym.Env]] = {}

    def episode_seed(self, task_id: int, episode: int) -> int:
        """The seed of evaluation episode ``episode`` of task ``task_id``: the same in every round and arm."""
        return derived_seed(self.seed, EVAL_STREAM, task_id, episode)

    def evaluate(self, agent: BaseAlgorithm, task_id: int, step: int) -> EvalResult:
        """Play ``eval.episodes`` episodes of ``task_id`` with the agent's policy."""
        copies = self._copies.get(task_id)
        if copies is None:
            copies = self._copies[task_id] = [self.task_envs.make(task_id) for _ in range(self.settings.episodes)]
        seeds = [self.episode_seed(task_id, i) for i in range(self.settings.episodes)]
        returns, lengths = play_episodes(agent, copies, seeds, self.settings.epsilon, self.settings.max_episode_steps)
        return EvalResult(step, task_id, tuple(returns.tolist()), tuple(lengths.tolist()))

    def close(self) -> None:
        for copies in self._copies.values():
            for env in copies:
                env.close()
        self._copies = {}


class EvalCallback(BaseCallback):
    """Evaluates the policy during training (see the module docstring) and logs the results.

    Put it before the monitor in the callback list: the monitor's task summary reads :attr:`latest` at a
    visit's end.

    :param settings: when and how to evaluate.
    :param task_envs: makes the separate copies of each task.
    :param switch_every: env steps per task (``env.switch_every``), for ``every=None``.
    """

    def __init__(self, settings: EvalSettings, task_envs: TaskEnvs, switch_every: int) -> None:
        super().__init__()
        self.settings = settings
        self.every = settings.every if settings.every is not None else max(1, switch_every // 10)
        self.evaluator = Evaluator(settings, task_envs)
        self.task_names = list(task_envs.task_names)
        self.next_due = self.every
        self.last_step: int | None = None
        #: The latest round's results by task id.
        self.latest: dict[int, EvalResult] = {}
        self._resumed = False

    # -- checkpoints --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The schedule and the latest results (the episodes are seeded, so nothing else is needed)."""
        return {
            "next_due": self.next_due,
            "last_step": self.last_step,
            "latest": {task: asdict(result) for task, result in self.latest.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.next_due, self.last_step = int(state["next_due"]), state["last_step"]
        self.latest = {
            int(task): EvalResult(**{**r, "returns": tuple(r["returns"]), "lengths": tuple(r["lengths"])})
            for task, r in state["latest"].items()
        }
        self._resumed = True

    # -- training -------------------------------------------------------------------------------------
    def _on_training_start(self) -> None:
        if not self._resumed and self.model.num_timesteps == 0:
            self._round(int(self.training_env.get_attr("current_task_id")[0]))

    def _on_step(self) -> bool:
        infos = self.locals["infos"]
        _, switch = step_events(infos)
        if switch is not None or self.num_timesteps >= self.next_due:
            # At a switch, the task of the step is the one whose visit just ended.
            self._round(int(infos[0]["task_id"]))
        return True

    def _on_training_end(self) -> None:
        if self.last_step != self.num_timesteps:
            self._round(int(self.training_env.get_attr("current_task_id")[0]))
        self.evaluator.close()

    def _round(self, current: int) -> None:
        step = int(self.model.num_timesteps)
        tasks = range(len(self.task_names)) if self.settings.tasks == "all" else [current]
        self.latest = {task: self.evaluator.evaluate(self.model, task, step) for task in tasks}
        logger = self.logger
        for task, result in self.latest.items():
            name = self.task_names[task]
            logger.record(f"eval/{name}/mean_return", result.mean, exclude=TB_ONLY)
            logger.record(f"eval/{name}/std_return", result.std, exclude=TB_ONLY)
            logger.record(f"eval/{name}/mean_length", result.mean_length, exclude=TB_ONLY)
        logger.record("eval/mean_return", self.latest[current].mean)
        # A plastic agent's interventions log some values only at dumps (stock SB3 agents have none).
        if hasattr(self.model, "record_logged_values"):
            self.model.record_logged_values()
        logger.dump(step=step)
        self.last_step = step
        self.next_due = (step // self.every + 1) * self.every
