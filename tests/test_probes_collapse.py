"""Neural collapse NC1-NC4 on hand-worked examples, a simplex ETF and a numpy oracle."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch as th

from rl_plasticity.probes.collapse import nc1_differentiable, neural_collapse

F64 = th.float64


def balanced_two_class() -> tuple[th.Tensor, th.Tensor]:
    """Class 0: (-3, 1), (-1, -1), mean (-2, 0). Class 1: (1, 1), (3, -1), mean (2, 0). Global mean 0."""
    h = th.tensor([[-3.0, 1.0], [-1.0, -1.0], [1.0, 1.0], [3.0, -1.0]], dtype=F64)
    return h, th.tensor([0, 0, 1, 1])


def unbalanced_two_class() -> tuple[th.Tensor, th.Tensor]:
    """Class 0 as above; class 1: (2, 2), (2, 0), (2, -2), mean (2, 0). Global mean (0.4, 0)."""
    h = th.tensor([[-3.0, 1.0], [-1.0, -1.0], [2.0, 2.0], [2.0, 0.0], [2.0, -2.0]], dtype=F64)
    return h, th.tensor([0, 0, 1, 1, 1])


def simplex_etf(num_classes: int, d: int, seed: int) -> th.Tensor:
    """Rows: a C-class simplex ETF rotated into d dimensions (unit norms, pairwise cosines -1/(C-1))."""
    etf = math.sqrt(num_classes / (num_classes - 1)) * (th.eye(num_classes, dtype=F64) - 1.0 / num_classes)
    basis, _ = th.linalg.qr(th.randn(d, num_classes, generator=th.Generator().manual_seed(seed), dtype=F64))
    return etf @ basis.T


def samples_around(means: th.Tensor, per_class: int, noise: float, seed: int) -> tuple[th.Tensor, th.Tensor]:
    """``per_class`` samples per class, with noise that is centred per class so the class means are exact."""
    g = th.Generator().manual_seed(seed)
    num_classes, d = means.shape
    eps = noise * th.randn(num_classes, per_class, d, generator=g, dtype=F64)
    eps = eps - eps.mean(dim=1, keepdim=True)
    h = (means.unsqueeze(1) + eps).reshape(-1, d)
    return h, th.arange(num_classes).repeat_interleave(per_class)


def numpy_neural_collapse(h: np.ndarray, y: np.ndarray, w: np.ndarray) -> dict[str, float]:
    """Independent, literal implementation of the reference formulas."""
    classes = np.unique(y)
    n, C = len(h), len(classes)
    mu = np.stack([h[y == c].mean(axis=0) for c in classes])
    mu_g = h.mean(axis=0)
    sigma_w = (
        sum(
            np.outer(h[i] - mu[np.searchsorted(classes, y[i])], h[i] - mu[np.searchsorted(classes, y[i])])
            for i in range(n)
        )
        / n
    )
    sigma_b = sum(np.outer(mu[c] - mu_g, mu[c] - mu_g) for c in range(C)) / C
    nc1 = np.trace(sigma_w @ np.linalg.pinv(sigma_b, hermitian=True, rtol=1e-10)) / C
    M = mu - mu_g
    MMt = M @ M.T
    nc2 = np.linalg.norm(MMt / np.linalg.norm(MMt) - (np.eye(C) - np.ones((C, C)) / C) / np.sqrt(C - 1))
    wc = w[classes]
    nc3 = np.linalg.norm(wc / np.linalg.norm(wc) - M / np.linalg.norm(M))
    nearest = np.array([classes[np.argmin([np.linalg.norm(x - m) for m in mu])] for x in h])
    return {"nc1": nc1, "nc2": nc2, "nc3": nc3, "nc4": float(np.mean(nearest == y))}


def test_nc1_hand_computed_balanced():
    # Sigma_W = (1/4) * 4 * [[1, -1], [-1, 1]] (every deviation is +-(1, -1)), Sigma_B = (1/2)(4 + 4) e1 e1^T
    # = [[4, 0], [0, 0]], pinv(Sigma_B) = [[1/4, 0], [0, 0]], trace(Sigma_W pinv) = 1/4, NC1 = (1/4) / 2.
    h, y = balanced_two_class()
    result = neural_collapse(h, y)
    assert result["nc1"] == pytest.approx(0.125, rel=1e-12)
    # Two opposite class means are a 2-class simplex ETF.
    assert result["nc2"] == pytest.approx(0.0, abs=1e-12)
    # (-1, -1) and (1, 1) are sqrt(2) from their own mean, sqrt(10) from the other.
    assert result["nc4"] == 1.0
    assert result["num_classes"] == 2
    assert "nc3" not in result


def test_nc1_nc2_hand_computed_unbalanced():
    # mu_G = (0.4, 0) is the sample mean, so M rows are (-2.4, 0) and (1.6, 0).
    # Sigma_W = (1/5)(2 [[1, -1], [-1, 1]] + 2 [[0, 0], [0, 4]]) = [[0.4, -0.4], [-0.4, 2]].
    # Sigma_B = (1/2)(5.76 + 2.56) e1 e1^T = 4.16 e1 e1^T, pinv = e1 e1^T / 4.16.
    # NC1 = (0.4 / 4.16) / 2. (The mean of the class means, (0, 0), would give 0.05 instead.)
    h, y = unbalanced_two_class()
    result = neural_collapse(h, y)
    assert result["nc1"] == pytest.approx(0.2 / 4.16, rel=1e-12)
    # M M^T = m m^T with m = (-2.4, 1.6); the C = 2 ETF is v v^T with v = (1, -1)/sqrt(2).
    # NC2 = ||u u^T - v v^T||_F = sqrt(2 - 2 (u.v)^2) with (u.v)^2 = 16 / 16.64.
    assert result["nc2"] == pytest.approx(math.sqrt(2 - 2 * 16 / 16.64), rel=1e-12)


def test_nc1_zero_when_perfectly_collapsed():
    means = th.randn(3, 5, generator=th.Generator().manual_seed(0), dtype=F64)
    y = th.tensor([0, 1, 2, 2, 1, 0, 0, 2])
    result = neural_collapse(means[y], y)
    assert result["nc1"] == pytest.approx(0.0, abs=1e-20)
    assert result["nc4"] == 1.0
    assert nc1_differentiable(means[y], y).item() == pytest.approx(0.0, abs=1e-20)


def test_nc2_zero_for_simplex_etf():
    h, y = samples_around(simplex_etf(4, d=6, seed=1), per_class=5, noise=0.1, seed=2)
    assert neural_collapse(h, y)["nc2"] == pytest.approx(0.0, abs=1e-12)
    # Stretching one class mean breaks the equal norms of the ETF.
    means = simplex_etf(4, d=6, seed=1)
    means[0] *= 2.0
    h, y = samples_around(means, per_class=5, noise=0.1, seed=2)
    assert neural_collapse(h, y)["nc2"] > 0.1


def test_nc3_zero_for_scaled_class_means():
    h, y = balanced_two_class()
    M = th.tensor([[-2.0, 0.0], [2.0, 0.0]], dtype=F64)
    assert neural_collapse(h, y, classifier_weight=3.0 * M)["nc3"] == pytest.approx(0.0, abs=1e-12)
    # Only the rows of the present classes count: classes 1 and 3 of a 4-action head.
    weight = th.tensor([[9.0, 9.0], [-1.0, 0.0], [5.0, -7.0], [1.0, 0.0]], dtype=F64)
    assert neural_collapse(h, y * 2 + 1, classifier_weight=weight)["nc3"] == pytest.approx(0.0, abs=1e-12)
    # A rotated classifier: W_c/||W_c|| = (0, -1), (0, 1) over sqrt(2), M/||M|| = (-1, 0), (1, 0) over sqrt(2),
    # so the difference has squared Frobenius norm 4 * (1/2) = 2.
    rotated = th.tensor([[0.0, -1.0], [0.0, 1.0]], dtype=F64)
    assert neural_collapse(h, y, classifier_weight=rotated)["nc3"] == pytest.approx(math.sqrt(2.0), rel=1e-12)


def test_nc4_well_separated_and_hand_case():
    h, y = samples_around(10.0 * th.eye(3, 4, dtype=F64), per_class=6, noise=0.5, seed=3)
    assert neural_collapse(h, y)["nc4"] == 1.0
    # Class 0: 0, 0, 3 (mean 1); class 1: 4, 4 (mean 4). 3 is nearer to 4 than to 1: 4 of 5 agree.
    h = th.tensor([[0.0], [0.0], [3.0], [4.0], [4.0]], dtype=F64)
    assert neural_collapse(h, th.tensor([0, 0, 0, 1, 1]))["nc4"] == pytest.approx(0.8)


def test_single_class_is_nan_without_exception():
    h = th.randn(6, 3, generator=th.Generator().manual_seed(4))
    y = th.full((6,), 2)
    result = neural_collapse(h, y, classifier_weight=th.randn(4, 3))
    assert result["num_classes"] == 1
    assert set(result) == {"nc1", "nc2", "nc3", "nc4", "num_classes"}
    assert all(math.isnan(result[key]) for key in ("nc1", "nc2", "nc3", "nc4"))
    assert math.isnan(nc1_differentiable(h, y).item())


def test_coinciding_class_means_are_undefined():
    # Both classes have mean (0, 0): no between-class scatter, so NC1-NC3 are 0/0, not a perfect 0.
    h = th.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]], dtype=F64)
    y = th.tensor([0, 0, 1, 1])
    result = neural_collapse(h, y, classifier_weight=th.eye(2, dtype=F64))
    assert math.isnan(result["nc1"]) and math.isnan(result["nc2"]) and math.isnan(result["nc3"])
    assert result["nc4"] == 0.5  # every distance ties; argmin picks class 0
    assert math.isnan(nc1_differentiable(h, y).item())


def test_against_numpy_oracle():
    rng = np.random.default_rng(0)
    classes = np.array([0, 2, 5, 6])
    y = rng.choice(classes, size=60, p=[0.1, 0.2, 0.3, 0.4])
    centres = rng.normal(size=(8, 7)) * 2
    h = centres[y] + rng.normal(size=(60, 7))
    w = rng.normal(size=(8, 7))
    expected = numpy_neural_collapse(h, y, w)
    result = neural_collapse(th.from_numpy(h), th.from_numpy(y), classifier_weight=th.from_numpy(w))
    assert result["num_classes"] == 4
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, rel=1e-9), key
    # float32 inputs give the same answers to float32 precision.
    result32 = neural_collapse(th.from_numpy(h).float(), th.from_numpy(y), classifier_weight=th.from_numpy(w).float())
    for key in ("nc1", "nc2", "nc3"):
        assert result32[key] == pytest.approx(expected[key], rel=1e-5), key


def test_return_types_and_inputs_untouched():
    h, y = unbalanced_two_class()
    w = th.ones(2, 2, dtype=F64)
    copies = (h.clone(), y.clone(), w.clone())
    result = neural_collapse(h, y, classifier_weight=w)
    assert all(type(result[key]) is float for key in ("nc1", "nc2", "nc3", "nc4"))
    assert type(result["num_classes"]) is int
    assert all(th.equal(a, b) for a, b in zip((h, y, w), copies))


@pytest.mark.parametrize(
    ("features", "labels", "weight"),
    [
        (th.ones(4), th.zeros(4, dtype=th.long), None),  # 1-D features
        (th.ones(0, 3), th.zeros(0, dtype=th.long), None),  # no samples
        (th.tensor([[1.0, float("nan")], [0.0, 1.0]]), th.tensor([0, 1]), None),
        (th.ones(4, 2), th.zeros(3, dtype=th.long), None),  # one label short
        (th.ones(4, 2), th.zeros(4), None),  # float labels
        (th.ones(4, 2), th.tensor([0, 1, -1, 1]), None),  # negative label
        (th.ones(4, 2), th.tensor([0, 1, 0, 1]), th.ones(2, 3)),  # wrong classifier width
        (th.ones(4, 2), th.tensor([0, 1, 0, 2]), th.ones(2, 2)),  # label without a classifier row
        (th.ones(4, 2), th.tensor([0, 1, 0, 1]), th.full((2, 2), float("inf"))),
    ],
)
def test_bad_input_raises(features, labels, weight):
    with pytest.raises(ValueError):
        neural_collapse(features, labels, classifier_weight=weight)
    if weight is None:
        with pytest.raises(ValueError):
            nc1_differentiable(features, labels)


def test_differentiable_nc1_matches_and_gradient_is_correct():
    rng = np.random.default_rng(1)
    y = th.from_numpy(rng.integers(0, 4, size=40))
    h = th.from_numpy(rng.normal(size=(40, 6)) + 3 * rng.normal(size=(4, 6))[y.numpy()]).requires_grad_(True)
    value = nc1_differentiable(h, y)
    assert value.requires_grad and value.dim() == 0
    assert value.item() == pytest.approx(neural_collapse(h, y)["nc1"], rel=1e-8)
    # Finite differences on a smaller problem (gradcheck perturbs every entry).
    small_y = y[:12]
    small_h = h.detach()[:12, :3].clone().requires_grad_(True)
    assert th.autograd.gradcheck(lambda x: nc1_differentiable(x, small_y), (small_h,))
    assert nc1_differentiable(h.detach().float(), y).dtype == th.float32


def _coinciding_pair() -> tuple[th.Tensor, th.Tensor]:
    """Three classes, the means of classes 0 and 1 equal: Sigma_B has rank 1, the class-mean Gram is singular."""
    h, y = samples_around(
        th.tensor([[1.0, 2.0, 0.0, 0.0], [1.0, 2.0, 0.0, 0.0], [-3.0, 0.0, 1.0, 0.0]], dtype=F64),
        per_class=4,
        noise=0.3,
        seed=5,
    )
    return h, y


@pytest.mark.parametrize("case", ["simplex_etf", "coinciding_means", "fewer_dims_than_classes"])
def test_differentiable_nc1_gradient_finite_when_rank_deficient(case):
    if case == "simplex_etf":  # Sigma_B rank C - 1 < d with C - 1 equal non-zero eigenvalues
        h, y = samples_around(simplex_etf(4, d=8, seed=6), per_class=5, noise=0.05, seed=7)
    elif case == "coinciding_means":
        h, y = _coinciding_pair()
    else:  # d = 2 < C - 1 = 4
        h, y = samples_around(th.randn(5, 2, generator=th.Generator().manual_seed(8), dtype=F64), 4, 0.2, seed=9)
    h = h.clone().requires_grad_(True)
    value = nc1_differentiable(h, y)
    value.backward()
    assert th.isfinite(value) and h.grad is not None and th.isfinite(h.grad).all()
    assert value.item() == pytest.approx(neural_collapse(h, y)["nc1"], rel=1e-6)
