"""The reset family: ``reset``, ``shrink_perturb`` and ``plasticity_injection`` on PlasticDQN and PlasticPPO.

Expected values are computed independently of the interventions: PyTorch's default init bounds, SB3's
orthogonal gains, the shrink-and-perturb formula with the fresh draw reproduced from the same RNG state,
and the stored tensors from before each firing.
"""

from __future__ import annotations

import math

import pytest
import torch as th
from stable_baselines3.common.logger import configure
from torch import nn

from agents import POLICIES, Intervention, PlasticDQN, PlasticPPO, TaskSwitch
from rl_plasticity.interventions import INTERVENTIONS, build_interventions
from rl_plasticity.interventions.plasticity_injection import InjectedLinear, PlasticityInjection
from rl_plasticity.interventions.reset import Reset
from rl_plasticity.interventions.shrink_perturb import ShrinkPerturb

SWITCH = TaskSwitch(num_timesteps=0, from_task=0, to_task=1, from_name="a")
DQN_KW = dict(learning_starts=32, batch_size=16, train_freq=1, buffer_size=1_000, target_update_interval=10_000,
              device="cpu", seed=0)
PPO_KW = dict(n_steps=64, batch_size=32, n_epochs=2, device="cpu", seed=0)
PPO_GAINS = {"action_net": 0.01, "value_net": 1.0}


def dqn(interventions=(), width: int = 32, depth: int = 2, steps: int = 64, **kw) -> PlasticDQN:
    """A DQN whose weights, target network and Adam state have moved away from the initialisation."""
    kw = {**DQN_KW, **kw}
    agent = PlasticDQN("MlpPolicy", "CartPole-v1", policy_kwargs=dict(net_arch=[width] * depth),
                       interventions=list(interventions), **kw)
    return agent.learn(steps)


def ppo(interventions=(), steps: int = 64, **kw) -> PlasticPPO:
    agent = PlasticPPO("MlpPolicy", "CartPole-v1", policy_kwargs=dict(net_arch=[32, 32]),
                       interventions=list(interventions), **{**PPO_KW, **kw})
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
        ("ppo", "all", 1, {"mlp_extractor.policy_net.0", "mlp_extractor.policy_net.2", "mlp_extractor.value_net.0",
                           "mlp_extractor.value_net.2", "action_net", "value_net"}),
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
        PlasticDQN("MlpPolicy", "CartPole-v1", policy_kwargs=dict(net_arch=[32, 32]),
                   interventions=[Reset(Reset.Params(layers="last_k", k=4))], device="cpu")


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
        soft=True, alpha=0.999999, sigma=0.0, at="every", every=10)

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
def heads(agent) -> dict[str, nn.Module]:
    names = {id(m): n for n, m in agent.online_network().named_modules()}
    return {names[id(h)]: h for h in agent.head_layers()}


@pytest.mark.parametrize("algo", ["dqn", "ppo"])
def test_injection_keeps_outputs_and_only_the_new_head_learns(algo):
    iv = PlasticityInjection()
    agent = make(algo, [iv])
    obs = th.randn(64, 4)
    old_heads = {name: (h.weight.detach().clone(), h.bias.detach().clone()) for name, h in heads(agent).items()}
    old_params = [p for h in heads(agent).values() for p in h.parameters()]
    group = list(agent.optimizer.param_groups[0]["params"])
    before = outputs(agent, obs)
    iv.on_task_switch(agent, SWITCH)

    for old, new in zip(before, outputs(agent, obs)):
        assert th.allclose(old, new, atol=1e-6)
    injected = heads(agent)
    assert set(injected) == set(old_heads) and all(isinstance(h, InjectedLinear) for h in injected.values())
    # The new heads took the old ones' places in the optimizer, with no state yet.
    new_params = [p for h in injected.values() for p in h.new.parameters()]
    swap = dict(zip(map(id, old_params), new_params))
    assert agent.optimizer.param_groups[0]["params"] == [swap.get(id(p), p) for p in group]
    assert not any(p in agent.optimizer.state for p in old_params + new_params)
    for name, h in injected.items():
        assert th.equal(h.frozen_weight, old_heads[name][0]) and th.equal(h.frozen_bias, old_heads[name][1])
        assert th.equal(h.copy_weight, h.new.weight) and th.equal(h.copy_bias, h.new.bias)
        # The new head is a fresh draw of the head's own initialiser.
        if algo == "ppo":
            gain = PPO_GAINS[name]
            assert th.allclose(h.new.weight @ h.new.weight.T, gain**2 * th.eye(h.out_features), atol=1e-6 * gain**2)
        else:
            assert h.new.weight.abs().max() <= 1 / math.sqrt(h.in_features)
    logged = agent.logger.name_to_value
    assert logged["interventions/plasticity_injection/heads"] == len(injected)
    assert logged["interventions/plasticity_injection/params"] == sum(p.numel() for p in new_params)

    frozen = {name: {k: v.clone() for k, v in h.named_buffers()} for name, h in injected.items()}
    net_before = params_of(agent.online_network())
    agent.learn(64, reset_num_timesteps=False)  # a few gradient steps, across the new structure

    net_after = params_of(agent.online_network())
    assert changed_layers(net_before, net_after) == {layer_of(n) for n in net_after}  # new heads and below
    for name, h in heads(agent).items():
        assert all(th.equal(v, frozen[name][k]) for k, v in h.named_buffers()), name
    assert all(th.isfinite(p).all() for p in net_after.values())


def test_injection_dqn_target_network():
    iv = PlasticityInjection()
    agent = dqn([iv])
    obs = th.randn(64, 4)
    online_before = agent.value_head.weight.detach().clone()
    target_before = agent.q_net_target.q_net[-1].weight.detach().clone()
    assert not th.allclose(online_before, target_before)
    iv.on_task_switch(agent, SWITCH)

    online, target = agent.value_head, agent.q_net_target.q_net[-1]
    assert isinstance(target, InjectedLinear)
    # Same structure: SB3's polyak_update zips these two lists.
    assert [n for n, _ in agent.q_net.named_parameters()] == [n for n, _ in agent.q_net_target.named_parameters()]
    assert all(th.equal(a, b) for a, b in zip(online.buffers(), target.buffers()))
    assert th.allclose(target.weight, target_before, atol=1e-7)

    agent.train(gradient_steps=4, batch_size=16)
    online_eff, target_eff = online.weight.detach().clone(), target.weight.detach().clone()
    # SB3's own target update (DQN._on_step), first soft, then hard.
    agent.tau, agent.target_update_interval = 0.5, 1
    agent._on_step()
    assert th.allclose(target.weight, 0.5 * target_eff + 0.5 * online_eff, atol=1e-7)
    assert all(th.equal(f, o) for f, o in zip(target.buffers(), online.buffers()))  # constants, not synced
    agent.tau = 1.0
    agent._on_step()
    assert th.equal(target.weight, online.weight)
    a, b = outputs(agent, obs)
    assert th.equal(a, b)


def test_injection_value_head_is_the_effective_linear_map_and_learn_continues():
    iv = PlasticityInjection()
    agent = dqn([iv])
    iv.on_task_switch(agent, SWITCH)
    agent.learn(64, reset_num_timesteps=False)
    obs = th.randn(16, 4)
    features = agent.value_features(obs)
    head = agent.value_head
    assert th.allclose(head(features), features @ head.weight.T + head.bias, atol=1e-6)
    assert th.allclose(head(features), agent.q_net(obs), atol=1e-6)
    assert agent.head_layers() == [head]


def test_injection_count_and_repeated_injection():
    once = PlasticityInjection()
    agent = dqn([once])
    once.on_task_switch(agent, SWITCH)
    head = agent.value_head
    once.on_task_switch(agent, SWITCH)
    assert once.fired == 1 and agent.value_head is head  # max_injections=1: the second switch does nothing

    twice = PlasticityInjection(PlasticityInjection.Params(max_injections=2))
    agent = dqn([twice])
    obs = th.randn(32, 4)
    twice.on_task_switch(agent, SWITCH)
    agent.train(gradient_steps=3, batch_size=16)
    effective = agent.value_head.weight.detach().clone()
    before = outputs(agent, obs)
    twice.on_task_switch(agent, SWITCH)
    head = agent.value_head
    # The second injection freezes the effective head: one level deep, output unchanged.
    assert twice.fired == 2 and th.equal(head.frozen_weight, effective) and not isinstance(head.new, InjectedLinear)
    for old, new in zip(before, outputs(agent, obs)):
        assert th.allclose(old, new, atol=1e-6)


def test_injection_resume(tmp_path):
    iv = PlasticityInjection()
    agent = dqn([iv])
    iv.on_task_switch(agent, SWITCH)
    agent.train(gradient_steps=3, batch_size=16)
    agent.save(tmp_path / "model.zip")
    state = iv.state_dict()
    assert state == {"fired": 1}

    # State loaded before the agent is built: attach() rebuilds the structure, SB3 loads into it.
    resumed_iv = PlasticityInjection()
    resumed_iv.load_state_dict(state)
    resumed = PlasticDQN.load(tmp_path / "model.zip", interventions=[resumed_iv], device="cpu")
    obs = th.randn(16, 4)
    for a, b in zip(outputs(agent, obs), outputs(resumed, obs)):
        assert th.equal(a, b)
    saved_moment = agent.optimizer.state[agent.value_head.new.weight]["exp_avg"]
    assert th.equal(resumed.optimizer.state[resumed.value_head.new.weight]["exp_avg"], saved_moment)
    resumed.set_logger(configure(str(tmp_path), ["csv"]))
    resumed_iv.on_task_switch(resumed, SWITCH)
    assert resumed_iv.fired == 1  # the one injection was done before the checkpoint

    # State loaded into an intervention that is already attached: same rebuild.
    late = PlasticityInjection()
    fresh = PlasticDQN("MlpPolicy", "CartPole-v1", policy_kwargs=dict(net_arch=[32, 32]), interventions=[late],
                       **DQN_KW)
    late.load_state_dict(state)
    fresh.policy.load_state_dict(agent.policy.state_dict())
    fresh.optimizer.load_state_dict(agent.optimizer.state_dict())
    for a, b in zip(outputs(agent, obs), outputs(fresh, obs)):
        assert th.equal(a, b)


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

    agent = PlasticPPO("MlpPolicy", make_vec_env("CartPole-v1", n_envs=1), policy_kwargs=dict(net_arch=[64, 64]),
                       device="cpu", seed=0)
    before = {k: v.clone() for k, v in agent.policy.state_dict().items()}
    for layer, gain in [(agent.policy.action_net, 0.01), (agent.policy.value_net, 1.0)]:
        weight = fresh_parameters(agent, layer)["weight"]
        # Orthogonal rows times the gain: every singular value equals the gain.
        th.testing.assert_close(th.linalg.svdvals(weight), th.full((weight.shape[0],), gain), rtol=1e-5, atol=1e-6)
    for key, value in agent.policy.state_dict().items():
        assert th.equal(value, before[key]), key  # the live layers are left as they were


@pytest.mark.parametrize("layers, k, reset_norms", [("all", 1, {"q_net.1", "q_net.4"}), ("last_k", 2, {"q_net.4"}),
                                                    ("head", 1, set())])
def test_reset_also_resets_the_layer_norm_of_a_reset_layer(layers, k, reset_norms):
    # Linear -> LayerNorm -> ReLU per hidden layer: q_net.0, .1 (norm), .2 | q_net.3, .4 (norm), .5 | head q_net.6
    agent = PlasticDQN(POLICIES["dqn"], "CartPole-v1", policy_kwargs=dict(net_arch=[32, 32], layer_norm=True),
                       **DQN_KW).learn(64)
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
        p.numel() for n, p in after.items() if not th.equal(p, before[n]) and layer_of(n) not in reset_norms)
    assert agent.logger.name_to_value["interventions/reset/params"] == touched
