"""Trainability probe (Lyle et al. 2022): dead networks fit worse, the live network is never touched."""

from __future__ import annotations

import copy

import pytest
import torch as th
import torch.nn.functional as F
from torch import nn

from rl_plasticity.probes.trainability import trainability


def make_net(seed: int = 0) -> nn.Sequential:
    th.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2))


def probe_batch(n: int = 64) -> th.Tensor:
    return th.randn(n, 8, generator=th.Generator().manual_seed(1))


def test_dead_relu_network_is_less_trainable():
    fresh = make_net()
    dead = copy.deepcopy(fresh)
    with th.no_grad():
        dead[0].bias.fill_(-100.0)  # every hidden ReLU is off on every sample: only the output bias can learn
        dead[2].bias.fill_(-100.0)
    x = probe_batch()
    fresh_mse, dead_mse = trainability(fresh, x), trainability(dead, x)
    # Observed: fresh 3.3e-5, dead 3.2e-3 (the dead copy can only move its output bias towards the target mean).
    assert dead_mse > 10 * fresh_mse, (dead_mse, fresh_mse)


def test_targets_do_not_reproduce_a_network_built_with_the_same_seed():
    # A net initialised right after torch.manual_seed(0) must not get its own outputs as "random" targets.
    net = make_net(seed=0)
    assert trainability(net, probe_batch(), steps=0, seed=0) > 1e-3


def test_live_network_untouched_and_deterministic():
    net = make_net()
    x = probe_batch()
    optimizer = th.optim.Adam(net.parameters(), lr=1e-2)
    F.mse_loss(net(x), th.zeros(64, 2)).backward()
    optimizer.step()
    net.eval()
    calls = []
    net[0].register_forward_hook(lambda *args: calls.append(1))
    params = {k: v.clone() for k, v in net.state_dict().items()}
    grads = {k: p.grad.clone() for k, p in net.named_parameters()}
    opt_state = copy.deepcopy(optimizer.state_dict())
    rng = th.get_rng_state()

    first = trainability(net, x, steps=50, seed=3)
    second = trainability(net, x, steps=50, seed=3)
    other = trainability(net, x, steps=50, seed=4)

    assert first == second
    assert first != other
    assert th.equal(th.get_rng_state(), rng)
    assert not net.training
    assert calls == []  # the copies do not run the live network's hooks
    for k, p in net.named_parameters():
        assert th.equal(p.detach(), params[k])
        assert th.equal(p.grad, grads[k])
    after = optimizer.state_dict()
    for idx, state in opt_state["state"].items():
        for key, value in state.items():
            assert th.equal(after["state"][idx][key], value)
    assert isinstance(first, float)


def test_more_steps_fit_better_and_scale_matters():
    net = make_net()
    x = probe_batch()
    assert trainability(net, x, steps=100) < trainability(net, x, steps=0)
    # target_scale = 0 makes every target 0: with no training the MSE is the copy's own mean square output.
    with th.no_grad():
        own = F.mse_loss(net(x), th.zeros(64, 2)).item()
    assert trainability(net, x, steps=0, target_scale=0.0) == pytest.approx(own)


def test_bad_inputs_raise_value_error():
    net = make_net()
    x = probe_batch()
    bad = x.clone()
    bad[3, 2] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf"):
        trainability(net, bad)
    with pytest.raises(ValueError):
        trainability(net, x[:0])
    with pytest.raises(ValueError):
        trainability(net, x, lr=0.0)
    with pytest.raises(ValueError):
        trainability(net, x, steps=-1)
    with pytest.raises(ValueError):
        trainability(net, x, target_scale=float("nan"))
