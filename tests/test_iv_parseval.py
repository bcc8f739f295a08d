"""Parseval regularization (``parseval``): the penalty against a hand computation, its added gradient against
autograd, zero at a scaled orthogonal matrix, plain gradient descent on it alone, the layers it acts on, and
bit-for-bit equality with no intervention at coefficient 0."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch as th
from test_agents import assert_same_parameters

from agents import PlasticDQN, PlasticPPO, minatar_policy_kwargs
from envs import make_sequence
from rl_plasticity.interventions import INTERVENTIONS
from rl_plasticity.interventions.parseval import (
    Parseval,
    ParsevalParams,
    add_parseval_gradient,
    parseval_penalty,
    parseval_weights,
)

CARTPOLE = {"policy_kwargs": {"net_arch": [32, 32]}, "device": "cpu"}
DQN_KW = {"learning_starts": 100, "batch_size": 16, "buffer_size": 1_000, "train_freq": 1, **CARTPOLE}
PPO_KW = {"n_steps": 64, "batch_size": 32, "n_epochs": 2, **CARTPOLE}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: these networks are tiny, and other jobs share the two cores."""
    threads = th.get_num_threads()
    th.set_num_threads(1)
    yield
    th.set_num_threads(threads)


def hand_penalty(w: np.ndarray, coef: float, scale: float) -> float:
    """coef * ||W W^T - s I||_F^2 in float64, a conv weight flattened to (d_out, rest), entry by entry."""
    m = w.reshape(w.shape[0], -1).astype(np.float64)
    total = 0.0
    for i in range(m.shape[0]):
        for j in range(m.shape[0]):
            total += (m[i] @ m[j] - (scale if i == j else 0.0)) ** 2
    return coef * total


def autograd_grad(w: th.Tensor, coef: float, scale: float) -> th.Tensor:
    """The gradient of coef * ||W W^T - s I||_F^2 by autograd."""
    x = w.detach().clone().requires_grad_(True)
    m = x.flatten(1)
    penalty = coef * th.linalg.matrix_norm(m @ m.T - scale * th.eye(m.shape[0])).square()
    (grad,) = th.autograd.grad(penalty, x)
    return grad


def scaled_orthogonal(d_out: int, d_in: int, scale: float, seed: int) -> th.Tensor:
    """sqrt(s) times a matrix with orthonormal rows (d_out <= d_in), so that W W^T = s I."""
    q, _ = th.linalg.qr(th.randn(d_in, d_out, generator=th.Generator().manual_seed(seed), dtype=th.float64))
    return (scale**0.5 * q.T).to(th.float32)


SHAPES = [(3, 5), (6, 4), (4, 2, 3, 3), (16, 10, 3, 3), (1, 7)]


def test_registered_for_both_agents_with_the_published_defaults():
    spec = INTERVENTIONS["parseval"]
    assert spec.cls is Parseval and spec.algos == ("dqn", "ppo")
    assert spec.defaults() == {"coef": 1e-3, "scale": 2.0, "reference_width": None}


def test_penalty_equals_a_hand_computation():
    w = th.tensor([[1.0, 2.0, 0.0], [0.5, -1.0, 3.0]])
    # W W^T = [[5, -1.5], [-1.5, 10.25]]; minus 2 I: [[3, -1.5], [-1.5, 8.25]]
    expected = 0.1 * (3.0**2 + 2 * 1.5**2 + 8.25**2)
    assert parseval_penalty([w], [0.1], 2.0).item() == pytest.approx(expected, rel=1e-6)
    gen = th.Generator().manual_seed(0)
    weights = [th.randn(shape, generator=gen) for shape in SHAPES]
    coefs = [0.1, 0.2, 0.3, 0.4, 0.5]
    total = sum(hand_penalty(w.numpy(), c, 1.5) for w, c in zip(weights, coefs))
    assert parseval_penalty(weights, coefs, 1.5).item() == pytest.approx(total, rel=1e-5)
    assert parseval_penalty([], [], 2.0).item() == 0.0


@pytest.mark.parametrize("shape", SHAPES)
def test_added_gradient_equals_autograd_of_the_penalty(shape):
    gen = th.Generator().manual_seed(1)
    w = th.nn.Parameter(th.randn(shape, generator=gen))
    coef, scale = 0.03, 2.0
    expected = autograd_grad(w, coef, scale)
    add_parseval_gradient([w], [coef], scale)  # no gradient yet: set to the term
    assert th.allclose(w.grad, expected, rtol=1e-5, atol=1e-6)
    existing = th.randn(shape, generator=gen)
    w.grad = existing.clone()
    add_parseval_gradient([w], [coef], scale)  # added to what backward left
    assert th.allclose(w.grad, existing + expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("d_out", "d_in"), [(4, 4), (3, 8), (16, 90)])
@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_zero_penalty_and_gradient_at_a_scaled_orthogonal_matrix(d_out, d_in, scale):
    w = th.nn.Parameter(scaled_orthogonal(d_out, d_in, scale, seed=d_in))
    assert th.allclose(w @ w.T, scale * th.eye(d_out), atol=1e-5)
    assert parseval_penalty([w], [1.0], scale).item() == pytest.approx(0.0, abs=1e-9)
    add_parseval_gradient([w], [1.0], scale)
    assert w.grad.abs().max().item() < 1e-5
    # ... while the same rows at another scale are penalised, and pulled towards s.
    v = th.nn.Parameter(w.detach() * 1.1)
    # v v^T = 1.21 s I: each of the d_out diagonal entries is off by 0.21 s.
    assert parseval_penalty([v], [1.0], scale).item() == pytest.approx(d_out * (0.21 * scale) ** 2, rel=1e-4)
    add_parseval_gradient([v], [1.0], scale)
    assert (v.grad * v).sum().item() > 0  # descent shrinks it


def test_gradient_descent_on_the_penalty_alone_moves_w_wt_to_s_i():
    gen = th.Generator().manual_seed(2)
    scale = 2.0
    w = th.nn.Parameter(0.3 * th.randn(8, 20, generator=gen))
    distances = []
    for _ in range(200):
        distances.append(th.linalg.matrix_norm(w @ w.T - scale * th.eye(8)).item())
        w.grad = None
        add_parseval_gradient([w], [1.0], scale)
        with th.no_grad():
            w.sub_(0.01 * w.grad)
    distances.append(th.linalg.matrix_norm(w @ w.T - scale * th.eye(8)).item())
    # Down at every step until float32 round-off (about 1e-6 here) is reached.
    assert all(b < a for a, b in itertools.pairwise(distances) if a > 1e-4)
    assert distances[-1] < 1e-5 * distances[0]
    assert th.allclose(w @ w.T, scale * th.eye(8), atol=1e-3)


def minatar(cls, algo: str, ivs: list):
    return cls(
        "MlpPolicy",
        make_sequence("continual_minatar", switch_every=1_000),
        interventions=ivs,
        policy_kwargs=minatar_policy_kwargs(algo),
        device="cpu",
        seed=0,
        **({"learning_starts": 10} if algo == "dqn" else {}),
    )


def test_acts_on_every_layer_but_the_output_layers_conv_included():
    dqn = minatar(PlasticDQN, "dqn", [])
    assert [n for n, _ in parseval_weights(dqn)] == ["features_extractor.cnn.0.weight", "q_net.0.weight"]
    ppo = minatar(PlasticPPO, "ppo", [])
    assert [n for n, _ in parseval_weights(ppo)] == [
        "features_extractor.cnn.0.weight",
        "mlp_extractor.policy_net.0.weight",
        "mlp_extractor.value_net.0.weight",
    ]
    # SB3 builds PPO's hidden layers orthogonal with gain sqrt(2): the default s = 2 is their W W^T already.
    for _, w in parseval_weights(ppo):
        m = w.detach().flatten(1)
        assert th.allclose(m @ m.T, 2.0 * th.eye(m.shape[0]), atol=1e-4)
    assert Parseval().logged_values(ppo)["parseval"].item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("reference_width", [None, 64])
def test_logged_value_and_added_gradients_on_the_agents(reference_width):
    """Through the hooks on a MinAtar DQN and PPO: the value is the hand computation over the hidden layers
    (conv included), each hidden weight's gradient gains autograd's, and nothing else is touched."""
    for cls, algo in ((PlasticDQN, "dqn"), (PlasticPPO, "ppo")):
        iv = Parseval(ParsevalParams(coef=0.01, scale=1.0, reference_width=reference_width))
        agent = minatar(cls, algo, [iv])
        params = dict(agent.online_network().named_parameters())
        gen = th.Generator().manual_seed(3)
        base = {name: th.randn(p.shape, generator=gen) for name, p in params.items()}
        for name, p in params.items():
            p.grad = base[name].clone()
        assert iv.gradient_terms(agent) == {}  # the value is logged at dumps only
        hidden = dict(parseval_weights(agent))
        expected_value = 0.0
        for name, p in params.items():
            if name in hidden:
                coef = 0.01 * (1.0 if reference_width is None else (reference_width / p.shape[0]) ** 2)
                assert th.allclose(p.grad, base[name] + autograd_grad(p, coef, 1.0), rtol=1e-4, atol=1e-6), name
                expected_value += hand_penalty(p.detach().numpy(), coef, 1.0)
            else:
                assert th.equal(p.grad, base[name]), name
        assert iv.logged_values(agent)["parseval"].item() == pytest.approx(expected_value, rel=1e-5)
        if algo == "dqn":
            assert all(p.grad is None for p in agent.q_net_target.parameters())


def test_gradient_steps_of_the_hook_alone_make_the_hidden_layers_parseval():
    """Plain gradient descent with only the hook's gradient drives each hidden layer of a CartPole DQN to its
    minimum: W W^T = s I for the square (32, 32) layer; the tall input layer (32, 4) has rank 4, so there
    W^T W = s I (all 4 singular values at sqrt(s)) and 32 - 4 eigenvalues of W W^T stay 0: penalty 28 s^2."""
    iv = Parseval(ParsevalParams(coef=1.0, scale=1.0))
    agent = PlasticDQN("MlpPolicy", "CartPole-v1", interventions=[iv], seed=0, **DQN_KW)
    head = agent.head_layers()[0].weight.detach().clone()
    values = []
    for _ in range(100):
        values.append(iv.logged_values(agent)["parseval"].item())
        for p in agent.online_network().parameters():
            p.grad = None
        iv.gradient_terms(agent)
        with th.no_grad():
            for p in agent.online_network().parameters():
                if p.grad is not None:
                    p.sub_(0.02 * p.grad)
    assert values[0] > 50 and values[-1] == pytest.approx(28.0, abs=1e-3)
    first, second = (w.detach() for _, w in parseval_weights(agent))
    assert first.shape == (32, 4) and th.allclose(first.T @ first, th.eye(4), atol=1e-3)
    assert second.shape == (32, 32) and th.allclose(second @ second.T, th.eye(32), atol=1e-3)
    assert th.equal(agent.head_layers()[0].weight, head)


@pytest.mark.parametrize("algo", ["dqn", "ppo"])
def test_coefficient_zero_trains_exactly_as_no_intervention(algo):
    def run(ivs):
        if algo == "dqn":
            return PlasticDQN("MlpPolicy", "CartPole-v1", interventions=ivs, seed=3, **DQN_KW).learn(300)
        return PlasticPPO("MlpPolicy", "CartPole-v1", interventions=ivs, seed=3, **PPO_KW).learn(128)

    none = run([])
    assert_same_parameters(run([Parseval(ParsevalParams(coef=0.0))]).policy, none.policy)
    # ... while a coefficient that is not zero changes training (the comparison above can fail).
    with pytest.raises(AssertionError):
        assert_same_parameters(run([Parseval()]).policy, none.policy)


def test_state_is_the_base_counter_only():
    """The penalty depends on the current weights alone: nothing to save beyond the base class's counter, so a
    resumed run continues exactly with the checkpointed weights and optimizer."""
    iv = Parseval()
    minatar(PlasticDQN, "dqn", [iv]).learn(20)
    assert iv.state_dict() == {"fired": 0}


def test_warns_when_there_is_nothing_to_regularize():
    with pytest.warns(UserWarning, match="nothing is regularized"):
        PlasticDQN(
            "MlpPolicy",
            "CartPole-v1",
            interventions=[Parseval()],
            seed=0,
            **{**DQN_KW, "policy_kwargs": {"net_arch": []}},
        )
