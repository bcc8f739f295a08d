"""Gram probe: NTK Gram and loss-weighted Gram against an explicit Jacobian and the explicit GGN."""

from __future__ import annotations

import copy

import pytest
import torch as th
import torch.nn.functional as F
from torch import nn

from rl_plasticity.probes.gram import gram_spectrum, huber_curvature, loss_curvature
from rl_plasticity.probes.rank import effective_rank_from_spectrum

DT = th.float64
N = 6


def q_sa(model: nn.Module, batch: tuple[th.Tensor, th.Tensor]) -> th.Tensor:
    """f_i = Q(s_i, a_i): one scalar per sample."""
    obs, actions = batch
    return model(obs).gather(1, actions.long().view(-1, 1)).squeeze(1)


def setup(n: int = N):
    th.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).to(DT)  # P = 20 + 12 = 32 > n
    gen = th.Generator().manual_seed(1)
    obs = th.randn(n, 3, generator=gen, dtype=DT)
    actions = th.randint(0, 2, (n,), generator=gen)
    return net, (obs, actions)


def explicit_jacobian(net: nn.Module, batch, names: list[str] | None = None) -> th.Tensor:
    """J (n x P) by a loop over samples, one autograd call each."""
    named = dict(net.named_parameters())
    params = [named[k] for k in (names or list(named))]
    obs, actions = batch
    rows = []
    for i in range(obs.shape[0]):
        fi = q_sa(net, (obs[i : i + 1], actions[i : i + 1]))[0]
        rows.append(th.cat([g.reshape(-1) for g in th.autograd.grad(fi, params)]))
    return th.stack(rows)


def test_gram_and_loss_weighted_gram_match_explicit_ggn():
    net, batch = setup()
    D = th.tensor([1.0, 0.0, 2.0, 0.5, 1.0, 0.0], dtype=DT)
    out = gram_spectrum(net, batch, q_sa, loss_curvature=D)
    J = explicit_jacobian(net, batch)
    K = J @ J.T
    th.testing.assert_close(out["eigs_K"], th.linalg.eigvalsh(K / N).clamp_min(0).flip(0), rtol=1e-9, atol=1e-12)
    # Non-zero eigenvalues of K_L / n = those of the P x P GGN J^T D J / n (the rest of the GGN's are 0).
    ggn = J.T @ th.diag(D) @ J / N
    ggn_eigs = th.linalg.eigvalsh(ggn).flip(0)
    th.testing.assert_close(out["eigs_KL"], ggn_eigs[:N].clamp_min(0), rtol=1e-9, atol=1e-12)
    assert ggn_eigs[N:].abs().max() < 1e-12
    assert out["top_eig_KL"] == pytest.approx(float(ggn_eigs[0]))
    assert out["top_eig_K"] == pytest.approx(float(th.linalg.eigvalsh(K / N)[-1]))
    assert out["frac_zero_curvature"] == pytest.approx(2 / 6)
    assert out["n"] == N
    assert out["eps_rank_KL"] == int((out["eigs_KL"] > 0.01 * out["top_eig_KL"]).sum()) == 4
    assert out["erank_K"] == pytest.approx(effective_rank_from_spectrum(out["eigs_K"]))
    assert isinstance(out["erank_KL"], float) and isinstance(out["eps_rank_K"], int)


def test_mse_default_makes_KL_equal_K():
    net, batch = setup()
    out = gram_spectrum(net, batch, q_sa)
    th.testing.assert_close(out["eigs_K"], out["eigs_KL"])
    assert out["frac_zero_curvature"] == 0.0
    assert out["eps_rank_K"] == out["eps_rank_KL"]


def test_huber_curvature_drops_samples_outside_delta():
    r = th.tensor([0.0, 0.5, -0.99, 1.0, -1.0, 3.0], dtype=DT)
    th.testing.assert_close(huber_curvature(r), th.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0], dtype=DT))
    th.testing.assert_close(huber_curvature(r, delta=2.0), th.tensor([1.0, 1, 1, 1, 1, 0], dtype=DT))

    net, batch = setup()
    with th.no_grad():
        f = q_sa(net, batch)
    targets = f + th.tensor([0.1, 2.0, -0.3, -5.0, 0.9, 1.0], dtype=DT)  # |r| >= 1 for samples 1, 3, 5
    D = huber_curvature(f - targets)
    out = gram_spectrum(net, batch, q_sa, loss_curvature=D)
    assert out["frac_zero_curvature"] == pytest.approx(0.5)
    # Rows/cols of dropped samples are zero: K_L is K restricted to the kept samples, padded with zeros.
    J = explicit_jacobian(net, batch)
    keep = th.tensor([0, 2, 4])
    K_keep = (J @ J.T)[keep][:, keep] / N
    want = th.cat([th.linalg.eigvalsh(K_keep).flip(0), th.zeros(3, dtype=DT)])
    th.testing.assert_close(out["eigs_KL"], want, rtol=1e-9, atol=1e-12)
    assert out["eps_rank_KL"] == 3


def test_params_subset_last_layer():
    net, batch = setup()
    names = ["2.weight", "2.bias"]
    out = gram_spectrum(net, batch, q_sa, params=names)
    J = explicit_jacobian(net, batch, names)
    assert J.shape == (N, 12)
    th.testing.assert_close(out["eigs_K"], th.linalg.eigvalsh(J @ J.T / N).clamp_min(0).flip(0), rtol=1e-9, atol=1e-12)
    # Closed form for the head: K_ij = (h_i . h_j + 1) [a_i == a_j].
    obs, actions = batch
    with th.no_grad():
        h = net[1](net[0](obs))
    K = (h @ h.T + 1) * (actions[:, None] == actions[None, :])
    th.testing.assert_close(out["eigs_K"], th.linalg.eigvalsh(K / N).clamp_min(0).flip(0), rtol=1e-9, atol=1e-12)
    full = gram_spectrum(net, batch, q_sa)
    assert not th.allclose(full["eigs_K"], out["eigs_K"])


def test_value_output_with_tensor_inputs_and_model_untouched():
    th.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 1)).to(DT)
    obs = th.randn(10, 3, dtype=DT)
    for p in net.parameters():
        p.grad = th.full_like(p, 3.0)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    rng = th.get_rng_state()
    out = gram_spectrum(net, obs, lambda m, x: m(x).squeeze(-1))
    assert th.equal(th.get_rng_state(), rng)
    J = th.stack(
        [
            th.cat([g.reshape(-1) for g in th.autograd.grad(net(obs[i : i + 1]).sum(), list(net.parameters()))])
            for i in range(10)
        ]
    )
    th.testing.assert_close(out["eigs_K"], th.linalg.eigvalsh(J @ J.T / 10).clamp_min(0).flip(0), rtol=1e-9, atol=1e-12)
    for k, p in net.named_parameters():
        assert th.equal(p.detach(), before[k])
        assert th.equal(p.grad, th.full_like(p, 3.0))


def test_bad_inputs_raise_value_error():
    net, (obs, actions) = setup()
    with pytest.raises(ValueError, match="at least 2"):
        gram_spectrum(net, (obs[:1], actions[:1]), q_sa)
    bad = obs.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        gram_spectrum(net, (bad, actions), q_sa)
    with pytest.raises(ValueError):  # mismatched batch sizes
        gram_spectrum(net, (obs, actions[:3]), q_sa)
    with pytest.raises(ValueError):  # wrong-shaped curvature
        gram_spectrum(net, (obs, actions), q_sa, loss_curvature=th.ones(N + 1, dtype=DT))
    with pytest.raises(ValueError):  # negative curvature
        gram_spectrum(net, (obs, actions), q_sa, loss_curvature=-th.ones(N, dtype=DT))
    with pytest.raises(ValueError):
        gram_spectrum(net, (obs, actions), q_sa, params=["nope.weight"])
    with pytest.raises(ValueError):  # two outputs per sample
        gram_spectrum(net, (obs, actions), lambda m, b: m(b[0]))
    with pytest.raises(ValueError):
        huber_curvature(th.tensor([float("nan")]))
    with pytest.raises(ValueError):
        huber_curvature(th.tensor([1.0]), delta=0.0)


def test_aliased_submodule_keeps_its_live_parameters():
    # SB3's PPO registers its shared features extractor under three names; the probe must leave the very
    # same Parameter objects in place (a plain tensor there silently stops that layer from training).
    class Aliased(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.torso = nn.Linear(3, 4)
            self.alias = self.torso
            self.head = nn.Linear(4, 1)

        def forward(self, x):
            return self.head(th.relu(self.alias(x)))

    model = Aliased()
    before = [(m, k, p) for m in model.modules() for k, p in m._parameters.items()]
    gram_spectrum(model, th.randn(5, 3), lambda m, x: m(x).squeeze(-1))
    for module, key, p in before:
        assert module._parameters[key] is p and isinstance(module._parameters[key], nn.Parameter)


def test_loss_curvature_by_autograd_matches_the_closed_forms():
    r = th.tensor([0.0, 0.5, -0.99, 1.0, -1.0, 3.0], dtype=DT)
    y = th.linspace(-2.0, 2.0, 6, dtype=DT)
    th.testing.assert_close(loss_curvature(F.smooth_l1_loss, y + r, y), huber_curvature(r))
    th.testing.assert_close(loss_curvature(F.mse_loss, y + r, y), th.full((6,), 2.0, dtype=DT))
    with pytest.raises(ValueError):
        loss_curvature(F.mse_loss, r, y[:3])


def td_oracle_ggn(agent, batch, loss_fn) -> th.Tensor:
    """The Gauss-Newton matrix ``J^T H J`` of the batch-mean TD loss, from explicit autograd Hessians.

    ``H`` is the Hessian of ``mean_i loss_fn(Q(s_i)[a_i], y_i)`` w.r.t. *all* outputs ``Q(s_i)[a]`` (an
    ``nA x nA`` matrix, by ``torch.autograd.functional.hessian``), ``J`` the Jacobian of all outputs w.r.t.
    all parameters. Nothing here knows which outputs the loss reads: the Hessian finds it.
    """
    net = copy.deepcopy(agent.q_net).double()
    obs = batch.observations.double()
    actions = batch.actions.long().reshape(-1)
    with th.no_grad():
        targets = agent.compute_target(batch).reshape(-1).double()
    names = [k for k, _ in net.named_parameters()]
    shapes = [p.shape for p in net.parameters()]
    flat = th.cat([p.detach().reshape(-1) for p in net.parameters()])

    def outputs(theta: th.Tensor) -> th.Tensor:
        params = {k: c.view(s) for k, c, s in zip(names, theta.split([s.numel() for s in shapes]), shapes)}
        # CartPole's observations need no preprocessing (SB3's would cast them to float32): flatten, then the MLP.
        mlp_params = {k.removeprefix("q_net."): v for k, v in params.items()}
        return th.func.functional_call(net.q_net, mlp_params, (net.features_extractor(obs),))

    def td_loss(q: th.Tensor) -> th.Tensor:
        return loss_fn(q[th.arange(len(actions)), actions], targets)

    q = outputs(flat).detach()
    H = th.autograd.functional.hessian(td_loss, q).reshape(q.numel(), q.numel())
    J = th.autograd.functional.jacobian(outputs, flat).reshape(q.numel(), -1)
    return J.T @ H @ J


@pytest.mark.parametrize("td_loss", ["huber", "mse"])
def test_dqn_loss_weighted_gram_is_the_gauss_newton_matrix_of_its_td_loss(td_loss):
    from stable_baselines3.common.buffers import ReplayBufferSamples

    from agents import PlasticDQN
    from rl_plasticity.probing import _gram_inputs

    agent = PlasticDQN(
        "MlpPolicy",
        "CartPole-v1",
        policy_kwargs=dict(net_arch=[6]),
        learning_starts=20,
        batch_size=8,
        buffer_size=200,
        device="cpu",
        seed=0,
    )
    agent.learn(40)
    agent.td_loss = td_loss  # the probe reads the agent's TD loss from this attribute
    n = 10
    batch = agent.replay_buffer.sample(n)
    # Rewards spread over [-3, 3], so that some residuals are outside Huber's |r| < 1 (D = 0) and some inside.
    batch = ReplayBufferSamples(
        *(
            th.linspace(-3.0, 3.0, n).reshape(-1, 1) if field == "rewards" else value
            for field, value in zip(ReplayBufferSamples._fields, batch)
        )
    )
    with th.no_grad():
        greedy = agent.q_net(batch.observations).argmax(dim=1)
    assert bool((greedy != batch.actions.reshape(-1)).any())  # the greedy action is not the stored one

    inputs, output_fn, curvature = _gram_inputs(agent, batch)
    out = gram_spectrum(agent.q_net, inputs, output_fn, loss_curvature=curvature)
    loss_fn = F.smooth_l1_loss if td_loss == "huber" else F.mse_loss
    ggn = td_oracle_ggn(agent, batch, loss_fn)
    eigs = th.linalg.eigvalsh((ggn + ggn.T) / 2).flip(0)
    # K_L / n and the GGN of the batch mean share their non-zero eigenvalues; the GGN's others are zero.
    scale = float(eigs[0])
    th.testing.assert_close(out["eigs_KL"], eigs[:n].clamp_min(0), rtol=1e-4, atol=1e-6 * scale)
    assert eigs[n:].abs().max() < 1e-6 * scale
    if td_loss == "huber":
        assert 0 < out["frac_zero_curvature"] < 1
    else:
        assert out["frac_zero_curvature"] == 0
