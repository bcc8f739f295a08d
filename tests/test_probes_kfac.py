"""K-FAC probe: factors against explicit per-sample computations, the empirical-Fisher block, KFC for Conv2d."""

from __future__ import annotations

import math

import pytest
import torch as th
import torch.nn.functional as F
from torch import nn

from rl_plasticity.probes.kfac import kfac_factor_rows, kfac_factors, kfac_spectrum, kfac_spectrum_from_rows
from rl_plasticity.probes.rank import effective_rank_from_spectrum

DT = th.float64


def mse_loss_fn(model: nn.Module, batch: tuple[th.Tensor, th.Tensor]) -> th.Tensor:
    """Batch-mean loss; per-sample loss l_i = mean_k (f_ik - y_ik)^2."""
    x, y = batch
    return F.mse_loss(model(x), y)


def tiny_mlp(seed: int = 0) -> nn.Sequential:
    th.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).to(DT)


def make_batch(n: int, d_in: int = 3, d_out: int = 2, seed: int = 1) -> tuple[th.Tensor, th.Tensor]:
    g = th.Generator().manual_seed(seed)
    return th.randn(n, d_in, generator=g, dtype=DT), th.randn(n, d_out, generator=g, dtype=DT)


def explicit_mlp_factors(net: nn.Sequential, x: th.Tensor, y: th.Tensor) -> dict[str, tuple[th.Tensor, th.Tensor]]:
    """Loop over samples: a_i = [input, 1], g_i = d l_i / d s_i with the per-sample loss l_i."""
    n = x.shape[0]
    A = {"0": th.zeros(4, 4, dtype=DT), "2": th.zeros(5, 5, dtype=DT)}
    G = {"0": th.zeros(4, 4, dtype=DT), "2": th.zeros(2, 2, dtype=DT)}
    for i in range(n):
        xi = x[i : i + 1]
        s1 = net[0](xi)
        h = net[1](s1)
        s2 = net[2](h)
        li = F.mse_loss(s2, y[i : i + 1])
        g1, g2 = th.autograd.grad(li, [s1, s2])
        for name, a, g in (("0", xi, g1), ("2", h, g2)):
            a1 = th.cat([a[0].detach(), th.ones(1, dtype=DT)])
            A[name] += th.outer(a1, a1) / n
            G[name] += th.outer(g[0], g[0]) / n
    return {k: (A[k], G[k]) for k in A}


def test_factors_match_explicit_per_sample_loop():
    net = tiny_mlp()
    x, y = make_batch(7)
    got = kfac_factors(net, (x, y), mse_loss_fn)
    want = explicit_mlp_factors(net, x, y)
    assert set(got) == {"0", "2"}
    for name in want:
        assert got[name][0].shape == want[name][0].shape
        th.testing.assert_close(got[name][0], want[name][0], rtol=1e-10, atol=1e-12)
        th.testing.assert_close(got[name][1], want[name][1], rtol=1e-10, atol=1e-12)


def test_layers_subset_and_unknown_layer():
    net = tiny_mlp()
    x, y = make_batch(5)
    got = kfac_factors(net, (x, y), mse_loss_fn, layers=["2"])
    assert list(got) == ["2"]
    with pytest.raises(ValueError):
        kfac_factors(net, (x, y), mse_loss_fn, layers=["1"])  # the ReLU is not a Linear/Conv2d


def per_sample_vec_grads(layer: nn.Linear, x: th.Tensor, y: th.Tensor) -> th.Tensor:
    """Rows: column-stacked vec([grad W, grad b]) of each per-sample loss (the order A (x) G acts on)."""
    rows = []
    for i in range(x.shape[0]):
        li = F.mse_loss(layer(x[i : i + 1]), y[i : i + 1])
        gw, gb = th.autograd.grad(li, [layer.weight, layer.bias])
        w_aug = th.cat([gw, gb[:, None]], dim=1)  # (d_out, d_in + 1)
        rows.append(w_aug.T.reshape(-1))  # column stacking
    return th.stack(rows)


def test_single_linear_layer_is_exact_empirical_fisher_for_one_sample():
    # K-FAC equals the empirical Fisher block exactly when E[a a^T (x) g g^T] = E[a a^T] (x) E[g g^T]:
    # always for a batch of one, and for any batch whose inputs a_i are all equal (targets may differ).
    th.manual_seed(0)
    layer = nn.Linear(3, 2).to(DT)
    x, y = make_batch(1)
    ((A, G),) = kfac_factors(layer, (x, y), mse_loss_fn).values()
    J = per_sample_vec_grads(layer, x, y)
    th.testing.assert_close(th.kron(A, G), J.T @ J, rtol=1e-12, atol=1e-14)

    x_same = x.expand(6, 3).clone()
    _, y6 = make_batch(6)
    ((A, G),) = kfac_factors(layer, (x_same, y6), mse_loss_fn).values()
    J = per_sample_vec_grads(layer, x_same, y6)
    th.testing.assert_close(th.kron(A, G), J.T @ J / 6, rtol=1e-12, atol=1e-14)


def test_single_linear_layer_general_batch_error_is_the_cross_covariance_term():
    # For a general batch, EF - A (x) G = (1/n) sum_i (a_i a_i^T - A) (x) (g_i g_i^T - G) exactly; on this
    # seeded batch (n = 16, Linear(3, 2), MSE) the relative Frobenius error of K-FAC is 0.30.
    th.manual_seed(0)
    layer = nn.Linear(3, 2).to(DT)
    x, y = make_batch(16)
    ((A, G),) = kfac_factors(layer, (x, y), mse_loss_fn).values()
    J = per_sample_vec_grads(layer, x, y)
    ef = J.T @ J / 16
    cross = th.zeros_like(ef)
    for i in range(16):
        a = th.cat([x[i], th.ones(1, dtype=DT)])
        out = layer(x[i : i + 1])
        g = th.autograd.grad(F.mse_loss(out, y[i : i + 1]), out)[0][0]
        cross += th.kron(th.outer(a, a) - A, th.outer(g, g) - G) / 16
    th.testing.assert_close(ef - th.kron(A, G), cross, rtol=1e-10, atol=1e-13)
    rel = float((ef - th.kron(A, G)).norm() / ef.norm())
    assert rel == pytest.approx(0.3005, abs=1e-3)  # K-FAC is an approximation here, not the exact block


class UnfoldedConv(nn.Module):
    """The Conv2d computed as F.unfold -> Linear on (n, T, C*kh*kw) -> reshape: a Linear with weight sharing."""

    def __init__(self, conv: nn.Conv2d, out_hw: tuple[int, int], pad: tuple[int, int, int, int]) -> None:
        super().__init__()
        self.conv = conv
        self.lin = nn.Linear(
            conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1], conv.out_channels, bias=conv.bias is not None
        ).to(DT)
        with th.no_grad():
            self.lin.weight.copy_(conv.weight.reshape(conv.out_channels, -1))
            if conv.bias is not None:
                self.lin.bias.copy_(conv.bias)
        self.out_hw, self.pad = out_hw, pad

    def forward(self, x: th.Tensor) -> th.Tensor:
        patches = F.unfold(
            F.pad(x, self.pad), self.conv.kernel_size, dilation=self.conv.dilation, stride=self.conv.stride
        ).transpose(1, 2)
        s = self.lin(patches)  # (n, T, C_out)
        return s.transpose(1, 2).reshape(x.shape[0], -1, *self.out_hw)


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize(
    "conv_kw, pad",
    [
        (dict(kernel_size=3), (0, 0, 0, 0)),
        (dict(kernel_size=2, stride=2, padding=1), (1, 1, 1, 1)),
        (dict(kernel_size=2, padding="same", bias=False), (0, 1, 0, 1)),  # asymmetric 'same' padding
    ],
)
def test_conv2d_matches_unfolded_linear_and_the_spec_formula(conv_kw, pad):
    th.manual_seed(0)
    conv = nn.Conv2d(2, 3, **conv_kw).to(DT)
    n = 5
    gen = th.Generator().manual_seed(3)
    x = th.randn(n, 2, 6, 6, generator=gen, dtype=DT)
    out_hw = tuple(conv(x).shape[-2:])
    head = nn.Linear(3 * out_hw[0] * out_hw[1], 2).to(DT)
    y = th.randn(n, 2, generator=gen, dtype=DT)
    conv_net = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), head)
    unfolded_net = nn.Sequential(UnfoldedConv(conv, out_hw, pad), nn.Tanh(), nn.Flatten(), head)
    th.testing.assert_close(conv_net(x), unfolded_net(x))

    got = kfac_factors(conv_net, (x, y), mse_loss_fn)["0"]
    ref = kfac_factors(unfolded_net, (x, y), mse_loss_fn)["0.lin"]
    th.testing.assert_close(got[0], ref[0], rtol=1e-10, atol=1e-12)
    th.testing.assert_close(got[1], ref[1], rtol=1e-10, atol=1e-12)

    # docs/reference/metrics.md: patches and output gradients averaged over samples and positions, g = n dL/ds
    # (KFC, Grosse & Martens 2016, sums A over positions instead: T times this A).
    a = F.unfold(F.pad(x, pad), conv.kernel_size, stride=conv.stride).transpose(1, 2)
    if conv.bias is not None:
        a = th.cat([a, th.ones(*a.shape[:2], 1, dtype=DT)], dim=-1)
    s = conv(x)
    loss = F.mse_loss(head(th.tanh(s).flatten(1)), y)
    g = th.autograd.grad(loss, s)[0].reshape(n, 3, -1).transpose(1, 2) * n
    T = a.shape[1]
    A = th.einsum("nti,ntj->ij", a, a) / (n * T)
    G = th.einsum("nti,ntj->ij", g, g) / (n * T)
    th.testing.assert_close(got[0], A, rtol=1e-10, atol=1e-12)
    th.testing.assert_close(got[1], G, rtol=1e-10, atol=1e-12)


def test_no_grad_calls_are_ignored_and_model_is_untouched():
    net = tiny_mlp()
    x, y = make_batch(6)
    x2, _ = make_batch(6, seed=9)
    sentinel = {name: th.full_like(p, 7.0) for name, p in net.named_parameters()}
    for name, p in net.named_parameters():
        p.grad = sentinel[name].clone()
    before = {k: v.clone() for k, v in net.state_dict().items()}

    def loss_with_target(model, batch):
        with th.no_grad():  # e.g. the Double-DQN target: not part of the gradient
            model(x2)
        return mse_loss_fn(model, batch)

    rng = th.get_rng_state()
    got = kfac_factors(net, (x, y), loss_with_target)
    want = kfac_factors(net, (x, y), mse_loss_fn)
    assert th.equal(th.get_rng_state(), rng)
    for name in want:
        th.testing.assert_close(got[name][0], want[name][0])
        th.testing.assert_close(got[name][1], want[name][1])
    for name, p in net.named_parameters():
        assert th.equal(p.grad, sentinel[name]), f"{name}.grad changed"
        assert th.equal(p.detach(), before[name])
    assert all(not m._forward_hooks for m in net.modules())


def test_hooks_removed_on_error():
    net = tiny_mlp()
    x, y = make_batch(4)

    def failing(model, batch):
        model(batch[0])
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        kfac_factors(net, (x, y), failing)
    assert all(not m._forward_hooks for m in net.modules())


def test_inplace_relu_does_not_corrupt_output_gradient():
    th.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(inplace=True), nn.Linear(4, 2)).to(DT)
    x, y = make_batch(7)
    ref = tiny_mlp()
    ref.load_state_dict(net.state_dict())
    got, want = kfac_factors(net, (x, y), mse_loss_fn), explicit_mlp_factors(ref, x, y)
    th.testing.assert_close(got["0"][1], want["0"][1], rtol=1e-10, atol=1e-12)


def test_kfac_spectrum_on_hand_made_factors():
    gen = th.Generator().manual_seed(0)
    Q, _ = th.linalg.qr(th.randn(3, 3, generator=gen, dtype=DT))
    A = Q @ th.diag(th.tensor([4.0, 1.0, 0.0], dtype=DT)) @ Q.T
    G = th.diag(th.tensor([0.5, 2.0], dtype=DT))
    out = kfac_spectrum(A, G)
    assert out["top_eig_A"] == pytest.approx(4.0)
    assert out["top_eig_G"] == pytest.approx(2.0)
    assert out["top_eig_product"] == pytest.approx(8.0)
    entropy = -(0.8 * math.log(0.8) + 0.2 * math.log(0.2))
    assert out["erank_A"] == pytest.approx(math.exp(entropy))
    assert out["erank_G"] == pytest.approx(math.exp(entropy))
    # Products {8, 2, 2, 0.5, 0, 0}: 4 of 6 exceed 1e-3 * 8; only 1 exceeds 0.3 * 8.
    assert out["kfac_eps_rank"] == pytest.approx(4 / 6)
    assert kfac_spectrum(A, G, eps=0.3)["kfac_eps_rank"] == pytest.approx(1 / 6)
    th.testing.assert_close(out["eigs_A"], th.tensor([4.0, 1.0, 0.0], dtype=DT), atol=1e-12, rtol=0)
    th.testing.assert_close(out["eigs_G"], th.tensor([2.0, 0.5], dtype=DT))
    assert isinstance(out["erank_A"], float) and isinstance(out["kfac_eps_rank"], float)
    zero = kfac_spectrum(th.zeros(2, 2), th.eye(2))
    assert zero["kfac_eps_rank"] == 0.0 and zero["erank_A"] == 0.0


def test_erank_of_kronecker_product_is_product_of_eranks():
    gen = th.Generator().manual_seed(1)
    X, Y = th.randn(5, 4, generator=gen, dtype=DT), th.randn(3, 3, generator=gen, dtype=DT)
    A, G = X @ X.T, Y @ Y.T  # A is rank 4 of 5: one (numerically) zero eigenvalue
    out = kfac_spectrum(A, G)
    kron_eigs = th.linalg.eigvalsh(th.kron(A, G)).clamp_min(0.0)
    assert effective_rank_from_spectrum(kron_eigs) == pytest.approx(out["erank_A"] * out["erank_G"], rel=1e-9)
    products = th.outer(out["eigs_A"], out["eigs_G"]).flatten().sort().values
    th.testing.assert_close(products, kron_eigs.sort().values, rtol=1e-9, atol=1e-9)


def test_bad_inputs_raise_value_error():
    net = tiny_mlp()
    x, y = make_batch(4)
    x_nan = x.clone()
    x_nan[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        kfac_factors(net, (x_nan, y), mse_loss_fn)
    with pytest.raises(ValueError):  # empty batch
        kfac_factors(net, (x[:0], y[:0]), mse_loss_fn)
    with pytest.raises(ValueError):  # not a scalar loss
        kfac_factors(net, (x, y), lambda m, b: (m(b[0]) - b[1]) ** 2)
    with pytest.raises(ValueError):
        kfac_spectrum(th.ones(3, 2, dtype=DT), th.eye(2))  # not square
    with pytest.raises(ValueError):
        kfac_spectrum(th.ones(3, dtype=DT), th.eye(2))  # 1-D
    with pytest.raises(ValueError):
        kfac_spectrum(th.tensor([[1.0, 2.0], [0.0, 1.0]]), th.eye(2))  # not symmetric
    with pytest.raises(ValueError):
        kfac_spectrum(th.eye(2), th.full((2, 2), float("nan")))
    with pytest.raises(ValueError):
        kfac_spectrum(th.eye(2), th.eye(2), eps=-0.1)


@pytest.mark.parametrize("n", [5, 40])  # fewer and more rows than the 17-wide A (d_in 16 + bias)
def test_spectrum_from_rows_equals_spectrum_of_the_factors(n):
    # The monitor's path: eigenvalues from the smaller Gram of the rows, zero-padded to the factor's side.
    gen = th.Generator().manual_seed(3)
    model = nn.Sequential(nn.Linear(16, 9), nn.ReLU(), nn.Linear(9, 3))
    x, y = th.randn(n, 16, generator=gen), th.randn(n, 3, generator=gen)

    def loss_fn(m, xy):
        return F.mse_loss(m(xy[0]), xy[1])

    factors = kfac_factors(model, (x, y), loss_fn)
    rows = kfac_factor_rows(model, (x, y), loss_fn)
    assert factors.keys() == rows.keys()
    for name, (A, G) in factors.items():
        a_rows, g_rows = rows[name]
        th.testing.assert_close(a_rows.T @ a_rows / n, A)
        expected, got = kfac_spectrum(A, G), kfac_spectrum_from_rows(a_rows, g_rows)
        assert got["eigs_A"].shape == expected["eigs_A"].shape and got["eigs_G"].shape == expected["eigs_G"].shape
        th.testing.assert_close(got["eigs_A"], expected["eigs_A"], atol=1e-10, rtol=1e-8)
        th.testing.assert_close(got["eigs_G"], expected["eigs_G"], atol=1e-10, rtol=1e-8)
        for key in ("top_eig_A", "top_eig_G", "top_eig_product", "erank_A", "erank_G", "kfac_eps_rank"):
            assert got[key] == pytest.approx(expected[key], rel=1e-8, abs=1e-12), key
    # With 5 samples the 17-wide A has rank <= 5: at least 12 eigenvalues are exactly zero.
    if n == 5:
        assert int((kfac_spectrum_from_rows(*rows["0"])["eigs_A"] == 0).sum()) >= 12


def test_spectrum_from_rows_rejects_mismatched_rows():
    with pytest.raises(ValueError, match="same m"):
        kfac_spectrum_from_rows(th.ones(4, 3), th.ones(5, 2))
    with pytest.raises(ValueError, match="NaN|finite"):
        kfac_spectrum_from_rows(th.full((4, 3), float("nan")), th.ones(4, 2))
