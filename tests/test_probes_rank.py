"""Feature-rank probes against matrices with known singular values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch as th
from hypothesis import given, settings
from hypothesis import strategies as st

from rl_plasticity.probes.rank import (
    approx_rank,
    effective_rank,
    effective_rank_differentiable,
    effective_rank_from_spectrum,
    effective_rank_psd_differentiable,
    epsilon_rank,
    lyle_feature_rank,
    singular_values,
    srank,
)

SIGMA = [4.0, 2.0, 1.0, 1e-3]
# exp(-sum p log p) with p = SIGMA / 7.001, worked out with math.log: the Roy & Vetterli formula.
ERANK_SIGMA = 2.603797243103654


def orthonormal(rows: int, cols: int, seed: int) -> th.Tensor:
    """A ``rows x cols`` matrix with orthonormal columns (QR of a seeded Gaussian)."""
    g = th.Generator().manual_seed(seed)
    q, _ = th.linalg.qr(th.randn(rows, cols, generator=g, dtype=th.float64))
    return q


def with_singular_values(sigma: list[float], n: int, d: int, seed: int = 0) -> th.Tensor:
    """``U diag(sigma) V^T`` with random orthonormal ``U`` (n x m) and ``V`` (d x m)."""
    m = len(sigma)
    return orthonormal(n, m, seed) @ th.diag(th.tensor(sigma, dtype=th.float64)) @ orthonormal(d, m, seed + 1).T


def all_ranks(F: th.Tensor) -> tuple:
    return (round(effective_rank(F), 9), srank(F), approx_rank(F), epsilon_rank(F), lyle_feature_rank(F))


def test_singular_values_descending_float64():
    F = th.diag(th.tensor([1.0, 4.0, 2.0]))
    s = singular_values(F)
    assert s.dtype == th.float64
    assert s.tolist() == [4.0, 2.0, 1.0]


def test_diagonal_hand_computed():
    F = th.diag(th.tensor(SIGMA, dtype=th.float64))
    p = [s / sum(SIGMA) for s in SIGMA]
    assert effective_rank(F) == pytest.approx(math.exp(-sum(q * math.log(q) for q in p)), rel=1e-12)
    assert effective_rank(F) == pytest.approx(ERANK_SIGMA, rel=1e-12)
    # Cumulative shares of sum(sigma) = 7.001: 0.571, 0.857, 0.99986, 1.
    assert srank(F) == 3
    # Cumulative shares of sum(sigma^2) = 21.000001: 0.762, 0.952, 0.99999995, 1.
    assert approx_rank(F) == 3
    # sigma / sigma_1 = 1, 0.5, 0.25, 0.00025.
    assert epsilon_rank(F) == 3
    # sigma / sqrt(4) = 2, 1, 0.5, 0.0005.
    assert lyle_feature_rank(F) == 3


def test_thresholds_change_the_answers():
    F = th.diag(th.tensor(SIGMA, dtype=th.float64))
    assert [srank(F, delta) for delta in (0.0, 0.01, 0.1, 0.2, 0.5, 1.0)] == [4, 3, 3, 2, 1, 1]
    # delta = 0.1 separates the two: 0.857 < 0.9 on sigma, 0.952 >= 0.9 on sigma^2.
    assert [approx_rank(F, delta) for delta in (0.0, 0.01, 0.1, 0.3)] == [4, 3, 2, 1]
    assert [epsilon_rank(F, eps) for eps in (1e-4, 0.01, 0.3, 0.5, 1.0)] == [4, 3, 2, 1, 0]
    assert [lyle_feature_rank(F, eps) for eps in (1e-4, 0.01, 0.6, 1.5, 2.0)] == [4, 3, 2, 1, 0]


def test_lyle_rank_scales_by_sqrt_n():
    # Same singular values, n = 16 rows: sigma / 4 = 1, 0.5, 0.25, 0.00025, so eps = 0.3 keeps two (it
    # would keep three with the n = 4 scaling of the square case).
    F = with_singular_values(SIGMA, n=16, d=4)
    assert lyle_feature_rank(F, eps=0.3) == 2
    assert lyle_feature_rank(th.diag(th.tensor(SIGMA, dtype=th.float64)), eps=0.3) == 3
    # The other ranks do not depend on n.
    assert all_ranks(F)[:4] == all_ranks(th.diag(th.tensor(SIGMA, dtype=th.float64)))[:4]


def test_rotation_invariance():
    # U diag(sigma) V^T with random orthogonal U, V: the same answers as the diagonal matrix.
    F = with_singular_values(SIGMA, n=4, d=4, seed=5)
    assert not th.allclose(F, th.diag(th.tensor(SIGMA, dtype=th.float64)))
    assert all_ranks(F) == all_ranks(th.diag(th.tensor(SIGMA, dtype=th.float64)))


def test_rank_deficient():
    # Singular values 3, 1, 0, 0 in a 10 x 6 matrix.
    F = with_singular_values([3.0, 1.0], n=10, d=6, seed=2)
    assert th.linalg.matrix_rank(F).item() == 2
    assert effective_rank(F) == pytest.approx(math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))))
    assert srank(F, delta=0.0) == approx_rank(F, delta=0.0) == epsilon_rank(F, eps=1e-9) == 2
    assert lyle_feature_rank(F, eps=1e-9) == 2


def test_duplicated_columns():
    # F = [x, x, z] with orthonormal x, z: F^T F has eigenvalues 2, 1, 0, so sigma = sqrt(2), 1, 0.
    xz = orthonormal(8, 2, seed=3)
    F = th.stack([xz[:, 0], xz[:, 0], xz[:, 1]], dim=1)
    assert singular_values(F)[:2].tolist() == pytest.approx([math.sqrt(2), 1.0])
    p = [math.sqrt(2) / (1 + math.sqrt(2)), 1 / (1 + math.sqrt(2))]
    assert effective_rank(F) == pytest.approx(math.exp(-sum(q * math.log(q) for q in p)), rel=1e-9)
    assert (srank(F), approx_rank(F), epsilon_rank(F), lyle_feature_rank(F)) == (2, 2, 2, 2)


def test_all_zero():
    F = th.zeros(5, 3)
    assert effective_rank(F) == 0.0
    assert (srank(F), approx_rank(F), epsilon_rank(F), lyle_feature_rank(F)) == (0, 0, 0, 0)
    assert effective_rank_differentiable(F).item() == 0.0


def test_return_types_and_input_untouched():
    F = th.randn(6, 4, generator=th.Generator().manual_seed(0))
    original = F.clone()
    assert type(effective_rank(F)) is float
    for probe in (srank, approx_rank, epsilon_rank, lyle_feature_rank):
        assert type(probe(F)) is int
    assert th.equal(F, original)


def test_against_numpy():
    rng = np.random.default_rng(0)
    F = rng.normal(size=(50, 12)) @ np.diag(np.geomspace(1, 1e-3, 12))
    s = np.linalg.svd(F, compute_uv=False)
    p = s / s.sum()
    assert effective_rank(th.from_numpy(F)) == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-10)
    assert srank(th.from_numpy(F)) == int(np.argmax(np.cumsum(s) / s.sum() >= 0.99)) + 1
    assert approx_rank(th.from_numpy(F)) == int(np.argmax(np.cumsum(s**2) / (s**2).sum() >= 0.99)) + 1
    assert epsilon_rank(th.from_numpy(F)) == int((s / s[0] > 0.01).sum())
    assert lyle_feature_rank(th.from_numpy(F)) == int((s / np.sqrt(50) > 0.01).sum())


@settings(max_examples=25, deadline=None)
@given(
    sigma=st.lists(st.floats(0.0, 10.0), min_size=1, max_size=6),
    extra_rows=st.integers(0, 4),
    seed=st.integers(0, 1000),
)
def test_bounds_and_rotation_property(sigma, extra_rows, seed):
    sigma = sorted(sigma, reverse=True)
    m = len(sigma)
    F = with_singular_values(sigma, n=m + extra_rows, d=m, seed=seed)
    if sum(sigma) == 0:
        assert all_ranks(F) == (0.0, 0, 0, 0, 0)
        return
    assert 1.0 - 1e-9 <= effective_rank(F) <= m + 1e-9
    for rank in (srank(F), approx_rank(F), epsilon_rank(F)):
        assert 1 <= rank <= m
    expected = effective_rank_from_spectrum(th.tensor(sigma, dtype=th.float64))
    assert effective_rank(F) == pytest.approx(expected, rel=1e-6)


def test_effective_rank_from_spectrum():
    assert effective_rank_from_spectrum(th.ones(4)) == pytest.approx(4.0)
    assert effective_rank_from_spectrum(th.tensor([3.0, 0.0, 0.0])) == pytest.approx(1.0)
    assert effective_rank_from_spectrum(th.tensor(SIGMA, dtype=th.float64)) == pytest.approx(ERANK_SIGMA, rel=1e-12)
    assert effective_rank_from_spectrum(th.zeros(3)) == 0.0
    # eigvalsh round-off below zero counts as 0; a real negative value is an error.
    assert effective_rank_from_spectrum(th.tensor([2.0, 2.0, -1e-14])) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="non-negative"):
        effective_rank_from_spectrum(th.tensor([2.0, -0.5]))
    for bad in (th.ones(2, 2), th.ones(0), th.tensor([1.0, float("nan")])):
        with pytest.raises(ValueError):
            effective_rank_from_spectrum(bad)


@pytest.mark.parametrize(
    "bad",
    [
        th.ones(5),
        th.ones(2, 3, 4),
        th.ones(0, 3),
        th.ones(3, 0),
        th.tensor([[1.0, float("nan")], [0.0, 1.0]]),
        th.tensor([[float("inf"), 1.0]]),
        np.ones((3, 3)),
    ],
)
def test_bad_input_raises(bad):
    for probe in (
        singular_values,
        effective_rank,
        srank,
        approx_rank,
        epsilon_rank,
        lyle_feature_rank,
        effective_rank_differentiable,
    ):
        with pytest.raises(ValueError):
            probe(bad)


def test_bad_thresholds_raise():
    F = th.eye(3)
    for call in (
        lambda: srank(F, -0.1),
        lambda: srank(F, 1.5),
        lambda: approx_rank(F, 2.0),
        lambda: epsilon_rank(F, -1.0),
        lambda: lyle_feature_rank(F, -1e-3),
    ):
        with pytest.raises(ValueError):
            call()


def test_differentiable_matches_and_keeps_graph():
    F = th.randn(20, 6, generator=th.Generator().manual_seed(1), dtype=th.float64, requires_grad=True)
    value = effective_rank_differentiable(F)
    assert value.requires_grad and value.dim() == 0 and value.dtype == th.float64
    assert value.item() == pytest.approx(effective_rank(F), rel=1e-12)
    assert th.autograd.gradcheck(effective_rank_differentiable, (F,))
    # float32 in, float32 out.
    assert effective_rank_differentiable(F.detach().float()).dtype == th.float32


@pytest.mark.parametrize("case", ["duplicated_columns", "rank_deficient", "repeated_nonzero", "all_zero"])
def test_differentiable_gradient_finite_when_rank_deficient(case):
    xz = orthonormal(8, 2, seed=4)
    F = (
        {
            "duplicated_columns": th.stack([xz[:, 0], xz[:, 0], xz[:, 1], xz[:, 1]], dim=1),
            "rank_deficient": with_singular_values([3.0, 1.0], n=10, d=6, seed=7),
            "repeated_nonzero": with_singular_values([2.0, 2.0, 2.0], n=6, d=5, seed=8),
            "all_zero": th.zeros(5, 4, dtype=th.float64),
        }[case]
        .clone()
        .requires_grad_(True)
    )
    value = effective_rank_differentiable(F)
    value.backward()
    assert value.item() == pytest.approx(effective_rank(F), rel=1e-9, abs=1e-12)
    assert F.grad is not None and th.isfinite(F.grad).all()


def test_psd_differentiable_matches_the_svd_form_on_gram_matrices():
    # erank of the eigenvalues of X X^T = erank of its singular values; gradients through X agree.
    X = th.randn(7, 12, generator=th.Generator().manual_seed(2), dtype=th.float64, requires_grad=True)
    by_eig = effective_rank_psd_differentiable(X @ X.T)
    (grad_eig,) = th.autograd.grad(by_eig, X)
    by_svd = effective_rank_differentiable(X @ X.T)
    (grad_svd,) = th.autograd.grad(by_svd, X)
    assert by_eig.item() == pytest.approx(by_svd.item(), rel=1e-10)
    assert by_eig.item() == pytest.approx(effective_rank(X @ X.T), rel=1e-10)
    th.testing.assert_close(grad_eig, grad_svd, rtol=1e-6, atol=1e-9)
    assert effective_rank_psd_differentiable((X @ X.T).detach().float()).dtype == th.float32
    with pytest.raises(ValueError, match="square"):
        effective_rank_psd_differentiable(X)


@pytest.mark.parametrize("case", ["rank_deficient", "repeated_nonzero", "all_zero"])
def test_psd_differentiable_gradient_finite_when_rank_deficient(case):
    X = (
        {
            "rank_deficient": with_singular_values([3.0, 1.0], n=10, d=6, seed=7),
            "repeated_nonzero": with_singular_values([2.0, 2.0, 2.0], n=6, d=5, seed=8),
            "all_zero": th.zeros(5, 4, dtype=th.float64),
        }[case]
        .clone()
        .requires_grad_(True)
    )
    value = effective_rank_psd_differentiable(X @ X.T)
    value.backward()
    assert value.item() == pytest.approx(effective_rank(X @ X.T), rel=1e-9, abs=1e-12)
    assert X.grad is not None and th.isfinite(X.grad).all()
