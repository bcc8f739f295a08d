"""Hessian spectrum probe: Hessian-vector products and stochastic Lanczos quadrature (SLQ).

Source: Prakash et al. 2025, "Spectral Collapse Drives Loss of Plasticity" (epsilon-Hessian-rank); SLQ as in
Ghorbani, Krishnan & Xiao 2019, "An Investigation into Neural Net Optimization via Hessian Eigenvalue
Density"; definitions as in ``docs/reference/metrics.md#hessian-spectrum``.

Lanczos run for ``k`` steps from a unit start vector ``v`` on the Hessian ``H`` gives a tridiagonal ``T_k``
with eigenpairs ``(theta_j, u_j)``. The spectral density of ``H`` seen from ``v`` is approximated by the
Ritz values ``theta_j`` with weights ``w_j = u_j[0]^2`` (these sum to 1). The epsilon-Hessian-rank is
``sum_j w_j [|theta_j| > eps]``: for a uniformly random ``v`` its expectation is the fraction of
eigenvalues of ``H`` with ``|lambda| > eps``.

One start vector is a one-sample estimate of that expectation. With exact quadrature (``k = P``) the weight
it puts on a fraction ``f`` of the ``P`` eigenvalues is ``Beta(f P / 2, (1 - f) P / 2)``, of variance
``2 f (1 - f) / (P + 2)``: large for small networks, and with ``k << P`` the quadrature adds its own
vector-dependent error. So, as SLQ does (Ubaru, Chen & Saad 2017, "Fast Estimation of tr(f(A)) via Stochastic
Lanczos Quadrature"; Ghorbani et al. 2019, Section 3), the densities of ``num_vectors`` independent start
vectors are averaged: the pooled Ritz values carry weights ``w_j / num_vectors``, and the variance of the
estimate falls by ``num_vectors``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch as th
from torch import nn

from rl_plasticity.probes._checks import check_finite, check_threshold
from rl_plasticity.probes.registry import ProbeInputs, ProbeResult, register_probe

LossClosure = Callable[[], th.Tensor]

# Daniel-Gragg-Kaufman-Stewart (1976): re-orthogonalise again if a pass left less than 1/sqrt(2) of the norm.
_DGKS = 0.7071067811865476


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameter")
    return params


def _loss(loss_closure: LossClosure) -> th.Tensor:
    loss = loss_closure()
    if not isinstance(loss, th.Tensor) or loss.numel() != 1:
        raise ValueError("loss_closure must return a scalar tensor")
    check_finite("loss", loss.detach())
    return loss.reshape(())


class _HVP:
    """Hessian-vector products that reuse one gradient graph (``create_graph``) for many vectors.

    Uses ``torch.autograd.grad`` only, so the parameters' ``.grad`` fields are never written.
    """

    def __init__(self, params: list[nn.Parameter], loss: th.Tensor) -> None:
        self.params = params
        self.numel = sum(p.numel() for p in params)
        if loss.requires_grad:
            grads = th.autograd.grad(loss, params, create_graph=True, allow_unused=True)
            self.grads = [g if g is not None else th.zeros_like(p) for g, p in zip(grads, params)]
        else:
            self.grads = [th.zeros_like(p) for p in params]

    def __call__(self, vector: th.Tensor) -> th.Tensor:
        chunks = vector.split([p.numel() for p in self.params])
        dot = sum((g * c.view_as(p).to(g.dtype)).sum() for g, c, p in zip(self.grads, chunks, self.params))
        if not (isinstance(dot, th.Tensor) and dot.requires_grad):  # gradient is constant: H = 0
            return th.zeros(self.numel, dtype=vector.dtype, device=vector.device)
        hv = th.autograd.grad(dot, self.params, retain_graph=True, allow_unused=True)
        return th.cat([(h if h is not None else th.zeros_like(p)).reshape(-1) for h, p in zip(hv, self.params)])


def _start_vectors(numel: int, seed: int, count: int = 1) -> th.Tensor:
    """``(count, numel)`` unit Gaussian start vectors (uniform on the sphere), drawn one after the other from a
    local CPU generator seeded ``seed``: the global RNG is untouched, and the first vector does not depend on
    ``count``."""
    generator = th.Generator(device="cpu").manual_seed(int(seed))
    v = th.stack([th.randn(numel, generator=generator, dtype=th.float64) for _ in range(count)])
    return v / v.norm(dim=1, keepdim=True)


def hessian_vector_product(model: nn.Module, loss_closure: LossClosure, vector: th.Tensor) -> th.Tensor:
    """``H v`` for the Hessian of ``loss_closure()`` w.r.t. all trainable parameters of ``model`` (Pearlmutter).

    :param model: the network; its parameters (and ``.grad`` fields) are left untouched.
    :param loss_closure: zero-argument callable returning the scalar training loss on a probe batch (built by
        calling ``model``), e.g. ``lambda: agent.training_loss(batch)[0]``.
    :param vector: flat vector of length P = number of trainable parameters, in ``model.parameters()`` order.
    :return: flat ``H v`` (length P) on the model's device, in the parameters' dtype.
    :raises ValueError: wrong vector shape, NaN/inf vector or loss.
    """
    params = _trainable(model)
    numel = sum(p.numel() for p in params)
    if not isinstance(vector, th.Tensor) or vector.shape != (numel,):
        shape = tuple(vector.shape) if isinstance(vector, th.Tensor) else type(vector).__name__
        raise ValueError(f"vector must have shape ({numel},) (number of trainable parameters), got {shape}")
    check_finite("vector", vector)
    hvp = _HVP(params, _loss(loss_closure))
    return hvp(vector.to(device=params[0].device, dtype=params[0].dtype))


def _lanczos(hvp: _HVP, start: th.Tensor, steps: int, dtype: th.dtype) -> tuple[th.Tensor, th.Tensor]:
    """Ritz values (ascending) and weights of ``steps`` Lanczos steps on ``hvp`` from the unit vector ``start``.

    Full re-orthogonalisation (classical Gram-Schmidt, repeated by the DGKS criterion); stops early if the
    Krylov space becomes invariant (``beta`` below rounding level), when the Ritz values are exact eigenvalues.
    """
    device = start.device
    numel = start.numel()
    # Below this |beta| (relative to the spectrum seen so far) the Krylov space is invariant up to rounding.
    breakdown = 100 * th.finfo(dtype).eps
    # The Lanczos vectors are kept in the parameters' precision (at least float32): the HVPs are no more
    # accurate than that, and the re-orthogonalisation reads the whole basis, so its size sets the cost.
    work = th.promote_types(dtype, th.float32)
    v = start.to(work)
    basis = th.zeros(steps, numel, dtype=work, device=device)
    alphas: list[float] = []
    betas: list[float] = []
    scale = 0.0
    for j in range(steps):
        basis[j] = v
        w = hvp(v.to(dtype)).to(work)
        check_finite("Hessian-vector product", w)
        alpha = float(w @ v)
        w = w - alpha * v
        if j > 0:
            w = w - betas[-1] * basis[j - 1]
        # Full re-orthogonalisation against the whole basis (classical Gram-Schmidt) keeps the Ritz values free
        # of spurious copies; a second pass only when the first cancelled much of w (DGKS criterion).
        for _ in range(2):
            norm_before = w.norm()
            w = w - basis[: j + 1].T @ (basis[: j + 1] @ w)
            if w.norm() > _DGKS * norm_before:
                break
        beta = float(w.norm())
        alphas.append(alpha)
        scale = max(scale, abs(alpha), beta)
        if j == steps - 1 or beta <= breakdown * max(scale, 1e-30):
            break
        betas.append(beta)
        v = w / beta

    m = len(alphas)
    T = th.diag(th.tensor(alphas, dtype=th.float64))
    if m > 1:
        off = th.tensor(betas[: m - 1], dtype=th.float64)
        T = T + th.diag(off, 1) + th.diag(off, -1)
    ritz_values, vectors = th.linalg.eigh(T)
    return ritz_values, vectors[0] ** 2


def hessian_spectrum(
    model: nn.Module,
    loss_closure: LossClosure,
    order: int = 100,
    eps: float = 0.1,
    seed: int = 0,
    num_vectors: int = 4,
) -> dict[str, Any]:
    """Stochastic Lanczos quadrature of the loss Hessian (Prakash et al. 2025; docs/reference/metrics.md "Hessian
    spectrum").

    For each of ``num_vectors`` Gaussian unit start vectors (drawn from a local ``torch.Generator(seed)``; the
    global RNG is not used), Lanczos with full re-orthogonalisation runs for ``k = min(order, P)`` steps (fewer
    if the Krylov space becomes invariant). The density estimate is the average of the runs' densities: all
    Ritz values, each with its run's weight divided by ``num_vectors``. ``loss_closure`` is called once; all
    products reuse its graph. The Lanczos vectors of one run are stored in the parameters' precision (float32
    for a float32 network: 0.4 GB per 1M parameters at order 100); the tridiagonal problems are float64.

    :param model: the network; parameters and ``.grad`` fields are left untouched.
    :param loss_closure: zero-argument callable returning the scalar training loss on the probe batch.
    :param order: number of Lanczos steps per start vector (default 100, docs/reference/metrics.md), capped at the
        parameter
        count P.
    :param eps: threshold of the epsilon-Hessian-rank on ``|lambda|`` (default 0.1, docs/reference/metrics.md).
    :param seed: seed of the start vectors.
    :param num_vectors: start vectors averaged over (default 4). The cost is ``num_vectors * k`` HVPs.
    :return: ``ritz_values`` (ascending) and ``ritz_weights`` (float64 CPU tensors, pooled over the runs;
        weights sum to 1), ``eps_hessian_rank`` (total weight of Ritz values with ``|lambda| > eps``: the mean
        over the runs), ``top_eigenvalue`` (largest Ritz value of all runs), ``order`` (the most Lanczos steps
        a run took) and ``num_vectors``.
    :raises ValueError: order < 1, num_vectors < 1, eps < 0, NaN/inf loss.
    """
    if int(order) != order or order < 1:
        raise ValueError(f"order must be a positive integer, got {order}")
    if int(num_vectors) != num_vectors or num_vectors < 1:
        raise ValueError(f"num_vectors must be a positive integer, got {num_vectors}")
    check_threshold("eps", eps, 0.0)
    params = _trainable(model)
    hvp = _HVP(params, _loss(loss_closure))
    k = min(int(order), hvp.numel)
    runs = [
        _lanczos(hvp, start.to(params[0].device), k, params[0].dtype)
        for start in _start_vectors(hvp.numel, seed, int(num_vectors))
    ]
    ritz_values, order_index = th.cat([values for values, _ in runs]).sort()
    ritz_weights = (th.cat([weights for _, weights in runs]) / len(runs))[order_index]
    return {
        "ritz_values": ritz_values,
        "ritz_weights": ritz_weights,
        "eps_hessian_rank": float(ritz_weights[ritz_values.abs() > eps].sum()),
        "top_eigenvalue": float(ritz_values[-1]),
        "order": max(len(values) for values, _ in runs),
        "num_vectors": len(runs),
    }


@register_probe(
    "hessian",
    "heavy",
    ("hessian_eps_rank", "hessian_top_eig"),
    "curvature",
    charts=(("Hessian", "hessian_.*"),),
    order=50,
)
def _run(inputs: ProbeInputs, hessian_order: int = 100, hessian_vectors: int = 4) -> ProbeResult:
    """Hessian spectrum of the agent's loss by stochastic Lanczos quadrature: top eigenvalue, epsilon-rank."""
    spec = hessian_spectrum(
        inputs.module, lambda: inputs.loss(inputs.batch), order=hessian_order, num_vectors=hessian_vectors
    )
    scalars = {"hessian_eps_rank/loss": spec["eps_hessian_rank"], "hessian_top_eig/loss": spec["top_eigenvalue"]}
    return ProbeResult(scalars, {"hessian_ritz_values/loss": spec["ritz_values"].float().cpu()})
