"""Evaluation: what it logs and writes to task_summary.csv, that it plays the agent's own policy on the seeded
episodes, and that it leaves training unchanged."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch as th
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from rl_plasticity.catalog import registries
from rl_plasticity.config import ConfigError, validate_config
from rl_plasticity.evaluation import EvalCallback, EvalSettings
from rl_plasticity.monitor import tensorboard_layout
from rl_plasticity.runner import build_agent, build_env, settings_from, train
from rl_plasticity.task_envs import TaskEnvs

TASKS = ["cartpole/length=0.5", "cartpole/length=1.5", "cartpole/length=0.25"]


def tiny_config(tmp_path: Path, algo: str = "dqn", **eval_cfg) -> dict:
    agent = (
        dict(
            algo="dqn",
            learning_starts=50,
            buffer_size=1000,
            batch_size=16,
            train_freq=1,
            target_update_interval=50,
            double_q=True,
        )
        if algo == "dqn"
        else dict(algo="ppo", n_steps=64, batch_size=32, n_epochs=2)
    )
    return dict(
        name="ev",
        seed=2,
        total_steps=600,
        agent=agent,
        net=dict(kind="mlp", width=16, depth=2),
        env=dict(sequence="cartpole_shift", switch_every=200),
        logging=dict(root_dir=str(tmp_path / "runs"), progress_bar=False, save_model=False),
        monitor=dict(probe_every=10_000, probes=["rank"], switch_probes=[], on_batch=False, probe_set_size=16),
        eval={"episodes": 3, **eval_cfg},
        checkpoint=dict(every=None, replay_buffer=False),
    )


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_eval_logs_every_task_and_fills_task_summary(tmp_path: Path):
    run_dir = train(validate_config(tiny_config(tmp_path, tasks="all", every=50), registries=registries()))
    logged = scalars(run_dir)
    for name in TASKS:
        for what in ("mean_return", "std_return", "mean_length"):
            # At the start, every eval.every steps; the switches (200, 400, 600) fall on multiples.
            assert [s for s, _ in logged[f"eval/{name}/{what}"]] == list(range(0, 601, 50)), (name, what)
    current = dict(logged["eval/mean_return"])
    rows = list(csv.DictReader((run_dir / "task_summary.csv").open()))
    assert [r["task"] for r in rows] == TASKS
    for row in rows:
        end = int(row["end_step"])
        own = dict(logged[f"eval/{row['task']}/mean_return"])[end]
        assert float(row["eval_return"]) == pytest.approx(own, rel=1e-6)
        assert float(row["eval_return"]) == pytest.approx(current[end], rel=1e-6)  # the task just ended
        assert float(row["eval_return_std"]) == pytest.approx(
            dict(logged[f"eval/{row['task']}/std_return"])[end], rel=1e-6
        )
        for name in TASKS:
            assert float(row[f"eval_return/{name}"]) == pytest.approx(
                dict(logged[f"eval/{name}/mean_return"])[end], rel=1e-6
            )
        assert row["mean_return"] != ""  # the training return stays
    assert "eval" in tensorboard_layout()


def test_eval_current_task_defaults_to_ten_rounds_per_visit(tmp_path: Path):
    run_dir = train(validate_config(tiny_config(tmp_path), registries=registries()))
    logged = scalars(run_dir)
    assert [s for s, _ in logged["eval/cartpole/length=0.5/mean_return"]] == list(range(0, 201, 20))
    assert [s for s, _ in logged["eval/cartpole/length=1.5/mean_return"]] == list(range(220, 401, 20))
    rows = list(csv.DictReader((run_dir / "task_summary.csv").open()))
    assert "eval_return" in rows[0] and not any(k.startswith("eval_return/") for k in rows[0])


@pytest.mark.parametrize("algo", ["dqn", "ppo"])
def test_eval_plays_the_agents_deterministic_policy_on_the_seeded_episodes(tmp_path: Path, algo: str):
    # The vectorised rounds against one plain episode at a time with SB3's own predict(deterministic=True).
    cfg = validate_config(tiny_config(tmp_path, algo, tasks="all", max_episode_steps=60), registries=registries())
    env = build_env(cfg)
    agent = build_agent(cfg, env)
    callback = EvalCallback(settings_from(cfg.eval, EvalSettings), TaskEnvs.from_config(cfg), cfg.env.switch_every)
    agent.learn(300, callback=callback)
    assert set(callback.latest) == {0, 1, 2} and callback.latest[0].step == callback.last_step
    task_envs = TaskEnvs.from_config(cfg)
    for task in range(3):
        # The final network (PPO's last update follows the last round), on the copies the rounds used.
        result = callback.evaluator.evaluate(agent, task, step=agent.num_timesteps)
        expected = []
        for i in range(cfg.eval.episodes):
            copy = task_envs.make(task)
            obs, _ = copy.reset(seed=callback.evaluator.episode_seed(task, i))
            total, steps, done = 0.0, 0, False
            while not done and steps < 60:
                action, _ = agent.predict(obs, deterministic=True)
                obs, reward, terminated, truncated, _ = copy.step(action)
                total, steps, done = total + reward, steps + 1, terminated or truncated
            expected.append(total)
        assert list(result.returns) == expected, task
        assert max(result.lengths) <= 60
    # Different episodes get different seeds, and the same ones in every round.
    seeds = {callback.evaluator.episode_seed(t, i) for t in range(3) for i in range(3)}
    assert len(seeds) == 9


@pytest.mark.parametrize("algo", ["dqn", "ppo"])
def test_eval_does_not_change_training(tmp_path: Path, algo: str):
    # Epsilon > 0 (the evaluation's own random draws), every task, often; a head reset at each switch draws from
    # torch's RNG, DQN's exploration from NumPy's and the action space's.
    base = tiny_config(tmp_path, algo, tasks="all", every=25, epsilon=0.3)
    cfg = validate_config({**base, "interventions": ["reset"]}, registries=registries())
    params = []
    for with_eval in (True, False):
        env = build_env(cfg)
        agent = build_agent(cfg, env)
        callback = (
            EvalCallback(settings_from(cfg.eval, EvalSettings), TaskEnvs.from_config(cfg), cfg.env.switch_every)
            if with_eval
            else None
        )
        agent.learn(450, callback=callback)
        if with_eval:
            assert callback.last_step == agent.num_timesteps and len(callback.latest) == 3
        params.append({k: v.clone() for k, v in agent.policy.state_dict().items()})
    for key in params[0]:
        assert th.equal(params[0][key], params[1][key]), key


def test_eval_epsilon_changes_the_returns(tmp_path: Path):
    # Epsilon is applied: a fully random evaluation policy plays other actions than the greedy one.
    cfg = validate_config(tiny_config(tmp_path), registries=registries())
    env = build_env(cfg)
    agent = build_agent(cfg, env)
    results = {}
    for epsilon in (0.0, 1.0):
        callback = EvalCallback(
            settings_from(cfg.eval.model_copy(update={"epsilon": epsilon, "episodes": 8}), EvalSettings),
            TaskEnvs.from_config(cfg),
            cfg.env.switch_every,
        )
        callback.init_callback(agent)
        results[epsilon] = callback.evaluator.evaluate(agent, 0, step=0).returns
    assert results[0.0] != results[1.0]
    assert np.all(np.asarray(results[1.0]) >= 1)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"tasks": "every"}, "eval.tasks"),
        ({"epsilon": 1.5}, "eval.epsilon"),
        ({"episodes": 0}, "eval.episodes"),
        ({"evry": 10}, "did you mean 'eval.every'"),
    ],
)
def test_bad_eval_config_is_one_line(tmp_path: Path, override: dict, message: str):
    with pytest.raises(ConfigError) as info:
        validate_config(tiny_config(tmp_path, **override), registries=registries())
    assert message in str(info.value) and "\n" not in str(info.value)
