"""The reset family: ``reset``, ``shrink_perturb`` and ``plasticity_injection`` on PlasticDQN and PlasticPPO.

Expected values are computed independently of the interventions: PyTorch's default init bounds, SB3's
orthogonal gains, the shrink-and-perturb formula with the fresh draw reproduced from the same RNG state,
and the stored tensors from before each firing.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch as th
from stable_baselines3.common.logger import configure
from torch import nn

from agents import POLICIES, Intervention, PlasticDQN, PlasticPPO, TaskSwitch, minatar_policy_kwargs
from envs import make_sequence
from rl_plasticity.interventions import INTERVENTIONS, build_interventions
from rl_plasticity.interventions.plasticity_injection import (
    FrozenLinear,
    InjectedHead,
    PlasticityInjection,
    injection_depth,
)
from rl_plasticity.interventions.reset import Reset
from rl_plasticity.interventions.shrink_perturb import ShrinkPerturb
from rl_plasticity.interventions.surgery import forget_optimizer_state

SWITCH = TaskSwitch(num_timesteps=0, from_task=0, to_task=1, from_name="a")
DQN_KW = dict(
    learning_starts=32,
    batch_size=16,
    train_freq=1,
    buffer_size=1_000,
    target_update_interval=10_000,
    device="cpu",
    seed=0,
)
PPO_KW = dict(n_steps=64, batch_size=32, n_epochs=2, device="cpu", seed=0)
PPO_GAINS = {"action_net": 0.01, "value_net": 1.0}


def dqn(interventions=(), width: int = 32, depth: int = 2, steps: int = 64, **kw) -> PlasticDQN:
    """A DQN whose weights, target network and Adam state have moved away from the initialisation."""
    kw = {**DQN_KW, **kw}
    agent = PlasticDQN(
        "MlpPolicy",
        "CartPole-v1",
        policy_kwargs=dict(net_arch=[width] * depth),
        interventions=list(interventions),
        **kw,
    )
    return agent.learn(steps)


def ppo(interventions=(), steps: int = 64, **kw) -> PlasticPPO:
    agent = PlasticPPO(
        "MlpPolicy",
        "CartPole-v1",
        policy_kwargs=dict(net_arch=[32, 32]),
        interventions=list(interventions),
        **{**PPO_KW, **kw},
    )
    return agent.learn(steps)


def make(algo: str, interventions=(), **kw):
    return dqn(interventions, **kw) if algo == "dqn" else ppo(interventions, **kw)


def params_of(module: nn.Module) -> dict[str, th.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def adam_state(agent) -> dict[str, dict[str, th.Tensor]]:
    """The optimizer state by parameter name (copies)."""
    return {
        name: {k: v.clone() for k, v in agent.optimizer.state[p].items()}
        for name, p in agent.online_network().named_parameters()
        if p in agent.optimizer.state
    }


def layer_of(param_name: str) -> str:
    return param_name.rsplit(".", 1)[0]


def changed_layers(before: dict[str, th.Tensor], after: dict[str, th.Tensor]) -> set[str]:
    assert before.keys() == after.keys()
    return {layer_of(name) for name in before if not th.equal(before[name], after[name])}


def outputs(agent, obs: th.Tensor) -> list[th.Tensor]:
    """Everything the agent computes from ``obs``: DQN online and target Q-values; PPO logits and values."""
    with th.no_grad():
        if isinstance(agent, PlasticDQN):
            return [agent.q_net(obs), agent.q_net_target(obs)]
        return [agent.policy.get_distribution(obs).distribution.logits, agent.policy.predict_values(obs)]


# -- reset ------------------------------------------------------------------------------------------------
def test_reset_head_dqn():
    agent = dqn(width=256, depth=1)  # a 256-wide head: 512 weights for the init statistics
    head = "q_net.2"
    online, target, adam = params_of(agent.q_net), params_of(agent.q_net_target), adam_state(agent)
    assert changed_layers(online, target) == {"q_net.0", "q_net.2"}  # the target lags behind
    iv = Reset()
    iv.on_task_switch(agent, SWITCH)

    after = params_of(agent.q_net)
    assert changed_layers(online, after) == {head}
    # PyTorch's default init: U(-b, b) with b = 1/sqrt(fan_in), for the weight and the bias.
    w, b = after[f"{head}.weight"], after[f"{head}.bias"]
    bound = 1 / math.sqrt(256)
    assert w.abs().max() <= bound and b.abs().max() <= bound
    assert abs(w.mean().item()) < 4 * bound / math.sqrt(3 * w.numel())
    assert w.var().item() == pytest.approx(bound**2 / 3, rel=0.2)
    # The target: the reset head copied in, the rest untouched.
    target_after = params_of(agent.q_net_target)
    for name in target_after:
        expected = after[name] if layer_of(name) == head else target[name]
        assert th.equal(target_after[name], expected), name
    # Adam: the head's state is gone, every other entry is exactly as it was.
    adam_after = adam_state(agent)
    assert set(adam_after) == {"q_net.0.weight", "q_net.0.bias"}
    for name, state in adam_after.items():
        assert state.keys() == adam[name].keys() and all(th.equal(state[k], adam[name][k]) for k in state)
    # Logged: one layer, 2 x 256 + 2 scalars, out of the whole network.
    logged = agent.logger.name_to_value
    assert logged["interventions/reset/fired"] == 1 and logged["interventions/reset/layers"] == 1
    assert logged["interventions/reset/params"] == 514
    assert logged["interventions/reset/fraction"] == pytest.approx(514 / (4 * 256 + 256 + 514))

    agent.train(gradient_steps=3, batch_size=16)
    trained = params_of(agent.q_net)
    assert changed_layers(after, trained) == {"q_net.0", "q_net.2"}
    assert all(th.isfinite(p).all() for p in trained.values())
    assert adam_state(agent)[f"{head}.weight"]["step"].item() == 3  # restarted at the reset


def test_reset_head_ppo():
    agent = ppo()
    with th.no_grad():  # move the heads far from their initialisation, so the check below can fail
        for name in PPO_GAINS:
            for p in agent.policy.get_submodule(name).parameters():
                p.add_(th.randn_like(p))
    before, adam = params_of(agent.policy), adam_state(agent)
    Reset().on_task_switch(agent, SWITCH)

    after = params_of(agent.policy)
    assert changed_layers(before, after) == set(PPO_GAINS)
    for name, gain in PPO_GAINS.items():
        # SB3's orthogonal init: the rows of W are orthogonal with norm `gain`; the bias is zero.
        w = after[f"{name}.weight"]
        assert th.allclose(w @ w.T, gain**2 * th.eye(w.shape[0]), atol=1e-6 * gain**2)
        assert th.equal(after[f"{name}.bias"], th.zeros_like(after[f"{name}.bias"]))
    adam_after = adam_state(agent)
    assert set(adam) - set(adam_after) == {f"{h}.{k}" for h in PPO_GAINS for k in ("weight", "bias")}
    for name, state in adam_after.items():
        assert all(th.equal(state[k], adam[name][k]) for k in state)

    agent.learn(64, reset_num_timesteps=False)
    trained = params_of(agent.policy)
    assert changed_layers(after, trained) == {layer_of(n) for n in trained}
    assert all(th.isfinite(p).all() for p in trained.values())


@pytest.mark.parametrize(
    ("algo", "layers", "k", "expected"),
    [
        ("dqn", "last_k", 1, {"q_net.4"}),
        ("dqn", "last_k", 2, {"q_net.2", "q_net.4"}),
        ("dqn", "all", 1, {"q_net.0", "q_net.2", "q_net.4"}),
        ("ppo", "last_k", 3, {"mlp_extractor.value_net.2", "action_net", "value_net"}),
        (
            "ppo",
            "all",
            1,
            {
                "mlp_extractor.policy_net.0",
                "mlp_extractor.policy_net.2",
                "mlp_extractor.value_net.0",
                "mlp_extractor.value_net.2",
                "action_net",
                "value_net",
            },
        ),
    ],
)
def test_reset_layers_variants(algo, layers, k, expected):
    agent = make(algo)
    net = agent.online_network()
    before, adam = params_of(net), adam_state(agent)
    target = params_of(agent.q_net_target) if algo == "dqn" else None
    Reset(Reset.Params(layers=layers, k=k)).on_task_switch(agent, SWITCH)

    after = params_of(net)
    assert changed_layers(before, after) == expected
    assert {layer_of(n) for n in adam} - {layer_of(n) for n in adam_state(agent)} == expected
    if target is not None:
        target_after = params_of(agent.q_net_target)
        for name, value in target_after.items():
            assert th.equal(value, after[name] if layer_of(name) in expected else target[name]), name
    touched = sum(after[n].numel() for n in after if layer_of(n) in expected)
    assert agent.logger.name_to_value["interventions/reset/params"] == touched


def test_reset_rejects_k_larger_than_the_network():
    with pytest.raises(ValueError, match="only 3 parametrised layers"):
        PlasticDQN(
            "MlpPolicy",
            "CartPole-v1",
            policy_kwargs=dict(net_arch=[32, 32]),
            interventions=[Reset(Reset.Params(layers="last_k", k=4))],
            device="cpu",
        )


class FiredRecorder(Intervention):
    """Records ``(update, fired)`` of another intervention after each update (it runs after it)."""

    def __init__(self, watched) -> None:
        self.watched, self.seen = watched, []

    def on_update(self, agent, num_gradient_steps):
        self.seen.append((num_gradient_steps, self.watched.fired))


def test_reset_every_n_updates_fires_at_multiples_only():
    iv = Reset(Reset.Params(at="every", every=3))
    recorder = FiredRecorder(iv)
    agent = dqn([iv, recorder], steps=32 + 10)  # learning starts after 32 steps: 10 updates
    assert recorder.seen == [(n, n // 3) for n in range(1, 11)]
    iv.on_task_switch(agent, SWITCH)  # at=every ignores task switches
    assert iv.fired == 3

    at_switch = Reset()
    for n in range(1, 5):
        at_switch.on_update(agent, n)
    assert at_switch.fired == 0


# -- shrink and perturb -------------------------------------------------------------------------------------
def expected_fresh(agent, seed: int) -> dict[str, th.Tensor]:
    """The fresh initialisation of every layer, drawn from ``seed`` like the algorithm's initialiser would."""
    th.manual_seed(seed)
    fresh = {}
    for name, layer in agent.parametrized_layers():
        w = th.empty_like(layer.weight)
        if isinstance(agent, PlasticDQN):  # nn.Linear.reset_parameters
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))
            bound = 1 / math.sqrt(layer.weight.shape[1])
            b = th.empty_like(layer.bias).uniform_(-bound, bound)
        else:  # SB3's ActorCriticPolicy: orthogonal with the layer's gain, zero bias
            nn.init.orthogonal_(w, gain=PPO_GAINS.get(name, math.sqrt(2)))
            b = th.zeros_like(layer.bias)
        fresh[f"{name}.weight"], fresh[f"{name}.bias"] = w, b
    return fresh


@pytest.mark.parametrize("algo", ["dqn", "ppo"])
def test_shrink_perturb_identity_is_bit_exact(algo):
    agent = make(algo)
    nets = [agent.online_network()] + ([agent.q_net_target] if algo == "dqn" else [])
    before, adam = [params_of(n) for n in nets], adam_state(agent)
    ShrinkPerturb(ShrinkPerturb.Params(alpha=1.0, sigma=0.0)).on_task_switch(agent, SWITCH)
    for net, old in zip(nets, before):
        assert all(th.equal(p, old[n]) for n, p in params_of(net).items())
    assert adam_state(agent).keys() == adam.keys()
    assert agent.logger.name_to_value["interventions/shrink_perturb/fired"] == 1


@pytest.mark.parametrize("algo", ["dqn", "ppo"])
def test_shrink_perturb_matches_the_formula(algo):
    agent = make(algo)
    iv = ShrinkPerturb()
    assert (iv.params.alpha, iv.params.sigma, iv.params.at) == (0.8, 0.2, "task_switch")
    online = params_of(agent.online_network())
    target = params_of(agent.q_net_target) if algo == "dqn" else None
    adam = adam_state(agent)
    th.manual_seed(1234)
    iv.on_task_switch(agent, SWITCH)

    fresh = expected_fresh(agent, 1234)
    assert fresh.keys() == online.keys()
    for name, p in params_of(agent.online_network()).items():
        assert th.allclose(p, 0.8 * online[name] + 0.2 * fresh[name], rtol=1e-6, atol=1e-7), name
        assert not th.allclose(p, online[name])
    if target is not None:  # the same transformation, with the same fresh draw
        for name, p in params_of(agent.q_net_target).items():
            assert th.allclose(p, 0.8 * target[name] + 0.2 * fresh[name], rtol=1e-6, atol=1e-7), name
    # The optimizer state is kept as it was.
    adam_after = adam_state(agent)
    assert adam_after.keys() == adam.keys()
    assert all(th.equal(s[k], adam[n][k]) for n, s in adam_after.items() for k in s)
    assert agent.logger.name_to_value["interventions/shrink_perturb/params"] == sum(t.numel() for t in online.values())


def test_soft_shrink_perturb_fires_after_every_update():
    params = ShrinkPerturb.Params(soft=True)
    assert (params.alpha, params.sigma, params.at, params.every) == (0.999999, 1e-6, "every", 1)
    assert ShrinkPerturb.Params(soft=True, every=10, sigma=0.0).model_dump() == dict(
        soft=True, alpha=0.999999, sigma=0.0, at="every", every=10
    )

    # Soft mode with visible alpha/sigma and learning rate 0, so that each update changes the weights by
    # exactly one shrink-and-perturb step.
    iv = ShrinkPerturb(ShrinkPerturb.Params(soft=True, alpha=0.5, sigma=0.1))
    recorder = FiredRecorder(iv)
    agent = dqn([iv, recorder], steps=32 + 3, learning_rate=0.0)
    assert recorder.seen == [(1, 1), (2, 2), (3, 3)]
    before = params_of(agent.q_net)
    th.manual_seed(99)
    agent.train(gradient_steps=1, batch_size=16)
    fresh = expected_fresh(agent, 99)
    for name, p in params_of(agent.q_net).items():
        assert th.allclose(p, 0.5 * before[name] + 0.1 * fresh[name], rtol=1e-6, atol=1e-7), name
    iv.on_task_switch(agent, SWITCH)
    assert iv.fired == 4  # at=every: a task switch does not fire


# -- plasticity injection ------------------------------------------------------------------------------
def minatar_dqn(interventions=(), steps: int = 64, **kw) -> PlasticDQN:
    """A MinAtar DQN (conv encoder, head Linear(1024, 32) -> ReLU -> Linear(32, 6)) that has trained a little."""
    agent = PlasticDQN(
        POLICIES["dqn"],
        make_sequence("continual_minatar", switch_every=500),
        policy_kwargs=minatar_policy_kwargs("dqn", width=32),
        interventions=list(interventions),
        **{**DQN_KW, "target_update_interval": 10_000, **kw},
    )
    return agent.learn(steps)


def injection_agent(kind: str, interventions=()):
    if kind == "dqn_minatar":
        return minatar_dqn(interventions)
    return make(kind, interventions)


def linears(module: nn.Module) -> list[nn.Linear]:
    return [m for m in module.modules() if isinstance(m, nn.Linear)]


@pytest.mark.parametrize("kind", ["dqn", "dqn_minatar", "ppo"])
def test_injection_keeps_outputs_and_injects_into_the_whole_mlp_head(kind):
    iv = PlasticityInjection()
    agent = injection_agent(kind, [iv])
    obs = th.as_tensor(agent.replay_buffer.sample(64).observations if kind.startswith("dqn") else th.randn(64, 4))
    heads_before = {
        name: [(m.weight.detach().clone(), m.bias.detach().clone()) for m in linears(head)]
        for name, head in agent.mlp_heads().items()
    }
    head_params = {id(p) for head in agent.mlp_heads().values() for p in head.parameters()}
    encoder = {n: p.detach().clone() for n, p in agent.online_network().named_parameters() if id(p) not in head_params}
    groups = [list(g["params"]) for g in agent.optimizer.param_groups]
    encoder_adam = adam_state(agent)
    before = outputs(agent, obs)
    iv.on_task_switch(agent, SWITCH)

    # The function is the same, bit for bit (DQN's target network aside: its head is synced, below).
    after = outputs(agent, obs)
    assert th.equal(before[0], after[0]) and (kind.startswith("dqn") or th.equal(before[1], after[1]))
    heads = agent.mlp_heads()
    assert set(heads) == set(heads_before) and all(isinstance(h, InjectedHead) for h in heads.values())
    widths = {"dqn": [4, 32, 32], "dqn_minatar": [1024, 32], "ppo": [4, 32, 32]}[kind]
    for name, head in heads.items():
        # The trainable head is the whole MLP: every hidden layer and the output layer, all trainable.
        new = linears(head.new)
        assert [m.in_features for m in new] == widths and all(p.requires_grad for p in head.new.parameters())
        assert linears(head.old) == linears(head.new_0) == []  # the frozen parts have buffers, no parameters
        # old is the head as it was; new is a fresh draw of the head's own initialiser; new_0 is new.
        old = [m for m in head.old.modules() if isinstance(m, FrozenLinear)]
        copy_ = [m for m in head.new_0.modules() if isinstance(m, FrozenLinear)]
        for (w, b), o, n, c in zip(heads_before[name], old, new, copy_, strict=True):
            assert th.equal(o.weight, w) and th.equal(o.bias, b)
            assert th.equal(c.weight, n.weight) and th.equal(c.bias, n.bias)
            assert not th.allclose(n.weight, w)
        if kind == "ppo":  # SB3's orthogonal init: gain sqrt(2) in the hidden layers, the head's gain at the end
            gains = [math.sqrt(2)] * (len(new) - 1) + [PPO_GAINS[name]]
            for m, gain in zip(new, gains):
                th.testing.assert_close(
                    th.linalg.svdvals(m.weight), th.full((min(m.weight.shape),), gain), rtol=1e-5, atol=1e-6
                )
                assert th.all(m.bias == 0)
        else:  # PyTorch's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
            assert all(m.weight.abs().max() <= 1 / math.sqrt(m.in_features) for m in new)
    # Same parameter objects in the same optimizer places; the heads' Adam state is gone, the encoder's kept.
    assert [list(g["params"]) for g in agent.optimizer.param_groups] == groups
    assert not any(p in agent.optimizer.state for head in heads.values() for p in head.new.parameters())
    kept = adam_state(agent)
    assert set(kept) == set(encoder)
    assert all(th.equal(v, encoder_adam[n][k]) for n, state in kept.items() for k, v in state.items())
    logged = agent.logger.name_to_value
    assert logged["interventions/plasticity_injection/heads"] == len(heads)
    assert logged["interventions/plasticity_injection/params"] == sum(
        p.numel() for head in heads.values() for p in head.new.parameters()
    )

    frozen = {name: {k: v.clone() for k, v in head.named_buffers()} for name, head in heads.items()}
    net_before = params_of(agent.online_network())
    agent.learn(64, reset_num_timesteps=False)
    # Every parameter trains: the encoder and the new heads. The frozen heads do not move.
    net_after = params_of(agent.online_network())
    assert changed_layers(net_before, net_after) == {layer_of(n) for n in net_after}
    for name, head in agent.mlp_heads().items():
        assert all(th.equal(v, frozen[name][k]) for k, v in head.named_buffers()), name
    assert all(th.isfinite(p).all() for p in net_after.values())


def test_injection_with_layer_norm_and_crelu():
    from agents import CReLU
    from rl_plasticity.interventions.plasticity_injection import FrozenLayerNorm

    iv = PlasticityInjection()
    agent = PlasticDQN(
        POLICIES["dqn"],
        "CartPole-v1",
        interventions=[iv],
        policy_kwargs=dict(net_arch=[32], layer_norm=True, activation_fn=CReLU),
        **DQN_KW,
    ).learn(64)
    norm = agent.q_net.q_net[1]
    with th.no_grad():  # a trained-looking LayerNorm
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    trained = (norm.weight.detach().clone(), norm.bias.detach().clone())
    obs = th.randn(32, 4)
    before = outputs(agent, obs)[0]
    iv.on_task_switch(agent, SWITCH)
    head = agent.q_net.q_net
    assert th.equal(outputs(agent, obs)[0], before)
    frozen_norm = head.old[1]
    assert isinstance(frozen_norm, FrozenLayerNorm) and th.equal(frozen_norm.weight, trained[0])
    assert th.equal(frozen_norm.bias, trained[1])
    assert th.all(head.new[1].weight == 1) and th.all(head.new[1].bias == 0)  # PyTorch's LayerNorm init
    assert agent.value_features(obs).shape == (32, 3 * 32)  # CReLU keeps the width


def head_adam_reset_run(agent, params: list[nn.Parameter], steps: int) -> None:
    forget_optimizer_state(agent.optimizer, params)
    np.random.seed(7)  # SB3 samples the replay buffer with NumPy's global RNG
    agent.train(gradient_steps=steps, batch_size=16)


def test_injection_is_not_an_adam_reset_of_the_head():
    # A linear head plus new - new_0 is the same linear map with the same gradient: injecting into the last
    # layer only equals training on with that layer's Adam state cleared. Into the MLP head it does not.
    obs = None
    runs = {}
    for arm in ("injection", "last_layer_adam_reset", "head_adam_reset", "head_adam_reset_again"):
        agent = minatar_dqn(learning_rate=1e-3)
        # One target for every arm: injection syncs the target's head, which alone moves the TD targets (a
        # last-layer Adam reset plus that sync would otherwise pass the test).
        agent.q_net_target.load_state_dict(agent.q_net.state_dict())
        obs = agent.replay_buffer.sample(128, env=None).observations if obs is None else obs
        if arm == "injection":
            PlasticityInjection().inject(agent)
            head_adam_reset_run(agent, [], steps=100)
        else:
            head = agent.q_net.q_net
            params = list(head[-1].parameters()) if arm == "last_layer_adam_reset" else list(head.parameters())
            head_adam_reset_run(agent, params, steps=100)
        with th.no_grad():
            runs[arm] = agent.q_net(obs)
    scale = float(runs["head_adam_reset"].abs().max())
    assert th.equal(runs["head_adam_reset"], runs["head_adam_reset_again"])  # the runs are deterministic
    for arm in ("last_layer_adam_reset", "head_adam_reset"):
        assert float((runs["injection"] - runs[arm]).abs().max()) > 0.05 * scale, arm


def test_injection_encoder_keeps_training_with_the_same_gradient_at_injection():
    iv = PlasticityInjection()
    agent = minatar_dqn([iv])
    # A target equal to the online network: its head sync at injection leaves the TD targets as they are.
    agent.q_net_target.load_state_dict(agent.q_net.state_dict())
    batch = agent.replay_buffer.sample(32)
    encoder = list(agent.q_net.features_extractor.parameters())

    def encoder_grads() -> list[th.Tensor]:
        return list(th.autograd.grad(agent.training_loss(batch)[0], encoder))

    before = encoder_grads()
    iv.on_task_switch(agent, SWITCH)
    # The gradient reaches the encoder through all three heads; new and new_0 cancel, old is the old head.
    for a, b in zip(before, encoder_grads()):
        th.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * float(a.abs().max()))
    loss = agent.training_loss(batch)[0]
    head = agent.q_net.q_net
    grads = th.autograd.grad(loss, list(head.new.parameters()))
    assert all(float(g.abs().max()) > 0 for g in grads)
    assert list(head.old.parameters()) == list(head.new_0.parameters()) == []


def test_injection_dqn_target_network():
    iv = PlasticityInjection()
    agent = minatar_dqn([iv])
    agent.q_net_target.load_state_dict(agent.q_net.state_dict())
    agent.train(gradient_steps=5, batch_size=16)  # the target now lags
    obs = agent.replay_buffer.sample(64).observations
    target_encoder = params_of(agent.q_net_target.features_extractor)
    iv.on_task_switch(agent, SWITCH)

    online, target = agent.q_net.q_net, agent.q_net_target.q_net
    assert isinstance(target, InjectedHead) and not target.training
    # Same structure, so SB3's polyak_update zips matching parameters.
    assert [n for n, _ in agent.q_net.named_parameters()] == [n for n, _ in agent.q_net_target.named_parameters()]
    # The frozen parts are the online network's; the trainable head is synced at injection; the encoder lags.
    assert all(th.equal(a, b) for a, b in zip(online.buffers(), target.buffers()))
    assert all(th.equal(a, b) for a, b in zip(online.new.parameters(), target.new.parameters()))
    assert all(th.equal(p, target_encoder[n]) for n, p in params_of(agent.q_net_target.features_extractor).items())
    with th.no_grad():
        q_target = agent.q_net_target(obs)
        expected = online(agent.q_net_target.extract_features(obs, agent.q_net_target.features_extractor))
    assert th.equal(q_target, expected)

    agent.train(gradient_steps=4, batch_size=16)
    online_new, target_new = params_of(online.new), params_of(target.new)
    # SB3's own target update (DQN._on_step), first soft, then hard.
    agent.tau, agent.target_update_interval = 0.5, 1
    agent._on_step()
    for name, p in params_of(target.new).items():
        th.testing.assert_close(p, 0.5 * target_new[name] + 0.5 * online_new[name])
    assert all(th.equal(a, b) for a, b in zip(online.buffers(), target.buffers()))  # constants, not synced
    agent.tau = 1.0
    agent._on_step()
    a, b = outputs(agent, obs)
    assert th.equal(a, b)


@pytest.mark.parametrize("algo", ["dqn", "ppo"])
def test_injection_value_features_are_the_three_hidden_layers_side_by_side(algo):
    from rl_plasticity.probing import probe_batch

    iv = PlasticityInjection()
    agent = make(algo, [iv])
    iv.on_task_switch(agent, SWITCH)
    agent.learn(64, reset_num_timesteps=False)
    obs = th.randn(16, 4)
    head = agent.q_net.q_net if algo == "dqn" else agent.policy.value_net
    with th.no_grad():
        features = agent.value_features(obs)
        value = agent.q_net(obs) if algo == "dqn" else agent.policy.predict_values(obs)
        # Oracle: the input of each head's last Linear, by running that head's own modules up to it.
        encoded = agent.q_net.extract_features(obs, agent.q_net.features_extractor) if algo == "dqn" else obs
        blocks = []
        for part in (head.old, head.new, head.new_0):
            z = encoded
            for module in list(part)[:-1]:
                z = module(z)
            blocks.append(z)
    assert features.shape == (16, 3 * 32)
    assert th.equal(features, th.cat(blocks, dim=1))
    value_head = agent.value_head
    th.testing.assert_close(value_head(features), value, rtol=1e-5, atol=1e-6)
    # One linear map: [W_old | W_new | -W_new_0], b_old + b_new - b_new_0.
    lasts = [list(part)[-1] for part in (head.old, head.new, head.new_0)]
    th.testing.assert_close(value_head.weight, th.cat([lasts[0].weight, lasts[1].weight, -lasts[2].weight], dim=1))
    th.testing.assert_close(value_head.bias, lasts[0].bias + lasts[1].bias - lasts[2].bias)
    th.testing.assert_close(features @ value_head.weight.T + value_head.bias, value, rtol=1e-5, atol=1e-6)
    assert agent.head_layers()[-1] is lasts[1]  # reset's "head": the trainable output layer
    # The monitor's probes run on them.
    batch = agent.replay_buffer.sample(32) if algo == "dqn" else next(agent.rollout_buffer.get(32))
    result = probe_batch(agent, batch, ["rank", "dormant", "collapse", "kfac"])
    assert 1 <= result.scalars["erank/value_head"] <= 96
    assert any(key.startswith("kfac_erank_g/") and ".new." in key for key in result.scalars)


def test_injection_count_and_repeated_injection():
    once = PlasticityInjection()
    agent = dqn([once])
    once.on_task_switch(agent, SWITCH)
    head = agent.q_net.q_net
    once.on_task_switch(agent, SWITCH)
    assert once.fired == 1 and agent.q_net.q_net is head  # max_injections=1: the second switch does nothing

    twice = PlasticityInjection(PlasticityInjection.Params(max_injections=2))
    agent = dqn([twice])
    obs = th.randn(32, 4)
    twice.on_task_switch(agent, SWITCH)
    trainable = list(agent.q_net.q_net.new.parameters())
    agent.train(gradient_steps=3, batch_size=16)
    before = outputs(agent, obs)
    with th.no_grad():
        first = agent.q_net.q_net(obs)  # CartPole's encoder is a flatten
    twice.on_task_switch(agent, SWITCH)
    head = agent.q_net.q_net
    # The second injection freezes the whole injected head; the same parameters train on, re-initialised.
    assert twice.fired == 2 and injection_depth(head) == 2 and isinstance(head.old, InjectedHead)
    assert list(head.new.parameters()) == trainable and list(head.old.parameters()) == []
    with th.no_grad():
        assert th.equal(head.old(obs), first)
    assert th.equal(before[0], outputs(agent, obs)[0])
    assert agent.value_features(obs).shape == (32, 5 * 32)  # old's three hidden layers, new's, new_0's


@pytest.mark.parametrize("injections", [1, 2])
def test_injection_resume(tmp_path, injections):
    params = PlasticityInjection.Params(max_injections=injections)
    iv = PlasticityInjection(params)
    agent = dqn([iv])
    for _ in range(injections):
        iv.on_task_switch(agent, SWITCH)
        agent.train(gradient_steps=3, batch_size=16)
    agent.save(tmp_path / "model.zip")
    state = iv.state_dict()
    assert state == {"fired": injections}

    # State loaded before the agent is built: attach() rebuilds the structure, SB3 loads into it.
    resumed_iv = PlasticityInjection(params)
    resumed_iv.load_state_dict(state)
    resumed = PlasticDQN.load(tmp_path / "model.zip", interventions=[resumed_iv], device="cpu")
    assert injection_depth(resumed.q_net.q_net) == injection_depth(resumed.q_net_target.q_net) == injections
    obs = th.randn(16, 4)
    for a, b in zip(outputs(agent, obs), outputs(resumed, obs)):
        assert th.equal(a, b)
    saved_moment = agent.optimizer.state[agent.head_layers()[0].weight]["exp_avg"]
    assert th.equal(resumed.optimizer.state[resumed.head_layers()[0].weight]["exp_avg"], saved_moment)
    resumed.set_logger(configure(str(tmp_path), ["csv"]))
    resumed_iv.on_task_switch(resumed, SWITCH)
    assert resumed_iv.fired == injections  # the injections were done before the checkpoint

    # State loaded into an intervention that is already attached: same rebuild.
    late = PlasticityInjection(params)
    fresh = PlasticDQN(
        "MlpPolicy", "CartPole-v1", policy_kwargs=dict(net_arch=[32, 32]), interventions=[late], **DQN_KW
    )
    late.load_state_dict(state)
    fresh.policy.load_state_dict(agent.policy.state_dict())
    fresh.optimizer.load_state_dict(agent.optimizer.state_dict())
    for a, b in zip(outputs(agent, obs), outputs(fresh, obs)):
        assert th.equal(a, b)


def test_injection_then_redo_recycles_units_of_the_new_head_only():
    from rl_plasticity.interventions.surgery import trace_hidden_layers

    iv = PlasticityInjection()
    agent = minatar_dqn([iv])
    iv.on_task_switch(agent, SWITCH)
    with pytest.warns(UserWarning, match="features_extractor.cnn.0 is not recycled"):
        hidden, _ = trace_hidden_layers(agent, agent.replay_buffer.sample(32))
    # The conv feeds the frozen heads too, so its units cannot be silenced; the new head's hidden layer can.
    assert [(h.name, h.outgoing) for h in hidden] == [("q_net.new.0", (agent.q_net.q_net.new[2],))]


# -- registry ------------------------------------------------------------------------------------------------
def test_registered_with_config_params():
    for name in ("reset", "shrink_perturb", "plasticity_injection"):
        assert INTERVENTIONS[name].algos == ("dqn", "ppo")
    reset, sp, pi = build_interventions(
        ["reset", "shrink_perturb", "plasticity_injection"],
        {"reset": {"layers": "last_k", "k": 2, "at": "every", "every": 5}, "shrink_perturb": {"soft": True}},
    )
    assert (reset.params.layers, reset.params.k, reset.params.at, reset.params.every) == ("last_k", 2, "every", 5)
    assert (sp.params.alpha, sp.params.at) == (0.999999, "every")
    assert pi.params.max_injections == 1
    with pytest.raises(ValueError):
        build_interventions(["reset"], {"reset": {"layer": "all"}})
    assert INTERVENTIONS["shrink_perturb"].defaults()["sigma"] == 0.2  # what `rlp list` shows


def test_fresh_parameters_use_the_ppo_head_gains():
    # PPO's initialiser picks the gain by where the layer sits (0.01 action head, 1 value head, sqrt 2 below).
    from stable_baselines3.common.env_util import make_vec_env

    from rl_plasticity.interventions.surgery import fresh_parameters

    agent = PlasticPPO(
        "MlpPolicy", make_vec_env("CartPole-v1", n_envs=1), policy_kwargs=dict(net_arch=[64, 64]), device="cpu", seed=0
    )
    before = {k: v.clone() for k, v in agent.policy.state_dict().items()}
    for layer, gain in [(agent.policy.action_net, 0.01), (agent.policy.value_net, 1.0)]:
        weight = fresh_parameters(agent, layer)["weight"]
        # Orthogonal rows times the gain: every singular value equals the gain.
        th.testing.assert_close(th.linalg.svdvals(weight), th.full((weight.shape[0],), gain), rtol=1e-5, atol=1e-6)
    for key, value in agent.policy.state_dict().items():
        assert th.equal(value, before[key]), key  # the live layers are left as they were


@pytest.mark.parametrize(
    "layers, k, reset_norms", [("all", 1, {"q_net.1", "q_net.4"}), ("last_k", 2, {"q_net.4"}), ("head", 1, set())]
)
def test_reset_also_resets_the_layer_norm_of_a_reset_layer(layers, k, reset_norms):
    # Linear -> LayerNorm -> ReLU per hidden layer: q_net.0, .1 (norm), .2 | q_net.3, .4 (norm), .5 | head q_net.6
    agent = PlasticDQN(
        POLICIES["dqn"], "CartPole-v1", policy_kwargs=dict(net_arch=[32, 32], layer_norm=True), **DQN_KW
    ).learn(64)
    net = agent.online_network()
    norms = {name: m for name, m in net.named_modules() if isinstance(m, nn.LayerNorm)}
    assert set(norms) == {"q_net.1", "q_net.4"}
    with th.no_grad():  # trained-looking affine maps, also in the target network
        for m in [*norms.values(), *(m for m in agent.q_net_target.modules() if isinstance(m, nn.LayerNorm))]:
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.5, 0.5)
    before, adam = params_of(net), adam_state(agent)
    Reset(Reset.Params(layers=layers, k=k)).on_task_switch(agent, SWITCH)
    after, adam_after, target = params_of(net), adam_state(agent), dict(agent.q_net_target.named_modules())
    for name, norm in norms.items():
        if name in reset_norms:
            assert th.equal(norm.weight, th.ones(32)) and th.equal(norm.bias, th.zeros(32)), name
            assert f"{name}.weight" not in adam_after and f"{name}.weight" in adam
            assert th.equal(target[name].weight, th.ones(32)), name
        else:
            assert th.equal(after[f"{name}.weight"], before[f"{name}.weight"]), name
            assert not th.equal(target[name].weight, th.ones(32)), name
    touched = sum(p.numel() for n, p in after.items() if layer_of(n) in reset_norms) + sum(
        p.numel() for n, p in after.items() if not th.equal(p, before[n]) and layer_of(n) not in reset_norms
    )
    assert agent.logger.name_to_value["interventions/reset/params"] == touched
