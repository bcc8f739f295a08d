"""Gram-matrix probe: NTK Gram ``K = J J^T`` and loss-weighted Gram ``K_L = D^1/2 K D^1/2`` (GGN seen through data).

Source: Prakash et al. 2025, "Spectral Collapse Drives Loss of Plasticity" (the loss-weighted Gram / GGN link);
definitions as in ``docs/reference/metrics.md#gram-matrices``.

``f_i`` is the network's scalar output on probe sample ``i`` (``Q(s_i, a_i)`` for DQN, ``V(s_i)`` for PPO) and
``J`` the ``n x P`` Jacobian of the ``f_i`` w.r.t. the parameters. ``D = diag(l''(f_i))`` is the curvature of
the per-sample loss in the output. Since ``K_L = (D^1/2 J)(D^1/2 J)^T``, the non-zero eigenvalues of ``K_L / n``
equal those of the GGN ``J^T D J / n`` of the batch-mean loss. **Normalisation: the reported eigenvalues are
those of ``K / n`` and ``K_L / n``** (so ``top_eig_KL`` is the top GGN eigenvalue of the batch-mean loss).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch as th
from torch import nn
from torch.func import functional_call, grad, vmap

from rl_plasticity.probes._checks import check_finite, check_threshold
from rl_plasticity.probes.rank import effective_rank_from_spectrum
from rl_plasticity.probes.registry import ProbeInputs, ProbeResult, register_probe

OutputFn = Callable[[nn.Module, Any], th.Tensor]


class _OutputModule(nn.Module):
    """Wraps ``output_fn`` as a module, so ``functional_call`` can swap the parameters of ``model`` inside it."""

    def __init__(self, model: nn.Module, output_fn: OutputFn) -> None:
        super().__init__()
        self.model = model
        self.output_fn = output_fn

    def forward(self, inputs: Any) -> th.Tensor:
        return self.output_fn(self.model, inputs)


def _tree_map(fn: Callable[[th.Tensor], th.Tensor], tree: Any) -> Any:
    """Apply ``fn`` to the tensors of a tensor / tuple / NamedTuple / list / dict (other leaves kept)."""
    if isinstance(tree, th.Tensor):
        return fn(tree)
    if isinstance(tree, dict):
        return {k: _tree_map(fn, v) for k, v in tree.items()}
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return type(tree)(*(_tree_map(fn, v) for v in tree))
    if isinstance(tree, (tuple, list)):
        return type(tree)(_tree_map(fn, v) for v in tree)
    return tree


def _tensor_leaves(tree: Any) -> list[th.Tensor]:
    leaves: list[th.Tensor] = []

    def collect(t: th.Tensor) -> th.Tensor:
        leaves.append(t)
        return t

    _tree_map(collect, tree)
    return leaves


def huber_curvature(residuals: th.Tensor, delta: float = 1.0) -> th.Tensor:
    """Per-sample ``l''`` of the Huber loss: 1 where ``|r| < delta``, else 0 (docs/reference/metrics.md "Gram matrix
    ...").

    SB3's DQN loss ``F.smooth_l1_loss`` is Huber with ``delta = 1``: ``r^2 / 2`` inside, linear outside, so
    the second derivative is exactly 1 inside and 0 outside. Pass the result as ``loss_curvature``.

    :param residuals: ``(n,)`` residuals ``f_i - target_i``.
    :param delta: Huber threshold (default 1.0, SB3's smooth_l1).
    :return: ``(n,)`` tensor of 0/1 in the residuals' floating dtype, on their device.
    """
    if not isinstance(residuals, th.Tensor):
        raise ValueError(f"residuals must be a torch.Tensor, got {type(residuals).__name__}")
    check_finite("residuals", residuals)
    if not delta > 0:
        raise ValueError(f"delta must be > 0, got {delta}")
    dtype = residuals.dtype if residuals.is_floating_point() else th.get_default_dtype()
    return (residuals.detach().abs() < delta).to(dtype)


LossFn = Callable[[th.Tensor, th.Tensor], th.Tensor]


def loss_curvature(loss_fn: LossFn, outputs: th.Tensor, targets: th.Tensor) -> th.Tensor:
    """Per-sample ``D_i = l''(f_i)``: the second derivative of ``loss_fn(f, y_i)`` in ``f`` at ``f = f_i``.

    Computed by automatic differentiation (``torch.func``: ``vmap(grad(grad(loss_fn)))``), so it is the
    curvature of whatever per-sample loss the agent trains with: 1 inside and 0 outside ``|r| < 1`` for
    ``F.smooth_l1_loss`` (SB3's Huber, as :func:`huber_curvature`), 2 everywhere for ``F.mse_loss``
    (``r^2``). Pass the result as ``loss_curvature`` to :func:`gram_spectrum`.

    :param loss_fn: ``(f, y) -> loss`` on scalars (0-d tensors), e.g. ``torch.nn.functional.smooth_l1_loss``.
    :param outputs: ``(n,)`` outputs ``f_i``.
    :param targets: ``(n,)`` targets ``y_i`` (constants: no gradient flows into them).
    :return: ``(n,)`` tensor of ``l''(f_i)``, detached, in the outputs' dtype.
    :raises ValueError: mismatched shapes, NaN/inf, or a loss that does not return a scalar per sample.
    """
    if not isinstance(outputs, th.Tensor) or not isinstance(targets, th.Tensor) or outputs.dim() != 1:
        raise ValueError("outputs and targets must be tensors of shape (n,)")
    if targets.shape != outputs.shape:
        raise ValueError(f"targets must have the outputs' shape {tuple(outputs.shape)}, got {tuple(targets.shape)}")
    check_finite("outputs", outputs)
    check_finite("targets", targets)
    second = vmap(grad(grad(lambda f, y: loss_fn(f, y).reshape(()))))
    with th.no_grad():
        return second(outputs.detach(), targets.detach().to(outputs.dtype)).detach()


def _eig_summary(eigs: th.Tensor, eps: float) -> tuple[float, int, float]:
    """(erank, epsilon-rank, top eigenvalue) of a descending non-negative spectrum."""
    top = float(eigs[0])
    eps_rank = int((eigs > eps * top).sum()) if top > 0 else 0
    return float(effective_rank_from_spectrum(eigs)), eps_rank, top


def gram_spectrum(
    model: nn.Module,
    inputs: Any,
    output_fn: OutputFn,
    loss_curvature: th.Tensor | None = None,
    params: Iterable[str] | None = None,
    eps: float = 0.01,
) -> dict[str, Any]:
    """Spectra of the NTK Gram ``K = J J^T`` and the loss-weighted Gram ``K_L = D^1/2 K D^1/2``.

    Prakash et al. 2025; docs/reference/metrics.md "Gram matrix and Gauss-Newton curvature". With ``J`` the ``n x P``
    Jacobian of the per-sample outputs ``f_i`` and ``D = diag(loss_curvature)``, the eigenvalues of ``K / n``
    and ``K_L / n`` are reported (the non-zero ones of ``K_L / n`` are those of the GGN ``J^T D J / n``).

    **Calling convention.** ``output_fn(model, inputs) -> (n,)`` returns one scalar per sample, e.g.
    ``lambda m, x: m(x[0]).gather(1, x[1].long().view(-1, 1)).squeeze(1)`` with ``inputs = (obs, actions)``
    for ``Q(s, a)``, or ``lambda m, obs: m(obs).squeeze(-1)`` for ``V(s)``. It must call the model it is
    given (not a captured reference to it) and must treat samples independently (no batch norm): per-sample
    gradients are computed with ``torch.func`` as ``vmap(grad(f_i))`` over the leading dimension of every
    tensor in ``inputs``, with ``output_fn`` called on a batch of one (``(1, ...)`` slices) through
    ``functional_call``. The live parameters are never modified and no ``.grad`` is written.

    :param model: the network.
    :param inputs: a tensor or a (Named)tuple / list / dict of tensors, all with the batch as first dimension.
    :param output_fn: see above.
    :param loss_curvature: ``(n,)`` vector ``D_i = l''(f_i) >= 0``; None means MSE (``l = r^2 / 2``, all ones).
        Use :func:`loss_curvature` with the agent's per-sample loss (or :func:`huber_curvature` for SB3's
        DQN loss). (For ``F.mse_loss = r^2`` it is ``2 * ones``.)
    :param params: names (as in ``model.named_parameters()``) of the parameters to differentiate, e.g. the
        last k layers' weights and biases; default all parameters that require grad.
    :param eps: relative threshold of the epsilon-ranks (default 0.01, docs/reference/metrics.md).
    :return: ``erank_K``, ``eps_rank_K`` (count of eigenvalues ``> eps * max``), ``top_eig_K``, the same
        for ``KL``, ``frac_zero_curvature`` (fraction of samples with ``D_i = 0``), ``n``, and ``eigs_K``,
        ``eigs_KL`` (descending float64 CPU tensors).
    :raises ValueError: fewer than 2 samples, NaN/inf inputs, mismatched batch sizes, bad curvature, unknown
        parameter names or a wrong output shape.
    """
    check_threshold("eps", eps, 0.0, 1.0)
    leaves = _tensor_leaves(inputs)
    if not leaves:
        raise ValueError("inputs has no tensor")
    for leaf in leaves:
        if leaf.dim() == 0:
            raise ValueError("every tensor in inputs needs a leading batch dimension")
        if leaf.is_floating_point():
            check_finite("inputs", leaf)
    n = leaves[0].shape[0]
    if any(leaf.shape[0] != n for leaf in leaves):
        raise ValueError(f"all tensors in inputs must share the batch size, got {[leaf.shape[0] for leaf in leaves]}")
    if n < 2:
        raise ValueError(f"gram_spectrum needs at least 2 samples, got {n}")

    named = dict(model.named_parameters())
    if params is None:
        names = [k for k, p in named.items() if p.requires_grad]
    else:
        names = [params] if isinstance(params, str) else list(params)
        unknown = [k for k in names if k not in named]
        if unknown:
            raise ValueError(f"unknown parameter names {unknown}; choices: {list(named)}")
    if not names:
        raise ValueError("no parameter to differentiate")
    theta = {k: named[k].detach() for k in names}

    wrapper = _OutputModule(model, output_fn)
    # torch 2.13's functional_call does not restore a module registered under several paths (SB3's PPO
    # aliases its shared features extractor as pi_/vf_features_extractor): plain tensors were left in place
    # of the live Parameters, so the layer silently stopped training. Keep the originals to put them back.
    originals = [
        (module, key, p) for module in model.modules() for key, p in module._parameters.items() if p is not None
    ]

    def f_single(theta_: dict[str, th.Tensor], *sample_leaves: th.Tensor) -> th.Tensor:
        # Rebuild ``inputs`` with each tensor replaced by its (1, ...) slice; non-tensor fields are kept.
        slices = iter(sample_leaves)
        batch_of_one = _tree_map(lambda t: next(slices).unsqueeze(0), inputs)
        out = functional_call(wrapper, {f"model.{k}": v for k, v in theta_.items()}, (batch_of_one,))
        if not isinstance(out, th.Tensor) or out.numel() != 1:
            raise ValueError(
                f"output_fn must return one scalar per sample, shape (n,); on a batch of one it "
                f"returned {tuple(out.shape) if isinstance(out, th.Tensor) else type(out).__name__}"
            )
        return out.reshape(())

    # Per-sample gradients: one row of J per sample, without a Python loop.
    # Outer no_grad: torch.func.grad still differentiates w.r.t. ``theta``, but no graph is recorded back to
    # the parameters left out of ``params`` (they stay live nn.Parameters inside the call).
    try:
        with th.no_grad():
            per_sample = vmap(grad(f_single), in_dims=(None,) + (0,) * len(leaves))(theta, *leaves)
    finally:
        for module, key, p in originals:
            module._parameters[key] = p

    # K = sum over parameter blocks of J_k J_k^T, accumulated in float64 (avoids a float64 copy of all of J).
    K = None
    for k in names:
        Jk = per_sample[k].reshape(n, -1)
        block = (Jk @ Jk.T).to(th.float64)
        K = block if K is None else K + block
    assert K is not None
    check_finite("Gram matrix (non-finite gradients)", K)

    if loss_curvature is None:
        D = th.ones(n, dtype=th.float64, device=K.device)
    else:
        if not isinstance(loss_curvature, th.Tensor) or loss_curvature.shape != (n,):
            shape = tuple(loss_curvature.shape) if isinstance(loss_curvature, th.Tensor) else type(loss_curvature)
            raise ValueError(f"loss_curvature must be a tensor of shape ({n},), got {shape}")
        check_finite("loss_curvature", loss_curvature)
        D = loss_curvature.detach().to(device=K.device, dtype=th.float64)
        if (D < 0).any():
            raise ValueError("loss_curvature must be non-negative (D^1/2 is taken)")
    d = D.sqrt()
    KL = d[:, None] * K * d[None, :]

    # Symmetrise against rounding; eigenvalues of the PSD matrices, negative rounding noise clamped to 0.
    eigs_K = th.linalg.eigvalsh((K + K.T) / (2 * n)).clamp_min(0.0).flip(0)
    eigs_KL = th.linalg.eigvalsh((KL + KL.T) / (2 * n)).clamp_min(0.0).flip(0)
    erank_K, eps_rank_K, top_K = _eig_summary(eigs_K, eps)
    erank_KL, eps_rank_KL, top_KL = _eig_summary(eigs_KL, eps)
    return {
        "erank_K": erank_K,
        "eps_rank_K": eps_rank_K,
        "top_eig_K": top_K,
        "erank_KL": erank_KL,
        "eps_rank_KL": eps_rank_KL,
        "top_eig_KL": top_KL,
        "frac_zero_curvature": float((D == 0).to(th.float64).mean()),
        "n": int(n),
        "eigs_K": eigs_K.cpu(),
        "eigs_KL": eigs_KL.cpu(),
    }


_GRAM_KEYS = ("erank_K", "eps_rank_K", "erank_KL", "eps_rank_KL", "top_eig_K", "top_eig_KL", "frac_zero_curvature")


@register_probe(
    "gram",
    "heavy",
    tuple(f"gram_{key.lower()}" for key in _GRAM_KEYS),
    "curvature",
    charts=(("Gram", "gram_.*"),),
    order=60,
)
def _run(inputs: ProbeInputs, gram_size: int = 256) -> ProbeResult:
    """Empirical NTK Gram matrix K and loss-weighted K_L on the first gram_size samples: ranks, top eigenvalues."""
    model_inputs, output_fn, curvature = inputs.gram_inputs(min(gram_size, len(inputs.observations)))
    spec = gram_spectrum(inputs.module, model_inputs, output_fn, loss_curvature=curvature)
    return ProbeResult({f"gram_{key.lower()}/value": spec[key] for key in _GRAM_KEYS}, {})
