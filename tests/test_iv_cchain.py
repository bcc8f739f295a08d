"""C-CHAIN churn reduction (``cchain``): the churn term against a hand computation, its gradient, the automatic
coefficient, the reference batch, bit-for-bit equality with no intervention at coefficient 0, and resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch as th
from stable_baselines3.common.env_util import make_vec_env
from test_agents import assert_same_parameters
from test_checkpoint import DQN, assert_sigterm_resume_equals

from agents import PlasticDQN, PlasticPPO
from rl_plasticity.catalog import registries
from rl_plasticity.config import load_config, validate_config
from rl_plasticity.interventions import INTERVENTIONS
from rl_plasticity.interventions.cchain import COEF_EPS, CChain, CChainParams, WindowMean
from rl_plasticity.interventions.kfac_rank import KFACRank
from rl_plasticity.runner import train

# A tiny Q-network (4 -> 8 -> 2) whose gradients are easy to write out by hand.
KW = dict(
    learning_starts=100,
    batch_size=16,
    buffer_size=1_000,
    train_freq=1,
    target_update_interval=50,
    policy_kwargs=dict(net_arch=[8]),
    device="cpu",
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = th.get_num_threads()
    th.set_num_threads(1)
    yield
    th.set_num_threads(threads)


def cartpole_dqn(interventions: list, seed: int = 0, env: object = "CartPole-v1") -> PlasticDQN:
    """A DQN whose replay buffer holds 100 transitions, with a logger, not trained yet (learning_starts 100)."""
    return PlasticDQN("MlpPolicy", env, interventions=interventions, seed=seed, **KW).learn(100)


def step_terms(agent: PlasticDQN, iv: CChain) -> dict[str, th.Tensor]:
    """The hooks of one gradient step as ``train()`` calls them, with no gradient from the TD loss and no optimizer
    step: the values cchain returns; the gradient of its term is then in the parameters' ``.grad``."""
    batch = agent.replay_buffer.sample(agent.batch_size)
    loss, features = agent.training_loss(batch)
    assert iv.loss_terms(agent, batch, features, loss) == {}  # the gradient goes in through gradient_terms
    for p in agent.online_network().parameters():
        p.grad = None
    return iv.gradient_terms(agent)


def rng_copy(iv: CChain) -> np.random.Generator:
    rng = np.random.default_rng()
    rng.bit_generator.state = iv._rng.bit_generator.state
    return rng


def hand_q_and_grads(params: dict[str, np.ndarray], x: np.ndarray, prev_q: np.ndarray, coef: float):
    """Q(x) of the 1-hidden-layer ReLU network and the gradient of coef * mean((Q(x) - prev_q)^2), by hand."""
    w1, b1, w2, b2 = (params[k] for k in ("q_net.0.weight", "q_net.0.bias", "q_net.2.weight", "q_net.2.bias"))
    z = x @ w1.T + b1
    h = np.maximum(z, 0)
    q = h @ w2.T + b2
    dq = 2 * coef * (q - prev_q) / q.size  # d term / dQ, (B, A)
    dz = (dq @ w2) * (z > 0)
    grads = {
        "q_net.0.weight": dz.T @ x,
        "q_net.0.bias": dz.sum(0),
        "q_net.2.weight": dq.T @ h,
        "q_net.2.bias": dq.sum(0),
    }
    return q, coef * np.mean((q - prev_q) ** 2), grads


def numpy_params(agent: PlasticDQN) -> dict[str, np.ndarray]:
    return {k: v.detach().double().numpy() for k, v in agent.online_network().state_dict().items()}


def test_registered_for_dqn_only_with_a_clear_error_for_ppo():
    assert INTERVENTIONS["cchain"].algos == ("dqn",)
    with pytest.raises(ValueError, match="'cchain' does not support agent 'ppo'"):
        validate_config(dict(name="x", agent=dict(algo="ppo"), interventions=["cchain"]), registries=registries())
    with pytest.raises(ValueError, match="cchain supports DQN only"):
        PlasticPPO("MlpPolicy", "CartPole-v1", interventions=[CChain()], n_steps=64, batch_size=32, device="cpu")
    with pytest.raises(ValueError, match="intervention_params.cchain.ref_batch_size"):
        validate_config(
            dict(name="x", interventions=["cchain"], intervention_params=dict(cchain=dict(ref_batch_size=0))),
            registries=registries(),
        )


def test_churn_is_zero_while_the_network_has_not_changed():
    iv = CChain()
    agent = cartpole_dqn([iv])
    assert step_terms(agent, iv) == {}  # the first update has no previous network
    assert all(p.grad is None for p in agent.online_network().parameters())
    term = step_terms(agent, iv)["churn_term"]  # no update in between
    assert term.item() == 0.0
    assert all(not p.grad.any() for p in agent.online_network().parameters())


def test_churn_term_and_gradient_against_a_hand_computation():
    iv = CChain()
    agent = cartpole_dqn([iv])
    network = agent.online_network()
    # The reference batch the hook will draw, found independently from a copy of its generator.
    rows = rng_copy(iv).choice(100, size=16, replace=False)
    x = agent.replay_buffer.observations[rows, 0].astype(np.float64)
    prev_q, _, _ = hand_q_and_grads(numpy_params(agent), x, 0.0, 1.0)
    with th.no_grad():  # a target network unlike the online one: the reference is not the target network
        for p in agent.q_net_target.parameters():
            p.mul_(0.5)
    step_terms(agent, iv)

    # "An update": any change of the parameters.
    th.manual_seed(5)
    with th.no_grad():
        for p in network.parameters():
            p.add_(0.3 * th.randn_like(p))
    term = step_terms(agent, iv)["churn_term"]
    q, want, want_grads = hand_q_and_grads(numpy_params(agent), x, prev_q, iv.coef)
    assert iv.coef == 50.0 and term.item() == pytest.approx(want, rel=1e-5) and want > 0
    named = dict(network.named_parameters())
    grads = [p.grad for p in named.values()]
    for (name, _), grad in zip(named.items(), grads):
        np.testing.assert_allclose(grad.double().numpy(), want_grads[name], rtol=1e-4, atol=1e-9, err_msg=name)

    # A small step against that gradient brings the outputs on the reference batch back towards the previous ones.
    with th.no_grad():
        for p, g in zip(named.values(), grads):
            p.sub_(1e-3 * g)
    q_after, _, _ = hand_q_and_grads(numpy_params(agent), x, prev_q, iv.coef)
    assert np.abs(q_after - prev_q).sum() < np.abs(q - prev_q).sum()


def test_reference_batch_is_drawn_from_the_filled_buffer_with_its_own_generator():
    agent = cartpole_dqn([])
    buffer = agent.replay_buffer
    assert buffer.pos == 100 and not buffer.full
    rng = np.random.default_rng(1)
    global_state = np.random.get_state()
    for _ in range(50):
        expected = np.random.default_rng()
        expected.bit_generator.state = rng.bit_generator.state
        rows = expected.choice(100, size=16, replace=False)
        obs = agent.sample_replay_observations(16, rng)
        assert th.equal(obs, th.as_tensor(buffer.observations[rows, 0]))
    # What train() samples from the same rows is the same tensor.
    assert th.equal(obs, buffer._get_samples(rows).observations)
    # Nothing drawn from NumPy's global RNG, which draws the training batches.
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), global_state))
    # Fewer rows than asked: with replacement, still inside the filled part.
    big = agent.sample_replay_observations(300, rng)
    assert big.shape == (300, 4) and all((buffer.observations[:100, 0] == o.numpy()).all(1).any() for o in big)

    # Two envs: rows are (position, env) pairs.
    env = make_vec_env("CartPole-v1", n_envs=2, seed=0)
    agent2 = cartpole_dqn([], env=env)
    expected = np.random.default_rng(2)
    flat = expected.choice(agent2.replay_buffer.pos * 2, size=16, replace=False)
    obs = agent2.sample_replay_observations(16, np.random.default_rng(2))
    assert th.equal(obs, th.as_tensor(agent2.replay_buffer.observations[flat // 2, flat % 2]))


def test_coefficient_zero_trains_exactly_as_no_intervention():
    iv = CChain(CChainParams(coef=0.0))
    ours = PlasticDQN("MlpPolicy", "CartPole-v1", interventions=[iv], seed=3, **KW).learn(400)
    ours_rng = np.random.get_state()
    none = PlasticDQN("MlpPolicy", "CartPole-v1", interventions=[], seed=3, **KW).learn(400)
    assert iv.churns.count == ours.num_gradient_steps - 1 == 299  # the term was computed at every update but the first
    assert_same_parameters(ours.policy, none.policy)
    assert_same_parameters(ours.q_net_target, none.q_net_target)
    # The training batches come from NumPy's global RNG: left where it would be.
    assert all(np.array_equal(a, b) for a, b in zip(ours_rng, np.random.get_state()))
    # ... while a coefficient that is not zero changes training (the comparison above can fail).
    other = PlasticDQN("MlpPolicy", "CartPole-v1", interventions=[CChain(CChainParams(coef=1.0))], seed=3, **KW)
    other.learn(400)
    with pytest.raises(AssertionError):
        assert_same_parameters(other.policy, none.policy)


def test_automatic_coefficient_matches_a_hand_computation():
    iv = CChain(CChainParams(target_rel_loss_scale=0.5, init_coef=7.0, auto_after=3, window=2))
    steps = [(1, -2.0, None), (2, 4.0, 0.5), (3, 1.0, 1.5), (4, 3.0, 0.25), (5, 0.5, 2.0)]
    # After update k, the coefficient of update k + 1: init_coef up to update auto_after, then
    # 0.5 * mean|TD| / (mean churn + 1e-8) over each one's last 2 values.
    want = [7.0, 7.0, 0.5 * 2.5 / (1.0 + COEF_EPS), 0.5 * 2.0 / (0.875 + COEF_EPS), 0.5 * 1.75 / (1.125 + COEF_EPS)]
    for (update, td, churn), coef in zip(steps, want):
        iv._track(update, td, churn)
        assert iv.coef == pytest.approx(coef, rel=1e-12), update
    fixed = CChain(CChainParams(coef=0.25, auto_after=1))
    for update, td, churn in steps:
        fixed._track(update, td, churn)
    assert fixed.coef == 0.25


def test_each_update_uses_the_coefficient_computed_after_the_previous_one():
    iv = CChain(CChainParams(auto_after=1, window=3))
    agent = cartpole_dqn([iv])
    agent.learn(20, reset_num_timesteps=False)
    coef = iv.coef
    churns_before = iv.churns.count
    term = step_terms(agent, iv)["churn_term"]
    churn = iv.churns.values[churns_before % 3]
    assert term.item() == pytest.approx(coef * churn, rel=1e-6) and iv.coef != coef


def test_automatic_coefficient_starts_after_update_auto_after():
    iv = CChain(CChainParams(auto_after=5))
    agent = cartpole_dqn([iv])
    coefs = []
    while agent.num_gradient_steps < 6:
        agent.learn(1, reset_num_timesteps=False)
        coefs.append((agent.num_gradient_steps, iv.coef))
    # Recomputed after update 5, so updates 1 to 5 use init_coef and update 6 the first automatic value.
    assert [c == 50.0 for _, c in coefs] == [n < 5 for n, _ in coefs] and coefs[-1][0] == 6


@pytest.mark.parametrize("order", ["kfac_rank,cchain", "cchain,kfac_rank"])
def test_hook_recorders_see_only_the_training_forward_pass_in_any_order(order: str):
    """kfac_rank records the training forward pass by forward hooks; cchain's own forward pass comes after every
    loss_terms, so with cchain at coefficient 0 training is kfac_rank's alone, bit for bit, in either order."""

    def trained(names: list[str]) -> PlasticDQN:
        ivs = [CChain(CChainParams(coef=0.0)) if n == "cchain" else KFACRank() for n in names]
        return PlasticDQN("MlpPolicy", "CartPole-v1", interventions=ivs, seed=3, **KW).learn(300)

    assert_same_parameters(trained(order.split(",")).policy, trained(["kfac_rank"]).policy)


def test_window_mean_over_the_last_values():
    window = WindowMean(7)
    values = np.random.default_rng(0).exponential(size=40)
    for i, v in enumerate(values, 1):
        window.push(float(v))
        assert len(window) == min(i, 7)
        assert window.mean() == pytest.approx(values[max(0, i - 7) : i].mean(), rel=1e-12)
    assert np.isnan(WindowMean(3).mean())


def test_resume_equals_uninterrupted(tmp_path: Path):
    """SIGTERM mid-run with cchain on (the automatic coefficient running, its windows wrapped), resume: the same
    parameters, optimizer state and logs as a run that was never stopped."""
    (tmp_path / "dqn.yaml").write_text(DQN)
    cchain = ["intervention_params.cchain.auto_after=100", "intervention_params.cchain.window=64"]
    reference = train(
        load_config(
            tmp_path / "dqn.yaml",
            [f"logging.root_dir={tmp_path / 'ref'}", "interventions=[cchain]", *cchain],
            registries=registries(),
        )
    )
    assert_sigterm_resume_equals(reference, tmp_path / "dqn.yaml", 900, ["cchain"], *cchain)
