"""Regularizer interventions: l2, l2_init, l2_er, kfac_rank, nc_reg.

Each term is checked against an analytic gradient or an independent computation (the probe functions of
``rl_plasticity.probes``), and the separate ER steps of l2_er against a hand-made TD-then-ER chain.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch as th
from torch import nn

from agents import PlasticDQN, PlasticPPO, minatar_policy_kwargs
from envs import make_sequence
from rl_plasticity.interventions import INTERVENTIONS
from rl_plasticity.interventions import nc_reg as nc_reg_module
from rl_plasticity.interventions.kfac_rank import KFACRank, KFACRankParams
from rl_plasticity.interventions.l2 import (
    L2,
    L2Init,
    L2InitParams,
    L2Params,
    add_l2_gradient,
    l2_penalty,
    regularized_weights,
)
from rl_plasticity.interventions.l2_er import L2ER, L2ERParams
from rl_plasticity.interventions.nc_reg import NCReg, NCRegParams
from rl_plasticity.probes import (
    effective_rank,
    effective_rank_differentiable,
    kfac_factors,
    kfac_spectrum,
    neural_collapse,
)
from rl_plasticity.recording import activation_outputs

CARTPOLE = dict(policy_kwargs=dict(net_arch=[32, 32]), device="cpu")
DQN_KW = dict(learning_starts=100, batch_size=16, buffer_size=1_000, train_freq=1, **CARTPOLE)
PPO_KW = dict(n_steps=64, batch_size=32, n_epochs=2, **CARTPOLE)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: these networks are tiny, and other jobs share the two cores."""
    threads = th.get_num_threads()
    th.set_num_threads(1)
    yield
    th.set_num_threads(threads)


def cartpole_dqn(interventions: list, seed: int = 0) -> PlasticDQN:
    """A CartPole DQN with a filled replay buffer and a logger, not trained yet (learning_starts = 100)."""
    return PlasticDQN("MlpPolicy", "CartPole-v1", interventions=interventions, seed=seed, **DQN_KW).learn(100)


def cartpole_ppo(interventions: list, seed: int = 0, **kw) -> PlasticPPO:
    return PlasticPPO("MlpPolicy", "CartPole-v1", interventions=interventions, seed=seed, **{**PPO_KW, **kw})


def training_batch(agent):
    """A training batch as train() sees it (DQN: replay sample; PPO: a rollout minibatch)."""
    if isinstance(agent, PlasticDQN):
        return agent.replay_buffer.sample(16)
    return next(agent.rollout_buffer.get(32))


def param_grads(agent, loss: th.Tensor) -> dict[str, th.Tensor]:
    named = [(n, p) for n, p in agent.online_network().named_parameters() if p.requires_grad]
    grads = th.autograd.grad(loss, [p for _, p in named], retain_graph=True, allow_unused=True)
    return {n: th.zeros_like(p) if g is None else g for (n, p), g in zip(named, grads)}


def base_and_term_grads(agent, iv, term_name: str):
    """Gradients of the agent's own loss before and after the intervention's gradient hook adds its penalty
    (on the same batch and parameters), and the penalty value it logs."""
    batch = training_batch(agent)
    loss, _ = agent.training_loss(batch)
    base = param_grads(agent, loss)
    for name, p in agent.online_network().named_parameters():
        p.grad = base[name].clone()
    assert iv.gradient_terms(agent) == {}  # the value is not computed at every step ...
    with_term = {name: p.grad.clone() for name, p in agent.online_network().named_parameters()}
    return base, with_term, iv.logged_values(agent)[term_name].item()  # ... but when the logs are written


def layer_params(agent) -> dict[str, tuple[str, th.Tensor]]:
    """Parameter path -> (kind, parameter) for the Linear/Conv2d layers of the online network."""
    return {
        f"{name}.{kind}": (kind, getattr(layer, kind))
        for name, layer in agent.parametrized_layers()
        for kind in ("weight", "bias")
    }


def test_registered_for_both_agents():
    for name in ("l2", "l2_init", "l2_er", "kfac_rank", "nc_reg"):
        assert INTERVENTIONS[name].algos == ("dqn", "ppo")
    assert INTERVENTIONS["l2"].defaults() == {"coef": 1e-4, "include_biases": False}
    assert INTERVENTIONS["l2_init"].defaults()["coef"] == 1e-2
    assert INTERVENTIONS["l2_er"].defaults() == {"coef": 1e-4, "er_lr": None, "er_every": 1, "include_biases": False}
    assert INTERVENTIONS["kfac_rank"].defaults()["coef"] == 1e-3
    assert INTERVENTIONS["nc_reg"].defaults() == {"coef": 0.05, "clip": 200.0}


# -- l2 -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("algo", ["dqn", "ppo"])
@pytest.mark.parametrize("include_biases", [False, True])
def test_l2_gradient_is_coef_theta(algo, include_biases):
    coef = 0.1
    iv = L2(L2Params(coef=coef, include_biases=include_biases))
    agent = cartpole_dqn([iv]) if algo == "dqn" else cartpole_ppo([iv]).learn(64)
    base, with_term, value = base_and_term_grads(agent, iv, "l2")
    regularized = {name for name, (kind, _) in layer_params(agent).items() if kind == "weight" or include_biases}
    for name, p in agent.online_network().named_parameters():
        added = with_term[name] - base[name]
        expected = coef * p.detach() if name in regularized else th.zeros_like(p)
        assert th.allclose(added, expected, atol=1e-6), name
    params = dict(agent.online_network().named_parameters())
    assert value == pytest.approx(coef / 2 * sum(params[n].detach().pow(2).sum().item() for n in regularized), rel=1e-6)
    if algo == "dqn":  # the target network is never regularized
        target = {id(p) for p in agent.q_net_target.parameters()}
        assert not target & {id(p) for _, p in regularized_weights(agent, include_biases=True)}


def test_add_l2_gradient_sets_missing_gradients_and_checks_its_inputs():
    p, q = th.nn.Parameter(th.tensor([1.0, -2.0])), th.nn.Parameter(th.tensor([[3.0]]))
    q.grad = th.tensor([[0.5]])
    anchors = [th.tensor([0.5, 0.0]), th.tensor([[1.0]])]
    add_l2_gradient([p, q], 0.1, anchors)
    assert th.allclose(p.grad, th.tensor([0.05, -0.2])) and th.allclose(q.grad, th.tensor([[0.7]]))
    assert l2_penalty([p, q], 0.1, anchors).item() == pytest.approx(0.1 * (0.25 + 4.0 + 4.0) / 2)
    with pytest.raises(ValueError, match="1 anchors for 2 parameters"):
        add_l2_gradient([p, q], 0.1, anchors[:1])
    with pytest.raises(ValueError, match="no tensors"):
        add_l2_gradient([], 0.1)


# -- l2_init --------------------------------------------------------------------------------------------
def test_l2_init_gradient_pulls_towards_initial_weights():
    coef = 0.05
    iv = L2Init(L2InitParams(coef=coef))
    agent = cartpole_dqn([iv])
    theta_0 = {name: p.detach().clone() for name, (kind, p) in layer_params(agent).items()}
    with th.no_grad():  # move away from the initialisation, as training would
        for p in agent.q_net.parameters():
            p.add_(th.randn_like(p))
    base, with_term, value = base_and_term_grads(agent, iv, "l2_init")
    expected_value = 0.0
    for name, (kind, p) in layer_params(agent).items():
        expected = 2 * coef * (p.detach() - theta_0[name]) if kind == "weight" else th.zeros_like(p)
        assert th.allclose(with_term[name] - base[name], expected, atol=1e-6), name
        expected_value += coef * (p.detach() - theta_0[name]).pow(2).sum().item() if kind == "weight" else 0.0
    assert value == pytest.approx(expected_value, rel=1e-6)


def test_l2_init_state_dict_round_trip_keeps_the_original_theta_0():
    iv = L2Init()
    agent = cartpole_dqn([iv], seed=1)
    state = iv.state_dict()
    assert set(state["theta_0"]) == {n for n, (k, _) in layer_params(agent).items() if k == "weight"}
    original = {k: v.clone() for k, v in state["theta_0"].items()}
    agent.train(5, 16)  # theta_0 is a copy: training does not move it
    assert all(th.equal(iv.theta_0[k], original[k]) for k in original)

    # Loaded before the (new) agent attaches, and loaded into an attached one: both keep the original.
    early = L2Init()
    early.load_state_dict(copy.deepcopy(state))
    late = L2Init()
    PlasticDQN("MlpPolicy", "CartPole-v1", interventions=[early], seed=2, **DQN_KW)
    PlasticDQN("MlpPolicy", "CartPole-v1", interventions=[late], seed=2, **DQN_KW)
    assert not th.equal(late.theta_0["q_net.0.weight"], original["q_net.0.weight"])  # a different init
    late.load_state_dict(copy.deepcopy(state))
    for restored in (early, late):
        assert restored.fired == iv.fired
        for key, value in original.items():
            assert th.equal(restored.theta_0[key], value) and restored.theta_0[key].device == value.device


# -- l2_er ----------------------------------------------------------------------------------------------
def mean_hidden_erank(agent, obs: th.Tensor) -> float:
    with th.no_grad(), activation_outputs(agent.online_network()) as acts:
        agent.value_features(obs)
    return float(np.mean([effective_rank(h.reshape(h.shape[0], -1)) for h in acts.values()]))


def test_er_step_raises_the_effective_rank_of_low_rank_features():
    iv = L2ER(L2ERParams(er_lr=0.05))
    agent = cartpole_dqn([iv])
    gen = th.Generator().manual_seed(0)
    # Observations on a line (plus a little noise): the hidden features have a low effective rank.
    line = th.linspace(-1, 1, 64).unsqueeze(1) * th.tensor([[1.0, -0.5, 0.3, 0.8]])
    obs = line + 1e-3 * th.randn(64, 4, generator=gen)
    before = mean_hidden_erank(agent, obs)
    logged = iv.er_step(agent, obs)
    after = mean_hidden_erank(agent, obs)
    assert before < 5 and after > before + 0.01, (before, after)
    assert logged["er_loss"] == pytest.approx(-before, rel=1e-5)
    assert set(logged) == {"er_loss", "erank/q_net.1", "erank/q_net.3"}


def manual_er_step(agent, obs: th.Tensor, lr: float) -> None:
    """The ER step written out by hand for the CartPole MLP: -mean erank of each ReLU's output."""
    net = agent.q_net
    h = net.extract_features(obs, net.features_extractor)
    hidden = []
    for module in net.q_net[:-1]:
        h = module(h)
        if isinstance(module, nn.ReLU):
            hidden.append(h)
    er_loss = -th.stack([effective_rank_differentiable(x) for x in hidden]).mean()
    params = list(net.parameters())
    with th.no_grad():
        for p, g in zip(params, th.autograd.grad(er_loss, params, allow_unused=True)):
            if g is not None:
                p.sub_(lr * g)


def test_er_step_bypasses_the_optimizer_and_leaves_no_grad():
    iv = L2ER(L2ERParams(er_lr=0.01))
    agent = cartpole_dqn([iv])
    agent.train(2, 16)
    adam = copy.deepcopy(agent.optimizer.state_dict())
    grads = [p.grad.clone() for p in agent.q_net.parameters()]
    before = [p.detach().clone() for p in agent.q_net.parameters()]
    iv.er_step(agent, agent.replay_buffer.sample(16).observations)
    assert any(not th.equal(p, b) for p, b in zip(agent.q_net.parameters(), before))  # it did step
    assert all(th.equal(p.grad, g) for p, g in zip(agent.q_net.parameters(), grads))
    after = agent.optimizer.state_dict()
    assert after["state"].keys() == adam["state"].keys()
    for key, state in adam["state"].items():
        assert all(th.equal(state[k], after["state"][key][k]) for k in state)


def test_dqn_er_steps_follow_the_td_steps_and_do_not_touch_them():
    """Two train() calls with l2_er equal [TD step with L2, ER step by hand] twice, on the same batches."""
    wd, er_lr = 1e-3, 0.01
    agent = cartpole_dqn([L2ER(L2ERParams(coef=wd, er_lr=er_lr))])
    params0 = copy.deepcopy(agent.q_net.state_dict())
    adam0 = copy.deepcopy(agent.optimizer.state_dict())
    for seed in (5, 6):
        np.random.seed(seed)  # the replay buffer samples from NumPy's global RNG
        agent.train(1, 16)
    ours = [p.detach().clone() for p in agent.q_net.parameters()]
    ours_grads = [p.grad.clone() for p in agent.q_net.parameters()]
    ours_adam = copy.deepcopy(agent.optimizer.state_dict())

    # Independent chain on the same agent: plain L2 in the loss, ER steps by hand between the updates.
    agent.q_net.load_state_dict(params0)
    agent.optimizer.load_state_dict(adam0)
    agent.interventions = [L2(L2Params(coef=wd))]
    for seed in (5, 6):
        np.random.seed(seed)
        obs = agent.replay_buffer.sample(16).observations
        np.random.seed(seed)
        agent.train(1, 16)
        manual_er_step(agent, obs, er_lr)
    for p, want, grad in zip(agent.q_net.parameters(), ours, ours_grads):
        assert th.allclose(p, want, atol=1e-7)
        # The last TD step's gradient, with nothing of the ER step on top (round-off apart: the hand-made
        # ER step rounds differently, so the TD step sees parameters equal to ~1e-9).
        assert th.allclose(p.grad, grad, rtol=1e-5, atol=1e-8)
    for key, state in ours_adam["state"].items():
        assert all(th.allclose(state[k], agent.optimizer.state_dict()["state"][key][k], atol=1e-9) for k in state)


def test_dqn_er_every_and_default_step_size():
    iv = L2ER(L2ERParams(er_every=3))
    agent = cartpole_dqn([iv])
    assert iv.er_lr == 1e-4  # the published DQN default
    agent.train(7, 16)
    assert iv.fired == 2
    assert agent.logger.name_to_value["interventions/l2_er/fired"] == 2
    assert "interventions/l2_er/erank/q_net.1" in agent.logger.name_to_value


def test_ppo_er_step_once_per_epoch_before_the_minibatches():
    iv = L2ER()
    agent = cartpole_ppo([iv], n_epochs=3)
    assert iv.er_lr == 1e-6  # the published PPO default
    events = []
    step, update = iv.er_step, iv.on_update
    iv.er_step = lambda a, obs: events.append(("er", len(obs))) or step(a, obs)
    iv.on_update = lambda a, n: events.append(("update", n)) or update(a, n)
    agent.learn(64)
    epoch = [("er", 64), ("update",), ("update",)]
    assert [e[:1] if e[0] == "update" else e for e in events] == epoch * 3
    assert iv.fired == 3 and iv.state_dict() == {"fired": 3, "epochs": 3}


def test_ppo_er_step_does_not_disturb_the_minibatch_order():
    """With both coefficients at 0 the run is bit-identical to no intervention: reading the whole rollout
    draws nothing from the RNG that orders PPO's minibatches."""
    ours = cartpole_ppo([L2ER(L2ERParams(coef=0.0, er_lr=0.0))]).learn(128)
    plain = cartpole_ppo([]).learn(128)
    for key, value in plain.policy.state_dict().items():
        assert th.equal(ours.policy.state_dict()[key], value), key


# -- kfac_rank ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def minatar_agents():
    """A MinAtar DDQN agent (published width 128) with kfac_rank, its buffer filled."""
    agents = {}
    for name, ivs in (("kfac_rank", [KFACRank()]),):
        agents[name] = PlasticDQN(
            "MlpPolicy",
            make_sequence("continual_minatar", switch_every=10_000),
            interventions=ivs,
            policy_kwargs=minatar_policy_kwargs("dqn"),
            learning_starts=100,
            batch_size=32,
            train_freq=1,
            buffer_size=1_000,
            double_q=True,
            device="cpu",
            seed=0,
        ).learn(100)
    return agents


def probe_kfac_products(agent, batch) -> dict[str, float]:
    """erank(A_l) * erank(G_l) per layer from the K-FAC probe, on the same batch and parameters."""
    factors = kfac_factors(agent.online_network(), batch, lambda _m, b: agent.training_loss(b)[0])
    assert set(factors) == {name for name, _ in agent.parametrized_layers()}
    return {name: (s := kfac_spectrum(A, G))["erank_A"] * s["erank_G"] for name, (A, G) in factors.items()}


def kfac_term_and_grads(agent, batch, iv) -> tuple[float, dict[str, th.Tensor | None]]:
    loss, features = agent.training_loss(batch)
    terms = iv.loss_terms(agent, batch, features, loss)
    assert set(terms) == {"kfac_rank"}  # its l2 part goes straight to the gradient (gradient_terms)
    names = [n for n, _ in agent.online_network().named_parameters()]
    grads = th.autograd.grad(terms["kfac_rank"], list(agent.online_network().parameters()), allow_unused=True)
    return terms["kfac_rank"].item(), dict(zip(names, grads))


def test_kfac_rank_equals_the_kfac_probe_on_minatar(minatar_agents):
    agent = minatar_agents["kfac_rank"]
    iv = agent.interventions[0]
    batch = agent.replay_buffer.sample(32)
    # Double DQN: the online network also runs on the next observations, under no_grad (ignored).
    default, grads = kfac_term_and_grads(agent, batch, iv)
    iv.params = KFACRankParams(input_layers=True)
    try:
        full, full_grads = kfac_term_and_grads(agent, batch, iv)
    finally:
        iv.params = KFACRankParams()
    products = probe_kfac_products(agent, batch)
    assert full == pytest.approx(-1e-3 * np.mean(list(products.values())), rel=1e-4)
    # By default the conv layer, fed by the observations, counts 0 (a constant without gradient) ...
    hidden = sum(v for name, v in products.items() if name != "features_extractor.cnn.0")
    assert default == pytest.approx(-1e-3 * hidden / len(products), rel=1e-4)
    assert agent.logger.name_to_value["interventions/kfac_rank/erank_A/q_net.0"] > 1
    # ... so the gradient is the full definition's.
    for name, grad in grads.items():
        assert (grad is None) == (full_grads[name] is None) and (grad is None or th.allclose(grad, full_grads[name]))

    # Gradients reach the layers below through A; none comes through G.
    assert grads["features_extractor.cnn.0.weight"].abs().sum() > 0
    assert grads["q_net.0.weight"].abs().sum() > 0
    # The Q head's weight feeds no layer input, only the loss (hence G): with G detached it gets nothing.
    assert grads["q_net.2.weight"] is None or not grads["q_net.2.weight"].any()


def test_kfac_rank_equals_the_kfac_probe_for_ppo():
    iv = KFACRank(KFACRankParams(coef=0.5, input_layers=True))
    agent = cartpole_ppo([iv]).learn(64)
    batch = next(agent.rollout_buffer.get(32))
    term, _ = kfac_term_and_grads(agent, batch, iv)
    assert term == pytest.approx(-0.5 * np.mean(list(probe_kfac_products(agent, batch).values())), rel=1e-4)


def test_kfac_rank_l2_term_is_weighed_by_l2_coef_not_coef():
    iv = KFACRank(KFACRankParams(coef=0.5, l2_coef=0.25))
    agent = cartpole_ppo([iv])
    weights = [p for _, p in regularized_weights(agent, False)]
    expected = 0.25 * sum(float(p.detach().square().sum()) for p in weights) / 2
    assert iv.logged_values(agent)["l2"].item() == pytest.approx(expected, rel=1e-5)


# -- nc_reg ---------------------------------------------------------------------------------------------
def test_nc_reg_equals_the_probe_with_greedy_action_classes():
    coef = 0.3
    iv = NCReg(NCRegParams(coef=coef))
    dqn = cartpole_dqn([iv])
    batch = dqn.replay_buffer.sample(64)
    with th.no_grad():  # shift the head's bias so that both actions are greedy on part of the batch
        q = dqn.q_net(batch.observations)
        dqn.value_head.bias[0] -= (q[:, 0] - q[:, 1]).median()
    loss, features = dqn.training_loss(batch)
    labels = dqn.q_net(batch.observations).argmax(dim=1)
    assert len(labels.unique()) == 2
    expected = -coef * min(neural_collapse(features.detach(), labels)["nc1"], 200.0)
    assert iv.loss_terms(dqn, batch, features, loss)["nc_reg"].item() == pytest.approx(expected, rel=1e-5)

    iv = NCReg(NCRegParams(coef=coef))
    ppo = cartpole_ppo([iv]).learn(64)
    batch = next(ppo.rollout_buffer.get(64))
    loss, features = ppo.training_loss(batch)
    with th.no_grad():
        labels = ppo.policy.get_distribution(batch.observations).distribution.probs.argmax(dim=1)
    assert len(labels.unique()) >= 2
    expected = -coef * min(neural_collapse(features.detach(), labels)["nc1"], 200.0)
    assert iv.loss_terms(ppo, batch, features, loss)["nc_reg"].item() == pytest.approx(expected, rel=1e-5)


@pytest.fixture
def nc_reg_with_labels(monkeypatch):
    """An nc_reg on a CartPole DQN whose classes are set by the test (the label source is tested above)."""
    labels = {}
    monkeypatch.setattr(nc_reg_module, "greedy_labels", lambda agent, obs, features: (labels["y"], None))
    iv = NCReg()
    agent = cartpole_dqn([iv])

    def term(features: th.Tensor, y: list[int]) -> th.Tensor:
        labels["y"] = th.tensor(y)
        batch = agent.replay_buffer.sample(len(y))
        return iv.loss_terms(agent, batch, features, th.zeros(()))["nc_reg"]

    return iv, agent, term


def test_nc_reg_is_zero_with_one_class(nc_reg_with_labels):
    iv, agent, term = nc_reg_with_labels
    features = th.randn(8, 3, dtype=th.float64, requires_grad=True)
    value = term(features, [2] * 8)
    assert value.item() == 0.0 and value.dtype == th.float64 and value.device == features.device
    assert iv.undefined == 1 and agent.logger.name_to_value["interventions/nc_reg/undefined"] == 1


@pytest.mark.parametrize("case", ["more_classes_than_dims", "equal_class_means"])
def test_nc_reg_gradient_is_finite_when_sigma_b_is_rank_deficient(nc_reg_with_labels, case):
    _, _, term = nc_reg_with_labels
    gen = th.Generator().manual_seed(1)
    if case == "more_classes_than_dims":  # 5 classes in 2 dimensions: Sigma_B has rank 2 < C - 1
        features = th.randn(40, 2, generator=gen)
        y = [i % 5 for i in range(40)]
    else:  # class 1 mirrors class 0 around its mean: two equal class means, Sigma_B loses a direction
        base = th.randn(10, 4, generator=gen)
        features = th.cat([base, 2 * base.mean(dim=0) - base, base + 5.0])
        y = [0] * 10 + [1] * 10 + [2] * 10
    features.requires_grad_(True)
    value = term(features, y)
    (grad,) = th.autograd.grad(value, features)
    assert math.isfinite(value.item()) and value.item() < 0
    assert th.isfinite(grad).all() and grad.abs().sum() > 0


def test_nc_reg_clip(nc_reg_with_labels):
    iv, _, term = nc_reg_with_labels
    gen = th.Generator().manual_seed(2)
    # Two classes with unit spread whose means are exactly 1e-3 apart (class 1 mirrors class 0 around its
    # mean, shifted): NC1 ~ 1 / 1e-6, far above the clip.
    base = th.randn(10, 3, generator=gen)
    features = th.cat([base, 2 * base.mean(dim=0) - base + th.tensor([1e-3, 0.0, 0.0])])
    y = [0] * 10 + [1] * 10
    assert neural_collapse(features, th.tensor(y))["nc1"] > 200
    features.requires_grad_(True)
    value = term(features, y)
    assert value.item() == pytest.approx(-iv.params.coef * iv.params.clip, rel=1e-7)
    (grad,) = th.autograd.grad(value, features, allow_unused=True)
    assert grad is None or not grad.any()
