"""The NaN guard: a non-finite loss term, gradient, parameter or probe value stops the run with one line naming
the step, the term and the last good checkpoint (exit status 3), with the logs flushed and that checkpoint kept."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import gymnasium as gym
import pytest
import torch as th
from click.testing import CliRunner
from stable_baselines3.common.save_util import load_from_zip_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from agents import PlasticDQN, PlasticPPO
from agents.plastic import NonFiniteError
from rl_plasticity.checkpoint import CheckpointStore
from rl_plasticity.cli import cli
from rl_plasticity.interventions import INTERVENTIONS, register
from rl_plasticity.interventions.base import Params, PlasticityIntervention
from rl_plasticity.monitor import check_probe_values

TINY = """\
name: nan
seed: 3
total_steps: 1500
threads: 1
agent: {algo: dqn, learning_starts: 100, buffer_size: 2000, batch_size: 16, train_freq: 4, target_update_interval: 100,
        fast: FAST}
net: {kind: mlp, width: 16, depth: 1}
env: {sequence: cartpole_shift, switch_every: 500}
logging: {progress_bar: false, root_dir: out}
monitor: {probe_every: 50, probe_set_size: 32, probes: [rank, dormant, weights], switch_probes: []}
checkpoint: {every: 100}
interventions: [_nan_test]
intervention_params: {_nan_test: {at: 120}}
"""


class _NanParams(Params):
    at: int = 1
    gradient_only: bool = False


class _NanAt(PlasticityIntervention):
    """Test only: a NaN loss term (or, with gradient_only, a finite term with a NaN gradient) at update `at`."""

    Params = _NanParams

    def loss_terms(self, agent: Any, batch: Any, features: th.Tensor, loss: th.Tensor) -> dict[str, th.Tensor]:
        if agent.num_gradient_steps + 1 != self.params.at:
            return {}
        if self.params.gradient_only:
            return {"bad": th.sqrt(features.sum() * 0.0)}  # 0, with gradient inf * 0 = nan
        return {"bad": features.sum() * float("nan")}


@pytest.fixture
def nan_intervention():
    register("_nan_test")(_NanAt)
    yield
    INTERVENTIONS.pop("_nan_test", None)


@pytest.mark.parametrize("fast", ["false", "true"], ids=["stock", "fast"])
def test_nan_loss_term_stops_the_run_naming_step_term_and_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, nan_intervention: None, fast: str
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "nan.yaml").write_text(TINY.replace("FAST", fast))
    result = CliRunner().invoke(cli, ["train", "nan.yaml"], catch_exceptions=False)
    # Update 120 comes after env step 100 (learning_starts) + 120 rollouts of 4 steps = 580.
    assert result.exit_code == 3, result.output
    (run_dir,) = (tmp_path / "out" / "nan").iterdir()
    ckpt = Path("out") / "nan" / run_dir.name / "checkpoints" / "step_000000000500"
    (line,) = result.stderr.strip().splitlines()[-1:]
    assert line == (
        f"rlp: error: non-finite interventions/_nan_test/bad = nan at env step 580 (gradient step 120); "
        f"training stopped, logs flushed; last good checkpoint: {ckpt}"
    )
    assert "Traceback" not in result.output
    assert not (run_dir / "model.zip").exists()  # no model saved from a diverged state

    # The last good checkpoint is intact and loadable, with finite parameters.
    store = CheckpointStore(run_dir)
    assert store.latest() == run_dir / "checkpoints" / "step_000000000500" and store.read().step == 500
    _, params, _ = load_from_zip_file(run_dir / "checkpoints" / "step_000000000500" / "model.zip")
    assert all(bool(th.isfinite(t).all()) for t in params["policy"].values())

    # The events are flushed up to the failure: task/id is recorded every step and dumped at step 580.
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    assert acc.Scalars("task/id")[-1].step == 580
    assert max(e.step for e in acc.Scalars("train/loss")) > 500

    # Resuming from it replays the same steps and meets the same NaN at the same step.
    again = CliRunner().invoke(cli, ["train", "--resume", str(run_dir)], catch_exceptions=False)
    assert again.exit_code == 3
    assert "interventions/_nan_test/bad = nan at env step 580 (gradient step 120)" in again.stderr
    assert store.latest() == run_dir / "checkpoints" / "step_000000000500"


def _learn_until_error(agent_cls: type, **kwargs: Any) -> NonFiniteError:
    env = gym.make("CartPole-v1")
    agent = agent_cls("MlpPolicy", env, seed=0, device="cpu", policy_kwargs={"net_arch": [16]}, **kwargs)
    with pytest.raises(NonFiniteError) as info:
        agent.learn(2000)
    return info.value


@pytest.mark.parametrize("fast", [False, True], ids=["stock", "fast"])
def test_nan_gradient_is_named_with_its_step(nan_intervention: None, fast: bool):
    # A finite term whose gradient is NaN: caught by the gradient norm (non-finite iff a gradient is).
    iv = _NanAt(_NanParams(at=7, gradient_only=True))
    err = _learn_until_error(PlasticDQN, learning_starts=50, train_freq=4, batch_size=16, interventions=[iv], fast=fast)
    assert (err.term, err.gradient_step) == ("train/grad_norm", 7) and math.isnan(err.value)
    assert err.env_step == 52 + 6 * 4  # updates after every 4 steps once past step 50: 52, 56, ..., 76


def test_ppo_nan_loss_term(nan_intervention: None):
    iv = _NanAt(_NanParams(at=5))
    err = _learn_until_error(PlasticPPO, n_steps=64, batch_size=32, n_epochs=2, interventions=[iv])
    assert (err.term, err.gradient_step, err.env_step) == ("interventions/_nan_test/bad", 5, 128)


def test_probe_values_may_be_nan_only_for_neural_collapse():
    allowed = {"nc1/value_head": math.nan, "nc4/value_head": math.nan, "erank/value_head": 3.0}
    check_probe_values(allowed, "probe_set", 7)
    with pytest.raises(NonFiniteError, match=r"non-finite plasticity/erank/value_head@probe_set = nan at env step 7"):
        check_probe_values({"nc1/value_head": math.nan, "erank/value_head": math.nan}, "probe_set", 7)
    with pytest.raises(NonFiniteError, match=r"plasticity/weight_l2_norm/total = inf"):
        check_probe_values({"weight_l2_norm/total": math.inf}, None, 7)
