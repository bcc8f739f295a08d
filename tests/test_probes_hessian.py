"""Hessian probe: HVPs and Lanczos against the explicit Hessian (torch.func.hessian) and known spectra."""

from __future__ import annotations

import pytest
import torch as th
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from rl_plasticity.probes.hessian import _start_vector, hessian_spectrum, hessian_vector_product

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
    out = hessian_spectrum(net, closure, order=100)  # capped at P = 21
    assert out["order"] == 21
    ritz, weights = out["ritz_values"], out["ritz_weights"]
    assert ritz.shape == weights.shape == (21,)
    assert float(weights.sum()) == pytest.approx(1.0, abs=1e-12)
    assert (weights >= 0).all()
    # With order = P and full re-orthogonalisation the Ritz values are the whole spectrum.
    th.testing.assert_close(ritz, eigs, rtol=0, atol=1e-8)
    assert out["top_eigenvalue"] == pytest.approx(float(eigs[-1]), abs=1e-8)
    assert float(ritz[0]) == pytest.approx(float(eigs[0]), abs=1e-8)


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
    out = hessian_spectrum(model, model.loss, order=6, eps=0.1, seed=3)
    th.testing.assert_close(out["ritz_values"], c.sort().values, rtol=0, atol=1e-10)
    assert out["top_eigenvalue"] == pytest.approx(5.0)
    # For a diagonal Hessian the weight of eigenvalue c_k is q_k^2, q the unit start vector.
    q = _start_vector(6, seed=3)
    want = float((q[c.abs() > 0.1] ** 2).sum())
    assert out["eps_hessian_rank"] == pytest.approx(want, abs=1e-10)
    assert 0.0 < out["eps_hessian_rank"] < 1.0
    assert hessian_spectrum(model, model.loss, order=6, eps=0.0)["eps_hessian_rank"] == pytest.approx(1.0)
    assert hessian_spectrum(model, model.loss, order=6, eps=10.0)["eps_hessian_rank"] == 0.0
    # Averaged over start vectors it estimates the fraction of |lambda| > eps (4 of 6).
    mean = sum(hessian_spectrum(model, model.loss, order=6, seed=s)["eps_hessian_rank"] for s in range(200)) / 200
    assert mean == pytest.approx(4 / 6, abs=0.05)


def test_early_breakdown_on_repeated_eigenvalues():
    # Only 2 distinct eigenvalues: the Krylov space is invariant after 2 steps.
    model = Quadratic(th.tensor([2.0, 2.0, 2.0, 0.0, 0.0], dtype=DT))
    out = hessian_spectrum(model, model.loss, order=5)
    assert out["order"] == 2
    th.testing.assert_close(out["ritz_values"], th.tensor([0.0, 2.0], dtype=DT), rtol=0, atol=1e-12)
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
