"""The feature-norm probe against NumPy and a hand-made case, alone and as the monitor runs it."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch as th

from agents import PlasticDQN
from rl_plasticity.probes.feature_norm import feature_norm
from rl_plasticity.probing import probe_batch


def test_known_norms():
    # Rows of norm 5, 0 and 13: the mean is 6.
    features = th.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 0.0], [5.0, 0.0, -12.0]])
    assert feature_norm(features) == pytest.approx(6.0)


def test_against_numpy():
    x = np.random.default_rng(0).normal(size=(50, 7)) * np.arange(1, 8)
    assert feature_norm(th.as_tensor(x, dtype=th.float32)) == pytest.approx(np.linalg.norm(x, axis=1).mean(), rel=1e-6)


@pytest.mark.parametrize("bad", [th.ones(3), th.ones(0, 4), th.tensor([[1.0, float("nan")]])])
def test_bad_inputs(bad):
    with pytest.raises(ValueError, match="features"):
        feature_norm(bad)


def test_monitor_runs_it_on_the_value_head_features():
    agent = PlasticDQN(
        "MlpPolicy",
        gym.make("CartPole-v1"),
        learning_starts=20,
        buffer_size=500,
        seed=0,
        device="cpu",
        policy_kwargs={"net_arch": [16]},
    )
    agent.learn(60)
    batch = agent.replay_buffer.sample(32)
    result = probe_batch(agent, batch, ["feature_norm"])
    with th.no_grad():
        features = agent.q_net.q_net[:-1](
            agent.q_net.extract_features(batch.observations, agent.q_net.features_extractor)
        )
    expected = np.linalg.norm(features.numpy().astype(np.float64), axis=1).mean()
    assert result.scalars == {"feature_norm/value_head": pytest.approx(expected, rel=1e-6)}
