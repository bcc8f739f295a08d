"""Neural collapse (NC1-NC4) of value-head features.

Papyan, Han & Donoho 2020, "Prevalence of neural collapse during the terminal phase of deep learning
training", in the code form of Bonifazi et al. 2024; definitions follow ``docs/reference/metrics.md#neural-collapse``
("Neural collapse of value-head features").

``h`` is the value-head feature vector (the input of the last linear layer) and the class of a sample is
its greedy action, computed by the caller. Notation: ``N`` samples, ``C`` classes **present** in the batch,
class means ``mu_c``, global mean ``mu_G`` (the mean of all ``N`` samples, so the class means weighted by
their counts average to it), and ``M`` the ``C x d`` matrix whose rows are ``mu_c - mu_G``:

- ``Sigma_W = (1/N) sum_i (h_i - mu_{y_i})(h_i - mu_{y_i})^T``
- ``Sigma_B = (1/C) sum_c (mu_c - mu_G)(mu_c - mu_G)^T = M^T M / C``
- ``NC1 = trace(Sigma_W pinv(Sigma_B)) / C``
- ``NC2 = || M M^T / ||M M^T||_F - (I_C - 11^T/C) / sqrt(C - 1) ||_F``
- ``NC3 = || W_c / ||W_c||_F - M / ||M||_F ||_F`` (``W_c``: classifier rows of the present classes)
- ``NC4`` = fraction of samples whose nearest class mean (Euclidean) is their own class' mean.

Lower NC1-NC3 and higher NC4 mean more collapse.
"""

from __future__ import annotations

import math

import torch as th

from rl_plasticity.probes._checks import check_matrix
from rl_plasticity.probes.registry import ProbeInputs, ProbeResult, register_probe

__all__ = ["nc1_differentiable", "neural_collapse"]

# pinv(Sigma_B) keeps the singular values of M above this fraction of the largest one (eigenvalues of Sigma_B
# above 1e-16 of the largest). It is computed from the SVD of M (C x d) rather than of Sigma_B (d x d): cheaper,
# and without squaring round-off, the structural zero singular value of M (the count-weighted class means
# average to mu_G) stays near 1e-16 of the largest, far below the cutoff.
_PINV_RTOL = 1e-8
# Between-class scatter this small relative to the features' RMS norm counts as none: all class means
# coincide, and NC1-NC3 are undefined (0/0) rather than "perfectly collapsed".
_DEGENERATE_TOL = 1e-12
# Tikhonov term of the differentiable NC1, as a fraction of the mean eigenvalue of the class-mean Gram matrix.
_NC1_RIDGE = 1e-10


def _check_labels(labels: th.Tensor, n: int, device: th.device) -> th.Tensor:
    """Validate the class labels and return them on ``device``."""
    if not isinstance(labels, th.Tensor):
        raise ValueError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dim() != 1 or labels.shape[0] != n:
        raise ValueError(f"labels must be 1-D with one label per sample ({n}), got shape {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == th.bool:
        raise ValueError(f"labels must be integer class indices, got dtype {labels.dtype}")
    if (labels < 0).any():
        raise ValueError("labels must be non-negative class indices")
    return labels.to(device)


def _class_statistics(h: th.Tensor, labels: th.Tensor) -> tuple[th.Tensor, th.Tensor, th.Tensor, th.Tensor]:
    """Classes present (sorted), each sample's class position, the class counts and the class means ``(C, d)``."""
    classes, position, counts = th.unique(labels, sorted=True, return_inverse=True, return_counts=True)
    # Out-of-place index_add keeps the graph for the differentiable NC1.
    sums = th.zeros(len(classes), h.shape[1], dtype=h.dtype, device=h.device).index_add(0, position, h)
    return classes, position, counts, sums / counts.unsqueeze(1).to(h.dtype)


def _no_between_class_scatter(h: th.Tensor, centred_means: th.Tensor) -> bool:
    """True if all class means coincide (up to round-off), so NC1-NC3 are 0/0."""
    rms_feature_norm = h.detach().norm() / math.sqrt(h.shape[0])
    return bool(centred_means.detach().norm() <= _DEGENERATE_TOL * rms_feature_norm)


@th.no_grad()
def neural_collapse(
    features: th.Tensor, labels: th.Tensor, classifier_weight: th.Tensor | None = None
) -> dict[str, float | int]:
    """NC1-NC4 of the features, with the classes given by ``labels`` (Papyan et al. 2020).

    Formulas (module docstring): ``NC1 = trace(Sigma_W pinv(Sigma_B)) / C`` with ``Sigma_W`` over ``1/N``
    and ``Sigma_B = M^T M / C``; ``NC2 = ||M M^T / ||M M^T||_F - (I_C - 11^T/C) / sqrt(C - 1)||_F``;
    ``NC3 = ||W_c / ||W_c||_F - M / ||M||_F||_F``; ``NC4`` = nearest-class-mean agreement fraction.

    ``pinv(Sigma_B)`` is computed from the SVD of ``M`` as ``C V diag(1 / s_k^2) V^T`` over the singular
    values ``s_k`` of ``M`` above ``1e-8 s_1``; this equals the pseudo-inverse of ``M^T M / C``.

    Undefined values are ``float("nan")``, never an exception, so a training loop can log and count them:
    all of NC1-NC4 when fewer than two classes are present, and NC1-NC3 when all class means coincide
    (no between-class scatter: the ``pinv`` convention would report that as a perfect NC1 of 0).
    A zero ``W_c`` gives a NaN NC3.

    :param features: value-head features ``h``, shape ``(N, d)``.
    :param labels: class of each sample (its greedy action), integer tensor of shape ``(N,)``.
    :param classifier_weight: weight of the last linear layer, shape ``(num_actions, d)``; the rows of the
        classes present are used for NC3. NC3 is reported only when it is given.
    :return: ``{"nc1", "nc2", ["nc3",] "nc4": float, "num_classes": int}``, with ``num_classes`` = ``C``.
    :raises ValueError: bad shapes or dtypes, NaN/inf entries, negative labels, or a label with no row in
        ``classifier_weight``.
    """
    h = check_matrix("features", features)
    n, d = h.shape
    labels = _check_labels(labels, n, h.device)
    weight = None
    if classifier_weight is not None:
        weight = check_matrix("classifier_weight", classifier_weight).to(h.device)
        if weight.shape[1] != d:
            raise ValueError(f"classifier_weight must have {d} columns like features, got {tuple(weight.shape)}")
        if labels.max() >= weight.shape[0]:
            raise ValueError(f"label {labels.max().item()} has no row in classifier_weight {tuple(weight.shape)}")

    classes, position, _, means = _class_statistics(h, labels)
    num_classes = len(classes)
    nan = float("nan")
    result: dict[str, float | int] = {"nc1": nan, "nc2": nan}
    if weight is not None:
        result["nc3"] = nan
    result["nc4"] = nan
    result["num_classes"] = num_classes
    if num_classes < 2:
        return result

    # NC4 only needs the class means, so it is defined even without between-class scatter.
    distances = th.cdist(h, means, compute_mode="donot_use_mm_for_euclid_dist")
    result["nc4"] = (distances.argmin(dim=1) == position).double().mean().item()

    M = means - h.mean(dim=0)
    if _no_between_class_scatter(h, M):
        return result

    within = h - means[position]
    sigma_w = within.T @ within / n
    _, s, vh = th.linalg.svd(M, full_matrices=False)
    keep = s > _PINV_RTOL * s[0]
    v = vh[keep].T
    sigma_b_pinv = num_classes * (v / s[keep] ** 2) @ v.T  # pinv(M^T M / C)
    # trace(A B) = sum(A * B) for symmetric B, without the d x d x d product.
    result["nc1"] = ((sigma_w * sigma_b_pinv).sum() / num_classes).item()

    gram = M @ M.T
    etf = th.eye(num_classes, dtype=h.dtype, device=h.device) - 1.0 / num_classes
    result["nc2"] = (gram / gram.norm() - etf / math.sqrt(num_classes - 1)).norm().item()

    if weight is not None:
        w_c = weight[classes]
        weight_norm = w_c.norm()
        if weight_norm > 0:
            result["nc3"] = (w_c / weight_norm - M / M.norm()).norm().item()
    return result


def nc1_differentiable(features: th.Tensor, labels: th.Tensor) -> th.Tensor:
    """NC1 as a differentiable scalar tensor (for a regularizer); the graph to ``features`` is kept.

    Same value as ``neural_collapse(features, labels)["nc1"]`` (Papyan et al. 2020,
    ``NC1 = trace(Sigma_W pinv(Sigma_B)) / C``), computed so that the gradient stays finite.

    Differentiating ``pinv(Sigma_B)`` is only valid where its numerical rank is locally constant, and the
    result depends on where the rank cutoff falls: ``Sigma_B`` always has ``d - C + 1`` zero eigenvalues
    that round-off leaves slightly non-zero, and as two class means approach each other the value and
    gradient grow like ``1/gap^2`` and ``1/gap^3`` until the cutoff drops the direction and both jump.
    Instead the pseudo-inverse is solved in the ``(C - 1)``-dimensional class-mean subspace, with no cutoff
    and no decomposition to differentiate:

    1. The rows of ``M`` satisfy ``counts^T M = 0`` (the count-weighted class means average to ``mu_G``).
       With ``Q`` (``C x (C-1)``) an orthonormal basis of the complement of ``counts`` (a constant, from
       the class counts only), ``M = Q R`` with ``R = Q^T M``, so ``Sigma_B = R^T R / C`` exactly: the
       structural null direction is removed algebraically, not by a tolerance.
    2. For ``R`` of full row rank, ``pinv(R^T R) = R^T K^-2 R`` with ``K = R R^T``, so
       ``NC1 = trace(X Sigma_W X^T) = ||E X^T||_F^2 / N``, with ``X = K^-1 R`` from ``torch.linalg.solve``
       and ``E`` the rows ``h_i - mu_{y_i}``.
    3. ``K + lambda I`` is solved instead of ``K``, ``lambda = 1e-10 trace(K) / (C - 1)``, so that coinciding
       class means (``K`` singular) and ``d < C - 1`` still give a finite value and gradient. A direction of
       squared spread ``s^2`` is weighted ``s^2 / (s^2 + lambda)`` of its ``pinv`` value: a relative change
       of ``~1e-10`` for well-separated means, while a direction with no spread is dropped as ``pinv``
       drops it. Means that nearly coincide (``s^2`` below about ``lambda``) are damped smoothly instead of
       blowing up.

    The computation runs in float64 and the result is cast back to ``features``' dtype.

    :param features: value-head features ``h``, shape ``(N, d)``; may require grad.
    :param labels: class of each sample (its greedy action), integer tensor of shape ``(N,)``.
    :return: 0-dim tensor on ``features``' device. It is NaN, with no graph, where NC1 is undefined (fewer
        than two classes present, or all class means equal): callers skip the term if it is not finite.
    :raises ValueError: bad shapes or dtypes, NaN/inf entries or negative labels.
    """
    check_matrix("features", features)  # validation only: the returned copy is detached
    n = features.shape[0]
    labels = _check_labels(labels, n, features.device)
    h = features.to(th.float64)
    _, position, counts, means = _class_statistics(h, labels)
    num_classes = len(counts)
    M = means - h.mean(dim=0)
    if num_classes < 2 or _no_between_class_scatter(h, M):
        return th.tensor(float("nan"), dtype=features.dtype, device=features.device)

    # Q: the last C - 1 columns of a complete QR of the counts vector span its orthogonal complement.
    q, _ = th.linalg.qr(counts.to(h).unsqueeze(1), mode="complete")
    R = q[:, 1:].T @ M
    K = R @ R.T
    ridge = _NC1_RIDGE * th.trace(K) / (num_classes - 1)
    X = th.linalg.solve(K + ridge * th.eye(num_classes - 1, dtype=h.dtype, device=h.device), R)
    within = h - means[position]
    nc1 = (within @ X.T).pow(2).sum() / n
    return nc1.to(features.dtype)


@register_probe(
    "collapse",
    "light",
    ("nc1", "nc2", "nc3", "nc4", "num_classes"),
    "collapse",
    charts=tuple((tag, f"{tag}/.*") for tag in ("nc1", "nc2", "nc3", "nc4")),
    may_be_nan=("nc1", "nc2", "nc3", "nc4"),
    main=(("nc1", "NC1"),),
    order=30,
)
def _run(inputs: ProbeInputs) -> ProbeResult:
    """Neural collapse NC1-NC4 of the value-head features, classes = greedy action (DQN) or actor mode (PPO)."""
    nc = neural_collapse(inputs.features, inputs.labels, inputs.classifier)
    return ProbeResult({f"{key}/value_head": float(value) for key, value in nc.items()}, {})
