"""The plasticity monitor: what it logs, the task summary, and that it leaves training unchanged."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch as th
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from rl_plasticity.catalog import registries
from rl_plasticity.config import validate_config
from rl_plasticity.monitor import MonitorCallback, MonitorSettings
from rl_plasticity.probe_sets import ProbeSets, random_policy_transitions
from rl_plasticity.probes import effective_rank
from rl_plasticity.runner import build_agent, build_env, settings_from, train
from rl_plasticity.task_envs import TaskEnvs

MONITOR = dict(probe_every=50, probe_set_size=64, hessian_order=5, gram_size=32, trainability_steps=5)


def tiny_config(tmp_path: Path, algo: str = "dqn", **monitor) -> dict:
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
        name="mon",
        seed=2,
        total_steps=600,
        agent=agent,
        net=dict(kind="mlp", width=16, depth=2),
        env=dict(sequence="cartpole_shift", switch_every=200),
        logging=dict(root_dir=str(tmp_path / "runs"), progress_bar=False, save_model=False),
        monitor={**MONITOR, **monitor},
        eval=dict(enabled=False),
    )


def read_events(run_dir: Path) -> EventAccumulator:
    (events,) = run_dir.glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events), size_guidance={"scalars": 0, "tensors": 0, "histograms": 0})
    acc.Reload()
    return acc


@pytest.mark.parametrize("algo", ["dqn", "ppo"])
def test_monitor_logs_probes_summary_and_probe_sets(tmp_path: Path, algo: str):
    # PPO takes 4 gradient steps per 64-step rollout here, so it needs a shorter probe period.
    run_dir = train(
        validate_config(tiny_config(tmp_path, algo, probe_every=50 if algo == "dqn" else 8), registries=registries())
    )
    acc = read_events(run_dir)
    scalars = set(acc.Tags()["scalars"])
    for source in ("probe_set", "batch"):
        for probe in ("erank", "srank", "approx_rank", "eps_rank", "lyle_rank", "nc1", "nc2", "nc4"):
            assert f"plasticity/{probe}/value_head@{source}" in scalars, (probe, source)
        assert any(t.startswith("plasticity/dormant/") and t.endswith(f"@{source}") for t in scalars)
    # K-FAC runs on the fixed probe set only (monitor.batch_probes leaves it out by default).
    assert any(t.startswith("plasticity/kfac_eps_rank/") and t.endswith("@probe_set") for t in scalars)
    assert not any(t.startswith("plasticity/kfac_") and t.endswith("@batch") for t in scalars)
    if algo == "dqn":
        assert "plasticity/nc3/value_head@probe_set" in scalars
    # PPO collects whole rollouts of 64 steps, so it stops at 640, mid-visit.
    end = 600 if algo == "dqn" else 640
    for heavy in ("hessian_eps_rank/loss", "gram_erank_kl/value", "trainability/value"):
        tag = f"plasticity/{heavy}@probe_set"
        assert tag in scalars
        # Heavy probes run at switches (and at the end) only, and never on the training batch.
        assert {e.step for e in acc.Scalars(tag)} == {200, 400, 600, end}
        assert f"plasticity/{heavy}@batch" not in scalars
    assert any(t.startswith("plasticity/weight_l2_norm/") for t in scalars)
    assert any(t.startswith("plasticity/grad_norm/") for t in scalars)
    hists = set(acc.Tags()["histograms"])
    assert "plasticity/singular_values/value_head@probe_set" in hists
    assert any(t.startswith("plasticity/kfac_eigs_A/") for t in hists)
    # Light probes run every probe_every gradient steps, so several times per task.
    assert len(acc.Scalars("plasticity/erank/value_head@batch")) >= 3

    rows = list(csv.DictReader((run_dir / "task_summary.csv").open()))
    visits = [
        ("cartpole/length=0.5", "1", "0", "200", "True"),
        ("cartpole/length=1.5", "1", "200", "400", "True"),
        ("cartpole/length=0.25", "1", "400", "600", "True"),
    ]
    if algo == "ppo":  # the cut-short revisit of task 0 gets its row, marked incomplete
        visits.append(("cartpole/length=0.5", "2", "600", "640", "False"))
    assert [(r["task"], r["visit"], r["start_step"], r["end_step"], r["complete"]) for r in rows] == visits
    for r in rows[:3]:
        assert float(r["mean_return"]) > 0 and 1 <= float(r["erank/value_head"]) <= 16
        assert "hessian_top_eig/loss" in r and r["trainability/value"] != ""

    state = th.load(run_dir / "probe_sets.pt", weights_only=False)
    assert state["source"] == "random_policy" and sorted(state["sets"]) == [0, 1, 2]
    assert all(len(s["observations"]) == 64 for s in state["sets"].values())
    assert all(n >= 10 for n in state["episodes"].values())
    assert not (run_dir / "first_visit_sets.pt").exists()  # monitor.first_visit is off by default


def test_probe_set_values_match_an_independent_computation(tmp_path: Path):
    # The erank logged for task 0's probe set at its switch equals effective_rank on that frozen set.
    cfg = validate_config(tiny_config(tmp_path, probe_every=10_000), registries=registries())
    env = build_env(cfg)
    agent = build_agent(cfg, env)
    run_dir = tmp_path / "direct"
    run_dir.mkdir()
    callback = MonitorCallback(settings_from(cfg.monitor, MonitorSettings), run_dir, TaskEnvs.from_config(cfg))
    seen: dict[str, float] = {}

    original = callback._probe_round

    def spy(heavy: bool) -> dict[str, float]:
        if callback.visit.task_id == 0 and not seen:
            obs = th.as_tensor(callback.probe_sets.arrays(0)["observations"])
            with th.no_grad():
                seen["expected"] = effective_rank(agent.value_features(obs))
        values = original(heavy)
        if "got" not in seen:
            seen["got"] = values["erank/value_head"]
        return values

    callback._probe_round = spy  # type: ignore[method-assign]
    agent.learn(200, callback=callback)
    assert seen["got"] == pytest.approx(seen["expected"], rel=1e-9)


@pytest.mark.parametrize("algo", ["dqn", "ppo"])
def test_monitor_does_not_change_training(tmp_path: Path, algo: str):
    # Both probe sources: the random-policy sets are built during training (at the first round of a task).
    cfg = validate_config(tiny_config(tmp_path, algo, probe_every=20, first_visit=True), registries=registries())
    params = []
    for with_monitor in (True, False):
        env = build_env(cfg)
        agent = build_agent(cfg, env)
        callback = (
            MonitorCallback(settings_from(cfg.monitor, MonitorSettings), tmp_path, TaskEnvs.from_config(cfg))
            if with_monitor
            else None
        )
        agent.learn(500, callback=callback)
        assert agent.interventions == []  # the monitor's observer is gone afterwards
        params.append({k: v.clone() for k, v in agent.policy.state_dict().items()})
    assert params[0].keys() == params[1].keys()
    for key in params[0]:
        assert th.equal(params[0][key], params[1][key]), key


def test_probe_sets_fill_then_freeze():
    sets = ProbeSets(5, ("observations", "actions"))
    block = {"observations": np.arange(3)[:, None], "actions": np.arange(3)}
    assert not sets.add(0, block) and not sets.full(0)
    assert sets.add(0, {"observations": np.arange(3, 6)[:, None], "actions": np.arange(3, 6)})
    assert sets.full(0) and sets.arrays(0)["actions"].tolist() == [0, 1, 2, 3, 4]
    assert not sets.add(0, block)  # frozen
    assert sets.arrays(1) is None
    restored = ProbeSets(1, ("x",))
    restored.load_state_dict(sets.state_dict())
    assert restored.full(0) and restored.arrays(0)["actions"].tolist() == [0, 1, 2, 3, 4]


def test_monitor_leaves_ppo_minatar_training_unchanged(tmp_path: Path):
    # The shared conv torso is aliased three times in SB3's PPO policy: a probe that broke the aliases
    # would stop the conv from training, which only a conv network shows.
    cfg = validate_config(
        dict(
            tiny_config(tmp_path, "ppo", probe_every=4, hessian_order=3, gram_size=8, probe_set_size=16),
            net=dict(kind="minatar", width=8, channels=4),
            env=dict(sequence="continual_minatar", switch_every=128),
        ),
        registries=registries(),
    )
    params = []
    for with_monitor in (True, False):
        env = build_env(cfg)
        agent = build_agent(cfg, env)
        callback = (
            MonitorCallback(settings_from(cfg.monitor, MonitorSettings), tmp_path, TaskEnvs.from_config(cfg))
            if with_monitor
            else None
        )
        agent.learn(256, callback=callback)  # the switch at 128 probes task 0's random-policy set
        assert all(isinstance(p, th.nn.Parameter) for m in agent.policy.modules() for p in m._parameters.values())
        params.append({k: v.clone() for k, v in agent.policy.state_dict().items()})
    for key in params[0]:
        assert th.equal(params[0][key], params[1][key]), key


def test_random_policy_transitions_span_episodes_and_are_real_transitions():
    # CartPole: reward 1 every step, and an episode terminates exactly when the pole falls or the cart leaves
    # (|x| > 2.4 or |theta| > 12 degrees in the next state), which checks dones against the physics.
    env = TaskEnvs("cartpole_shift", {}, sequence_seed=0, run_seed=0).make(1)
    arrays, episodes = random_policy_transitions(env, size=64, seed=5, min_episodes=10)
    assert episodes >= 10
    assert {k: v.shape for k, v in arrays.items()} == {
        "observations": (64, 4),
        "actions": (64, 1),
        "next_observations": (64, 4),
        "dones": (64, 1),
        "rewards": (64, 1),
    }
    assert arrays["actions"].dtype == np.int64 and set(arrays["actions"].ravel()) <= {0, 1}
    assert len({o.tobytes() for o in arrays["observations"]}) == 64
    fell = (np.abs(arrays["next_observations"][:, 0]) > 2.4) | (
        np.abs(arrays["next_observations"][:, 2]) > 12 * 2 * np.pi / 360
    )
    np.testing.assert_array_equal(arrays["dones"].ravel(), fell.astype(np.float32))
    assert fell.any() and not fell.all()
    np.testing.assert_array_equal(arrays["rewards"], 1.0)
    again, _ = random_policy_transitions(TaskEnvs("cartpole_shift", {}, 0, 0).make(1), 64, seed=5)
    other, _ = random_policy_transitions(TaskEnvs("cartpole_shift", {}, 0, 0).make(1), 64, seed=6)
    assert all(np.array_equal(arrays[k], again[k]) for k in arrays)
    assert not np.array_equal(arrays["observations"], other["observations"])


def _probe_set_run(tmp_path: Path, name: str, seed: int = 3, **over) -> Path:
    cfg = dict(
        name=name,
        seed=seed,
        total_steps=None,
        agent=dict(
            algo="dqn",
            learning_starts=50,
            buffer_size=1000,
            batch_size=16,
            train_freq=1,
            target_update_interval=50,
            exploration_fraction=0.1,
        ),
        net=dict(kind="minatar", width=8, channels=4),
        env=dict(sequence="permuted_minatar", switch_every=100, options=dict(num_tasks=2)),
        logging=dict(root_dir=str(tmp_path), progress_bar=False, save_model=False),
        monitor=dict(
            probe_every=10_000,
            probes=["rank"],
            switch_probes=[],
            on_batch=False,
            probe_set_size=32,
            first_visit=True,
            first_visit_size=32,
        ),
        eval=dict(enabled=False),
        checkpoint=dict(every=None, replay_buffer=False),
    )
    for key, value in over.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) else value
    run_dir = train(validate_config(cfg, registries=registries()))
    return run_dir


def test_probe_sets_are_the_same_for_every_arm_and_for_the_fresh_arm(tmp_path: Path):
    # Permuted Breakout: the tasks themselves come from the seed too. Two arms with different interventions
    # and networks, and the fresh-network arm (rlp sweep --fresh: one run per task) with the same seed.
    plain = _probe_set_run(tmp_path, "plain")
    other = _probe_set_run(
        tmp_path, "other", interventions=["reset"], net=dict(kind="minatar", width=16, channels=4, layer_norm=True)
    )
    fresh = {
        k: _probe_set_run(tmp_path, f"fresh{k}", interventions=[], env=dict(order="explicit", task_order=[k]))
        for k in (0, 1)
    }
    reseeded = _probe_set_run(tmp_path, "reseeded", seed=4)
    sets = {
        name: th.load(d / "probe_sets.pt", weights_only=False)["sets"]
        for name, d in (
            ("plain", plain),
            ("other", other),
            ("fresh0", fresh[0]),
            ("fresh1", fresh[1]),
            ("reseeded", reseeded),
        )
    }
    assert sorted(sets["plain"]) == sorted(sets["other"]) == [0, 1]
    assert sorted(sets["fresh0"]) == [0] and sorted(sets["fresh1"]) == [1]
    for task in (0, 1):
        for name in ("other", f"fresh{task}"):
            for field, array in sets["plain"][task].items():
                got = sets[name][task][field]
                assert got.dtype == array.dtype and got.tobytes() == array.tobytes(), (name, task, field)
        assert sets["reseeded"][task]["observations"].tobytes() != sets["plain"][task]["observations"].tobytes()
    # The first-visit sets, played by each run's own policy, differ between the arms: the data that moved
    # the probes before.
    first = {
        name: th.load(d / "first_visit_sets.pt", weights_only=False)["frozen"]
        for name, d in (("plain", plain), ("other", other))
    }
    assert first["plain"][1]["actions"].tobytes() != first["other"][1]["actions"].tobytes()
    rows = list(csv.DictReader((plain / "task_summary.csv").open()))
    assert rows[0]["erank/value_head"] != "" and rows[0]["erank/value_head@first_visit"] != ""
