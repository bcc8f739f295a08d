"""Hessian probe: HVPs and Lanczos against the explicit Hessian (torch.func.hessian) and known spectra."""

from __future__ import annotations

import pytest
import torch as th
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from rl_plasticity.probes.hessian import _start_vectors, hessian_spectrum, hessian_vector_product

DT = th.float64


def tiny_problem(dtype: th.dtype = DT):
    th.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(dtype)  # P = 16 + 5 = 21
    gen = th.Generator().manual_seed(1)
    x = th.randn(12, 3, generator=gen, dtype=DT).to(dtype)
    y = th.randn(12, 1, generator=gen, dtype=DT).to(dtype)
    return net, (lambda: F.mse_loss(net(x), y)), x, y


def explicit_hessian(net: nn.Module, x: th.Tensor, y: th.Tensor) -> th.Tensor:
    names = [k for k, _ in net.named_parameters()]
    shapes = [p.shape for p in net.parameters()]
    sizes = [p.numel() for p in net.parameters()]
    flat0 = th.cat([p.detach().reshape(-1) for p in net.parameters()])

    def loss_of(flat: th.Tensor) -> th.Tensor:
        params = {k: c.view(s) for k, c, s in zip(names, flat.split(sizes), shapes)}
        return F.mse_loss(functional_call(net, params, (x,)), y)

    # Reverse-over-reverse (torch.func.hessian uses forward mode, whose first use is slow to set up).
    return th.func.jacrev(th.func.jacrev(loss_of))(flat0)


def test_hvp_matches_explicit_hessian():
    net, closure, x, y = tiny_problem()
    H = explicit_hessian(net, x, y)
    v = th.randn(21, generator=th.Generator().manual_seed(5), dtype=DT)
    th.testing.assert_close(hessian_vector_product(net, closure, v), H @ v, rtol=1e-10, atol=1e-12)


def test_lanczos_extreme_eigenvalues_match_eigvalsh():
    net, closure, x, y = tiny_problem()
    eigs = th.linalg.eigvalsh(explicit_hessian(net, x, y))
    out = hessian_spectrum(net, closure, order=100, num_vectors=1)  # capped at P = 21
    assert out["order"] == 21 and out["num_vectors"] == 1
    ritz, weights = out["ritz_values"], out["ritz_weights"]
    assert ritz.shape == weights.shape == (21,)
    assert float(weights.sum()) == pytest.approx(1.0, abs=1e-12)
    assert (weights >= 0).all()
    # With order = P and full re-orthogonalisation the Ritz values are the whole spectrum.
    th.testing.assert_close(ritz, eigs, rtol=0, atol=1e-8)
    assert out["top_eigenvalue"] == pytest.approx(float(eigs[-1]), abs=1e-8)
    assert float(ritz[0]) == pytest.approx(float(eigs[0]), abs=1e-8)
    # Four start vectors: each run finds the whole spectrum, pooled with a quarter of its weights.
    pooled = hessian_spectrum(net, closure, order=100)
    assert pooled["num_vectors"] == 4 and pooled["order"] == 21
    th.testing.assert_close(pooled["ritz_values"].reshape(21, 4), eigs[:, None].expand(21, 4), rtol=0, atol=1e-8)
    assert float(pooled["ritz_weights"].sum()) == pytest.approx(1.0, abs=1e-12)


def test_lanczos_float32_model():
    net, closure, x, y = tiny_problem(th.float32)
    eigs = th.linalg.eigvalsh(explicit_hessian(net.to(DT), x.to(DT), y.to(DT)))
    net.to(th.float32)
    out = hessian_spectrum(net, closure, order=21)
    scale = float(eigs.abs().max())
    assert out["top_eigenvalue"] == pytest.approx(float(eigs[-1]), abs=1e-5 * scale)
    assert float(out["ritz_values"][0]) == pytest.approx(float(eigs[0]), abs=1e-5 * scale)
    assert float(out["ritz_weights"].sum()) == pytest.approx(1.0, abs=1e-12)


class Quadratic(nn.Module):
    """loss = 1/2 sum_k c_k x_k^2: Hessian diag(c), known eigenvalues."""

    def __init__(self, c: th.Tensor) -> None:
        super().__init__()
        self.c = c
        self.x = nn.Parameter(th.linspace(-1.0, 1.0, len(c), dtype=DT))

    def loss(self) -> th.Tensor:
        return 0.5 * (self.c * self.x**2).sum()


def test_eps_hessian_rank_with_known_eigenvalues():
    c = th.tensor([5.0, 2.0, 0.5, 0.05, -0.02, -3.0], dtype=DT)
    model = Quadratic(c)
    out = hessian_spectrum(model, model.loss, order=6, eps=0.1, seed=3, num_vectors=1)
    th.testing.assert_close(out["ritz_values"], c.sort().values, rtol=0, atol=1e-10)
    assert out["top_eigenvalue"] == pytest.approx(5.0)
    # For a diagonal Hessian the weight of eigenvalue c_k is q_k^2, q the unit start vector.
    q = _start_vectors(6, seed=3, count=4)
    want = (q[:, c.abs() > 0.1] ** 2).sum(dim=1)
    assert out["eps_hessian_rank"] == pytest.approx(float(want[0]), abs=1e-10)
    assert 0.0 < out["eps_hessian_rank"] < 1.0
    # With four start vectors (the default), the mean of their four weights.
    pooled = hessian_spectrum(model, model.loss, order=6, eps=0.1, seed=3)
    assert pooled["eps_hessian_rank"] == pytest.approx(float(want.mean()), abs=1e-10)
    assert hessian_spectrum(model, model.loss, order=6, eps=0.0)["eps_hessian_rank"] == pytest.approx(1.0)
    assert hessian_spectrum(model, model.loss, order=6, eps=10.0)["eps_hessian_rank"] == 0.0
    # Averaged over start vectors it estimates the fraction of |lambda| > eps (4 of 6).
    mean = sum(hessian_spectrum(model, model.loss, order=6, seed=s)["eps_hessian_rank"] for s in range(50)) / 50
    assert mean == pytest.approx(4 / 6, abs=0.05)


def test_averaging_start_vectors_shrinks_the_error_of_the_eps_rank():
    # P = 12 eigenvalues, 8 of them with |lambda| > 0.1: the exact epsilon-Hessian-rank is 2/3. With exact
    # quadrature one vector's estimate is Beta(4, 2)-distributed: variance 2 f (1 - f) / (P + 2) = 0.0317.
    c = th.tensor([4.0, -3.0, 2.5, 2.0, 1.0, 0.8, -0.5, 0.3, 0.05, 0.02, -0.01, 0.0], dtype=DT)
    model = Quadratic(c)
    exact = 8 / 12

    def errors(num_vectors: int) -> th.Tensor:
        return (
            th.tensor(
                [
                    hessian_spectrum(model, model.loss, order=12, seed=s, num_vectors=num_vectors)["eps_hessian_rank"]
                    for s in range(300)
                ],
                dtype=DT,
            )
            - exact
        )

    one, four = errors(1), errors(4)
    # Both are unbiased; one vector's spread is the Beta law's, four vectors' is half of it (variance / 4).
    assert abs(float(one.mean())) < 0.03 and abs(float(four.mean())) < 0.015
    assert float(one.pow(2).mean()) == pytest.approx(2 * exact * (1 - exact) / 14, rel=0.2)
    assert float(four.pow(2).mean() / one.pow(2).mean()) == pytest.approx(0.25, abs=0.08)
    # Seed by seed: the four-vector estimate is within 0.1 of 2/3 far more often than one vector's.
    within_four, within_one = float((four.abs() < 0.1).double().mean()), float((one.abs() < 0.1).double().mean())
    assert within_four > 0.65 and within_one < 0.5


def test_early_breakdown_on_repeated_eigenvalues():
    # Only 2 distinct eigenvalues: the Krylov space is invariant after 2 steps.
    model = Quadratic(th.tensor([2.0, 2.0, 2.0, 0.0, 0.0], dtype=DT))
    out = hessian_spectrum(model, model.loss, order=5)
    assert out["order"] == 2
    pooled = th.tensor([0.0] * 4 + [2.0] * 4, dtype=DT)  # two Ritz values from each of the four runs
    th.testing.assert_close(out["ritz_values"], pooled, rtol=0, atol=1e-12)
    assert float(out["ritz_weights"].sum()) == pytest.approx(1.0)


def test_global_rng_params_and_grads_untouched():
    net, closure, _, _ = tiny_problem()
    for p in net.parameters():
        p.grad = th.full_like(p, 2.0)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    state = th.get_rng_state()
    a = hessian_spectrum(net, closure, order=8, seed=4)
    b = hessian_spectrum(net, closure, order=8, seed=4)
    assert th.equal(th.get_rng_state(), state)
    th.testing.assert_close(a["ritz_values"], b["ritz_values"])
    assert not th.allclose(hessian_spectrum(net, closure, order=8, seed=5)["ritz_values"], a["ritz_values"])
    for k, p in net.named_parameters():
        assert th.equal(p.detach(), before[k])
        assert th.equal(p.grad, th.full_like(p, 2.0))


def test_bad_inputs_raise_value_error():
    net, closure, x, y = tiny_problem()
    with pytest.raises(ValueError):
        hessian_spectrum(net, closure, order=0)
    with pytest.raises(ValueError):
        hessian_spectrum(net, closure, eps=-1.0)
    with pytest.raises(ValueError, match="num_vectors"):
        hessian_spectrum(net, closure, num_vectors=0)
    with pytest.raises(ValueError):
        hessian_vector_product(net, closure, th.ones(20, dtype=DT))  # P is 21
    with pytest.raises(ValueError):
        hessian_vector_product(net, closure, th.full((21,), float("nan"), dtype=DT))
    x_nan = x.clone()
    x_nan[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        hessian_spectrum(net, lambda: F.mse_loss(net(x_nan), y), order=4)
    with pytest.raises(ValueError):
        hessian_spectrum(net, lambda: (net(x) - y) ** 2, order=4)  # not a scalar
