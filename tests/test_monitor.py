"""The plasticity monitor: what it logs, the task summary, and that it leaves training unchanged."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch as th
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from rl_plasticity.config import validate_config
from rl_plasticity.monitor import MonitorCallback
from rl_plasticity.probe_sets import ProbeSets
from rl_plasticity.probes import effective_rank
from rl_plasticity.runner import build_agent, build_env, train

MONITOR = dict(probe_every=50, probe_set_size=64, hessian_order=5, gram_size=32, trainability_steps=5)


def tiny_config(tmp_path: Path, algo: str = "dqn", **monitor) -> dict:
    agent = (dict(algo="dqn", learning_starts=50, buffer_size=1000, batch_size=16, train_freq=1,
                  target_update_interval=50, double_q=True) if algo == "dqn"
             else dict(algo="ppo", n_steps=64, batch_size=32, n_epochs=2))
    return dict(name="mon", seed=2, total_steps=600, agent=agent, net=dict(kind="mlp", width=16, depth=2),
                env=dict(sequence="cartpole_shift", switch_every=200),
                logging=dict(root_dir=str(tmp_path / "runs"), progress_bar=False, save_model=False),
                monitor={**MONITOR, **monitor})


def read_events(run_dir: Path) -> EventAccumulator:
    (events,) = run_dir.glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events), size_guidance={"scalars": 0, "tensors": 0, "histograms": 0})
    acc.Reload()
    return acc


@pytest.mark.parametrize("algo", ["dqn", "ppo"])
def test_monitor_logs_probes_summary_and_probe_sets(tmp_path: Path, algo: str):
    # PPO takes 4 gradient steps per 64-step rollout here, so it needs a shorter probe period.
    run_dir = train(validate_config(tiny_config(tmp_path, algo, probe_every=50 if algo == "dqn" else 8)))
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
    visits = [("cartpole/length=0.5", "1", "0", "200", "True"), ("cartpole/length=1.5", "1", "200", "400", "True"),
              ("cartpole/length=0.25", "1", "400", "600", "True")]
    if algo == "ppo":  # the cut-short revisit of task 0 gets its row, marked incomplete
        visits.append(("cartpole/length=0.5", "2", "600", "640", "False"))
    assert [(r["task"], r["visit"], r["start_step"], r["end_step"], r["complete"]) for r in rows] == visits
    for r in rows[:3]:
        assert float(r["mean_return"]) > 0 and 1 <= float(r["erank/value_head"]) <= 16
        assert "hessian_top_eig/loss" in r and r["trainability/value"] != ""

    state = th.load(run_dir / "probe_sets.pt", weights_only=False)
    assert sorted(state["frozen"]) == [0, 1, 2]
    assert all(len(s["observations"]) == 64 for s in state["frozen"].values())


def test_probe_set_values_match_an_independent_computation(tmp_path: Path):
    # The erank logged for task 0's probe set at its switch equals effective_rank on that frozen set.
    cfg = validate_config(tiny_config(tmp_path, probe_every=10_000))
    env = build_env(cfg)
    agent = build_agent(cfg, env)
    run_dir = tmp_path / "direct"
    run_dir.mkdir()
    callback = MonitorCallback(cfg.monitor, run_dir, env.get_attr("task_names")[0])
    seen: dict[str, float] = {}

    original = callback._probe_round

    def spy(heavy: bool) -> dict[str, float]:
        if callback.visit.task_id == 0 and not seen:
            sets = callback.probe_sets.batch(0, agent.device)
            with th.no_grad():
                seen["expected"] = effective_rank(agent.value_features(sets.observations))
        values = original(heavy)
        if "got" not in seen:
            seen["got"] = values["erank/value_head"]
        return values

    callback._probe_round = spy  # type: ignore[method-assign]
    agent.learn(200, callback=callback)
    assert seen["got"] == pytest.approx(seen["expected"], rel=1e-9)


@pytest.mark.parametrize("algo", ["dqn", "ppo"])
def test_monitor_does_not_change_training(tmp_path: Path, algo: str):
    cfg = validate_config(tiny_config(tmp_path, algo, probe_every=20))
    params = []
    for with_monitor in (True, False):
        env = build_env(cfg)
        agent = build_agent(cfg, env)
        callback = MonitorCallback(cfg.monitor, tmp_path, env.get_attr("task_names")[0]) if with_monitor else None
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
    cfg = validate_config(dict(
        tiny_config(tmp_path, "ppo", probe_every=4, hessian_order=3, gram_size=8, probe_set_size=16),
        net=dict(kind="minatar", width=8, channels=4), env=dict(sequence="continual_minatar", switch_every=128),
    ))
    params = []
    for with_monitor in (True, False):
        env = build_env(cfg)
        agent = build_agent(cfg, env)
        callback = MonitorCallback(cfg.monitor, tmp_path, env.get_attr("task_names")[0]) if with_monitor else None
        agent.learn(256, callback=callback)  # the switch at 128 probes task 0's set, filled at 64
        assert all(isinstance(p, th.nn.Parameter) for m in agent.policy.modules() for p in m._parameters.values())
        params.append({k: v.clone() for k, v in agent.policy.state_dict().items()})
    for key in params[0]:
        assert th.equal(params[0][key], params[1][key]), key
