"""PlasticDQN's exploration and C-CHAIN settings: the absolute epsilon schedule (and its restart at switches),
random steps per task visit, the TD loss, no gradient clipping, their configs, presets and exact resume."""

from __future__ import annotations

import copy
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch as th
from click.testing import CliRunner
from stable_baselines3 import DQN
from stable_baselines3.common.buffers import ReplayBufferSamples
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.save_util import load_from_zip_file
from stable_baselines3.common.vec_env import DummyVecEnv

from agents import POLICIES, PlasticDQN
from envs import make_sequence
from rl_plasticity.catalog import registries
from rl_plasticity.checkpoint import CheckpointStore
from rl_plasticity.cli import cli
from rl_plasticity.config import CONFIGS_DIR, load_config, validate_config
from rl_plasticity.layout import LATEST
from rl_plasticity.runner import build_agent, build_env, policy_kwargs, resume, train

KW = dict(
    learning_starts=0,
    batch_size=8,
    train_freq=1,
    target_update_interval=10,
    buffer_size=1_000,
    exploration_final_eps=0.05,
    policy_kwargs=dict(net_arch=[16]),
    seed=5,
    device="cpu",
)
SWITCH = 50  # env steps per task of the CartPole sequences below (3 tasks)


def sequence_env(**kwargs: Any) -> DummyVecEnv:
    return make_vec_env(
        make_sequence,
        n_envs=1,
        vec_env_cls=DummyVecEnv,
        env_kwargs=dict(name="cartpole_shift", switch_every=SWITCH, **kwargs),
    )


class StepLog(BaseCallback):
    """Per env step, as SB3's callback sees it (after the step, before the agent's _on_step and train()):
    the epsilon that chose the action, whether it was a random step, the action, the gradient steps so far."""

    def __init__(self) -> None:
        super().__init__()
        self.eps: list[float] = []
        self.random: list[bool] = []
        self.actions: list[int] = []
        self.updates: list[int] = []

    def _on_step(self) -> bool:
        self.eps.append(self.model.exploration_rate)
        self.random.append(self.model._random_step)
        self.actions.append(int(self.locals["actions"][0]))
        self.updates.append(self.model.num_gradient_steps)
        return True


def run(total: int, env_kwargs: dict[str, Any] | None = None, **kw: Any) -> tuple[PlasticDQN, StepLog]:
    agent = PlasticDQN("MlpPolicy", sequence_env(**(env_kwargs or {})), **{**KW, **kw})
    log = StepLog()
    agent.learn(total, callback=log)
    return agent, log


def linear_eps(steps: int, decay: int, start: float = 1.0, end: float = 0.05) -> float:
    return end if steps >= decay else start + steps / decay * (end - start)


# -- exploration ------------------------------------------------------------------------------------------


def test_exploration_steps_are_absolute_so_a_fresh_run_explores_as_the_first_task():
    continual = run(3 * SWITCH, exploration_steps=40, exploration_fraction=None)[1].eps
    fresh = run(SWITCH, dict(order="explicit", task_order=[0]), exploration_steps=40, exploration_fraction=None)[1].eps
    # Epsilon after i env steps, whatever the run's length.
    assert continual == pytest.approx([linear_eps(i, 40) for i in range(3 * SWITCH)], abs=1e-12)
    assert fresh == continual[:SWITCH]
    # SB3's fractional schedule does not: the same decay fraction follows each run's own length.
    continual = run(3 * SWITCH, exploration_fraction=0.8)[1].eps
    fresh = run(SWITCH, dict(order="explicit", task_order=[0]), exploration_fraction=0.8)[1].eps
    assert fresh[10] < continual[10] - 0.1


def test_exploration_reset_on_switch_restarts_the_decay_at_every_switch():
    agent, log = run(3 * SWITCH, exploration_steps=40, exploration_fraction=None, exploration_reset_on_switch=True)
    assert log.eps == pytest.approx([linear_eps(i % SWITCH, 40) for i in range(3 * SWITCH)], abs=1e-12)
    assert agent._exploration_count == 0  # the last step was a switch


def test_agent_rejects_a_restart_without_exploration_steps():
    with pytest.raises(ValueError, match="exploration_steps"):
        PlasticDQN("MlpPolicy", "CartPole-v1", exploration_reset_on_switch=True, **KW)
    with pytest.raises(ValueError, match="td_loss"):
        PlasticDQN("MlpPolicy", "CartPole-v1", td_loss="l1", **KW)


# -- random steps at the start of each task visit -----------------------------------------------------------


def test_random_steps_per_task_act_uniformly_without_updates_at_every_visit():
    random_steps, decay = 20, 40
    # Epsilon 0 otherwise, so the action space's RNG is drawn from on the random steps only.
    agent = PlasticDQN(
        "MlpPolicy",
        sequence_env(),
        random_steps_per_task=random_steps,
        exploration_steps=decay,
        exploration_fraction=None,
        **{**KW, "exploration_initial_eps": 0.0, "exploration_final_eps": 0.0},
    )
    space = copy.deepcopy(agent.action_space)
    log = StepLog()
    agent.learn(3 * SWITCH, callback=log)

    in_random = [i % SWITCH < random_steps for i in range(3 * SWITCH)]
    assert log.random == in_random  # the first 20 steps of each visit, counted per visit
    # Their actions are the action space's uniform draws, one per random step, and nothing else drew from it.
    drawn = [int(space.sample()) for _ in range(sum(in_random))]
    assert [a for a, r in zip(log.actions, in_random) if r] == drawn
    assert space.np_random.bit_generator.state == agent.action_space.np_random.bit_generator.state
    # One update after each step of the agent's own (train_freq 1), none after a random step.
    expected = np.cumsum([0] + [not r for r in in_random])
    assert log.updates == list(expected[:-1]) and agent.num_gradient_steps == expected[-1] == 90
    # Neither the target-update phase nor the exploration counter moved on random steps (C-CHAIN).
    assert agent._n_calls == agent._exploration_count == 90


def test_random_steps_do_not_advance_epsilon():
    log = run(3 * SWITCH, random_steps_per_task=20, exploration_steps=40, exploration_fraction=None)[1]
    counted = np.cumsum([0] + [not r for r in log.random])[:-1]
    assert log.eps == pytest.approx([linear_eps(int(c), 40) for c in counted], abs=1e-12)
    assert (
        log.eps[SWITCH + 19] == log.eps[SWITCH] == pytest.approx(linear_eps(30, 40))
    )  # frozen in task 2's random steps
    # SB3's fractional schedule follows the run's progress, random steps or not.
    with_random = run(3 * SWITCH, random_steps_per_task=20, exploration_fraction=0.5)[1].eps
    assert with_random == run(3 * SWITCH, exploration_fraction=0.5)[1].eps
    assert with_random[1] > with_random[SWITCH] > with_random[SWITCH + 19] > with_random[2 * SWITCH]


# -- TD loss and clipping ---------------------------------------------------------------------------------


def _batch(n: int = 8) -> ReplayBufferSamples:
    rng = np.random.default_rng(1)
    t = lambda a: th.as_tensor(a, dtype=th.float32)  # noqa: E731
    return ReplayBufferSamples(
        observations=t(rng.normal(size=(n, 4))),
        actions=th.as_tensor(rng.integers(0, 2, (n, 1))),
        next_observations=t(rng.normal(size=(n, 4))),
        dones=t(rng.integers(0, 2, (n, 1))),
        rewards=t(rng.normal(scale=3.0, size=(n, 1))),
    )


@pytest.mark.parametrize("td_loss", ["huber", "mse"])
def test_td_loss_is_the_configured_one(td_loss: str):
    agent = PlasticDQN("MlpPolicy", "CartPole-v1", td_loss=td_loss, **KW)
    batch = _batch()
    loss, _ = agent.training_loss(batch)
    with th.no_grad():
        q = agent.q_net(batch.observations).gather(1, batch.actions).numpy().ravel()
        target = agent.compute_target(batch).numpy().ravel()
    d = np.abs(q - target)
    assert (d > 1).any() and (d < 1).any()  # both branches of the Huber loss
    expected = np.mean(d**2) if td_loss == "mse" else np.mean(np.where(d < 1, 0.5 * d**2, d - 0.5))
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_clipping_at_inf_leaves_gradients_bit_identical():
    agent = PlasticDQN("MlpPolicy", "CartPole-v1", **KW)
    loss, _ = agent.training_loss(_batch())
    (loss * 1e15).backward()  # a huge gradient norm (its square still a finite float32)
    params = [p for p in agent.policy.parameters() if p.grad is not None]  # the target network has none
    grads = [p.grad.clone() for p in params]
    norm = th.nn.utils.clip_grad_norm_(agent.policy.parameters(), math.inf)  # as train() calls it
    assert all(th.equal(p.grad, g) for p, g in zip(params, grads))
    assert norm.item() == pytest.approx(th.linalg.vector_norm(th.cat([g.ravel() for g in grads])).item(), rel=1e-5)
    assert norm.item() > 1e10
    th.nn.utils.clip_grad_norm_(agent.policy.parameters(), 1.0)  # whereas a finite norm does scale them
    assert not all(th.equal(p.grad, g) for p, g in zip(params, grads))


def test_no_clipping_trains_as_without_the_clip_call(monkeypatch: pytest.MonkeyPatch):
    def train(max_grad_norm: float) -> dict[str, th.Tensor]:
        return run(120, max_grad_norm=max_grad_norm, learning_rate=0.05)[0].policy.state_dict()

    unclipped = train(math.inf)
    clipped = train(1e-3)
    # The same run with clip_grad_norm_ replaced by "compute the norm, scale nothing".
    monkeypatch.setattr(
        th.nn.utils,
        "clip_grad_norm_",
        lambda params, max_norm: th.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]),
    )
    plain = train(1e-3)
    assert all(th.equal(unclipped[k], plain[k]) for k in plain)
    assert not all(th.equal(clipped[k], plain[k]) for k in plain)


# -- the config, and SB3 with every default ---------------------------------------------------------------

TINY = dict(
    name="t",
    total_steps=300,
    agent=dict(algo="dqn", learning_starts=50, buffer_size=500, batch_size=8),
    net=dict(kind="mlp", width=16, depth=1),
    env=dict(sequence="cartpole_shift", switch_every=100),
    logging=dict(progress_bar=False),
    monitor=dict(enabled=False),
)


def test_default_config_builds_a_stock_sb3_dqn():
    cfg = validate_config(TINY, registries=registries())
    env = build_env(cfg)
    ours = build_agent(cfg, env).learn(300)
    hyper = cfg.agent.model_dump(
        exclude={
            "algo",
            "double_q",
            "td_loss",
            "exploration_steps",
            "exploration_reset_on_switch",
            "random_steps_per_task",
            "fast",
        }
    )
    stock_env = build_env(cfg)
    stock = DQN(
        POLICIES["dqn"], stock_env, seed=cfg.seed, device="cpu", policy_kwargs=policy_kwargs(cfg, stock_env), **hyper
    ).learn(300)
    assert ours._n_updates == stock._n_updates > 0
    sa, sb = ours.policy.state_dict(), stock.policy.state_dict()
    assert all(th.equal(sa[k], sb[k]) for k in sb)


def test_config_passes_the_options_to_the_agent():
    cfg = validate_config(
        {
            **TINY,
            "agent": {
                **TINY["agent"],
                "td_loss": "mse",
                "max_grad_norm": None,
                "exploration_steps": 70,
                "exploration_reset_on_switch": True,
                "random_steps_per_task": 30,
            },
        },
        registries=registries(),
    )
    assert cfg.agent.exploration_fraction is None  # exploration_steps alone replaces it
    agent = build_agent(cfg, build_env(cfg))
    assert (agent.td_loss, agent.max_grad_norm, agent.exploration_steps) == ("mse", math.inf, 70)
    assert agent.exploration_reset_on_switch and agent.random_steps_per_task == 30
    # The saved config loads again as it was (the resume path).
    assert validate_config(cfg.model_dump(mode="json"), registries=registries()) == cfg


BAD = [
    ("agent.exploration_steps=100", ["agent.exploration_steps", "exploration_fraction=null"]),
    ("agent.exploration_fraction=null", ["agent.exploration_steps", "no exploration schedule"]),
    ("agent.exploration_reset_on_switch=true", ["agent.exploration_reset_on_switch", "exploration_steps"]),
    ("agent.exploration_steps=0", ["agent.exploration_steps", "greater than 0"]),
    ("agent.random_steps_per_task=-1", ["agent.random_steps_per_task", "greater than or equal to 0"]),
    ("agent.td_loss=l1", ["agent.td_loss", "'huber' or 'mse'"]),
    ("agent.max_grad_norm=0", ["agent.max_grad_norm", "greater than 0"]),
    ("env.options.low_return_cutoff={steps: 0, min_return: 0.1}", ["low_return_cutoff", "steps", "positive"]),
    ("env.options.low_return_cutoff={steps: 10, min_return: 0.1, games: [pong]}", ["'pong'", "seaquest"]),
    ("env.options.low_return_cutoff={steps: 10, min_retrun: 0.1}", ["min_retrun", "steps, min_return, games"]),
]


@pytest.mark.parametrize("override,words", BAD, ids=[o for o, _ in BAD])
def test_bad_values_one_line_exit_2_nothing_written(tmp_path: Path, override: str, words: list[str]):
    preset = tmp_path / "tiny.yaml"
    preset.write_text("agent: {algo: dqn, exploration_fraction: 0.2}\nenv: {sequence: cartpole_shift}\n")
    result = CliRunner().invoke(cli, ["train", str(preset), override, f"logging.root_dir={tmp_path / 'runs'}"])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rlp: error: "), result.stderr
    assert all(word in lines[0] for word in words), lines[0]
    assert not (tmp_path / "runs").exists()


# -- presets ------------------------------------------------------------------------------------------------


def test_cchain_preset_runs_what_the_cchain_code_runs():
    agent = load_config(CONFIGS_DIR / "dqn_minatar_cycle.yaml", registries=registries()).agent
    assert (agent.buffer_size, agent.exploration_steps, agent.exploration_fraction) == (100_000, 100_000, None)
    assert (agent.exploration_initial_eps, agent.exploration_final_eps) == (1.0, 0.1)
    assert (agent.random_steps_per_task, agent.learning_starts, agent.train_freq, agent.gradient_steps) == (
        10_000,
    ) * 2 + (1, 1)
    assert (agent.td_loss, agent.max_grad_norm, agent.learning_rate, agent.batch_size) == ("mse", None, 3e-4, 32)
    assert (agent.target_update_interval, agent.double_q, agent.gamma) == (1_000, True, 0.99)
    env = load_config(CONFIGS_DIR / "dqn_minatar_cycle.yaml", registries=registries()).env
    assert env.options == {
        "sticky_action_prob": 0.1,
        "low_return_cutoff": {"steps": 1000, "min_return": 0.1, "games": ["seaquest"]},
    }


@pytest.mark.parametrize("preset,tasks", [("continual_minatar", 3), ("permuted_breakout", 6)])
def test_study_presets_keep_the_schedule_they_ran_with(preset: str, tasks: int):
    cfg = load_config(CONFIGS_DIR / "study" / f"{preset}.yaml", registries=registries())
    # The study ran with exploration_fraction 0.0833333 of one pass (tasks x switch_every).
    assert cfg.agent.exploration_steps == round(0.0833333 * tasks * cfg.env.switch_every)
    assert cfg.agent.exploration_fraction is None
    # ... and with SB3's loss and clipping, no random steps per task and no episode cut.
    assert (cfg.agent.td_loss, cfg.agent.max_grad_norm, cfg.agent.random_steps_per_task) == ("huber", 10.0, 0)
    assert cfg.env.options.get("low_return_cutoff") is None


# -- exact resume -------------------------------------------------------------------------------------------

RESUME = """\
name: r
seed: 3
total_steps: 1500
threads: 1
agent: {algo: dqn, double_q: true, learning_starts: 100, buffer_size: 2000, batch_size: 16, train_freq: 4,
        target_update_interval: 100, exploration_fraction: null, exploration_steps: 300,
        exploration_reset_on_switch: true, random_steps_per_task: 150, td_loss: mse, max_grad_norm: null}
net: {kind: mlp, width: 16, depth: 1}
env: {sequence: cartpole_shift, switch_every: 500}
logging: {progress_bar: false}
monitor: {enabled: false}
checkpoint: {every: 100, keep: 100}
"""


def test_resume_inside_a_visits_random_steps_equals_the_uninterrupted_run(tmp_path: Path):
    (tmp_path / "r.yaml").write_text(RESUME)
    reference = train(
        load_config(tmp_path / "r.yaml", [f"logging.root_dir={tmp_path / 'ref'}"], registries=registries())
    )
    # The reference's own checkpoint at step 600: task 1, 100 steps into its 150 random steps.
    run_dir = tmp_path / "copy"
    shutil.copytree(reference, run_dir)
    (run_dir / "model.zip").unlink()
    store = CheckpointStore(run_dir)
    # A resume takes the newest complete checkpoint, so the later ones go.
    for later in store.root.glob("step_*"):
        if int(later.name.removeprefix("step_")) > 600:
            shutil.rmtree(later)
    (store.root / LATEST).write_text("step_000000000600\n")
    state = store.read().state["agent"]
    assert (state["_visit_steps"], state["_exploration_count"]) == (100, 0)  # reset at the switch, frozen since
    assert state["_n_calls"] == 500 - 150  # task 0's steps of its own; none since
    resume(run_dir)

    got, want = load_from_zip_file(run_dir / "model.zip")[1], load_from_zip_file(reference / "model.zip")[1]
    assert all(th.equal(got["policy"][k], want["policy"][k]) for k in want["policy"])
    final, ref = CheckpointStore(run_dir).read().state["agent"], CheckpointStore(reference).read().state["agent"]
    for key in (
        "num_timesteps",
        "num_gradient_steps",
        "_n_calls",
        "exploration_rate",
        "_visit_steps",
        "_exploration_count",
    ):
        assert final[key] == ref[key], key
    # Per visit, 88 rollouts of train_freq 4 end on a step of the agent's own (visit steps 151, 155, ..., 499).
    assert ref["num_gradient_steps"] == 3 * 88
