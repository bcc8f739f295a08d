"""The feature-variance probe against NumPy and a hand-made case, alone and as the monitor runs it."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch as th

from agents import PlasticPPO
from rl_plasticity.probes.feature_variance import feature_variance
from rl_plasticity.probing import probe_batch


def test_known_variances():
    # Row variances (unbiased, across the 3 units): 1, 0 and 4; the mean is 5/3.
    features = th.tensor([[1.0, 2.0, 3.0], [7.0, 7.0, 7.0], [0.0, 2.0, 4.0]])
    assert feature_variance(features) == pytest.approx(5 / 3)


def test_against_numpy_and_not_the_variance_across_the_batch():
    x = np.random.default_rng(1).normal(size=(40, 6)) * np.arange(1, 7) + np.arange(6)
    expected = x.var(axis=1, ddof=1).mean()
    value = feature_variance(th.as_tensor(x, dtype=th.float32))
    assert value == pytest.approx(expected, rel=1e-6)
    assert abs(value - x.var(axis=0, ddof=1).mean()) > 0.1 * expected


@pytest.mark.parametrize("bad", [th.ones(3), th.ones(4, 1), th.ones(0, 4), th.tensor([[1.0, float("inf")]])])
def test_bad_inputs(bad):
    with pytest.raises(ValueError, match="features"):
        feature_variance(bad)


def test_monitor_runs_it_on_the_value_head_features():
    agent = PlasticPPO(
        "MlpPolicy",
        gym.make("CartPole-v1"),
        n_steps=32,
        batch_size=32,
        n_epochs=1,
        seed=0,
        device="cpu",
        policy_kwargs={"net_arch": [16, 16]},
    )
    agent.learn(32)
    batch = next(agent.rollout_buffer.get(32))
    result = probe_batch(agent, batch, ["feature_variance"])
    with th.no_grad():  # PPO's critic: its MLP (Linear, Tanh, Linear, Tanh) on the flattened observations
        features = agent.policy.mlp_extractor.value_net(batch.observations.flatten(1))
    expected = features.numpy().astype(np.float64).var(axis=1, ddof=1).mean()
    assert result.scalars == {"feature_variance/value_head": pytest.approx(expected, rel=1e-6)}
