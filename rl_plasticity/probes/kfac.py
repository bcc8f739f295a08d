"""K-FAC curvature probe: per-layer Kronecker factors of the agent's own training loss and their spectra.

Sources: Martens & Grosse 2015, "Optimizing Neural Networks with Kronecker-factored Approximate Curvature"
(Linear layers), and Grosse & Martens 2016, "A Kronecker-factored approximate Fisher matrix for convolution
layers" (KFC, Conv2d layers). Definitions as in ``docs/reference/metrics.md#k-fac-curvature``, section
"Curvature (K-FAC)".

Conventions (read these before comparing numbers with another library):

* **Per-sample gradients.** ``loss_fn`` returns the batch-*mean* loss ``L = (1/n) sum_i l_i`` (SB3's losses
  are means). K-FAC is defined on per-sample gradients ``g_i = dl_i/ds_i``; since ``dL/ds_i = g_i / n``, the
  captured output gradients are multiplied by the batch size ``n`` (the leading dimension of the layer
  input). So ``A (x) G`` estimates the empirical Fisher ``(1/n) sum_i vec(dl_i/dW) vec(dl_i/dW)^T``.
* **Vectorisation.** With ``W~ = [W, b]`` of shape ``(d_out, d_in + 1)`` (bias as an extra column), the
  gradient of one sample is ``g a^T`` and ``A (x) G`` acts on the *column-stacked* ``vec(W~)``. (With a
  row-major ``W~.flatten()`` the block is ``G (x) A``; the spectrum is the same.)
* **Weight sharing (Conv2d, and Linear applied to inputs with extra middle dimensions).** As docs/reference/metrics.md
  says, the unfolded patches are *averaged* over the ``T`` spatial positions (output pixels), and so are the
  per-position output gradients::

      A = (1/(n T)) sum_i sum_t a_it a_it^T   (mean over samples and positions)
      G = (1/(n T)) sum_i sum_t g_it g_it^T   (mean over samples and positions)

  KFC (Grosse & Martens 2016, eq. 23, "spatially uncorrelated derivatives") sums A over positions instead,
  so its block is ``T`` times ``A (x) G`` here: ``top_eig_A`` and ``top_eig_product`` of a conv layer are
  ``1/T`` of KFC's, while ``top_eig_G``, the eranks and the K-FAC epsilon-rank are the same. ``a_it`` is the
  ``F.unfold`` patch (channels x kernel, the order of ``weight.view(d_out, -1)``), with a 1 appended when
  the layer has a bias. For a plain ``(n, d)`` Linear input ``T = 1`` and both are ordinary batch means.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch as th
import torch.nn.functional as F
from torch import nn

from rl_plasticity.probes._checks import check_finite, check_matrix, check_threshold
from rl_plasticity.probes.rank import effective_rank_from_spectrum
from rl_plasticity.probes.registry import ProbeInputs, ProbeResult, register_probe

LossFn = Callable[[nn.Module, Any], th.Tensor]

# Relative tolerance for "A is symmetric" in kfac_spectrum (factors are built symmetric up to rounding).
_SYMMETRY_RTOL = 1e-6


def _check_inputs_finite(inputs: Any, name: str = "inputs") -> None:
    """Raise ``ValueError`` on NaN/inf in any floating tensor of ``inputs`` (a tensor or a nested container)."""
    if isinstance(inputs, th.Tensor):
        if inputs.is_floating_point() or inputs.is_complex():
            check_finite(name, inputs)
    elif isinstance(inputs, dict):
        for key, value in inputs.items():
            _check_inputs_finite(value, f"{name}[{key!r}]")
    elif isinstance(inputs, (tuple, list)):
        fields = getattr(inputs, "_fields", None)  # NamedTuples such as SB3's ReplayBufferSamples
        for i, value in enumerate(inputs):
            _check_inputs_finite(value, f"{name}.{fields[i]}" if fields else f"{name}[{i}]")


def _select_layers(model: nn.Module, layers: Iterable[str] | None) -> dict[str, nn.Module]:
    """The named ``nn.Linear`` / ``nn.Conv2d`` modules of ``model`` (all of them, or the ``layers`` subset)."""
    candidates: dict[str, nn.Module] = {
        name: m for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))
    }
    if layers is None:
        if not candidates:
            raise ValueError("model has no nn.Linear or nn.Conv2d layer")
        return candidates
    if isinstance(layers, str):
        layers = [layers]
    selected: dict[str, nn.Module] = {}
    for name in layers:
        if name not in candidates:
            raise ValueError(
                f"{name!r} is not an nn.Linear/nn.Conv2d layer of the model; choices: {sorted(candidates)}"
            )
        selected[name] = candidates[name]
    if not selected:
        raise ValueError("layers is empty")
    return selected


def _layer_patches(module: nn.Module, a: th.Tensor) -> th.Tensor:
    """Layer input as ``(n, T, d_in)`` (Conv2d: unfolded patches), with a trailing 1 if the layer has a bias."""
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            raise ValueError("K-FAC for grouped convolutions (groups != 1) is not supported")
        if a.dim() == 3:  # unbatched (C, H, W) call
            a = a.unsqueeze(0)
        # Pad exactly as the layer does (handles 'same', asymmetric padding and non-zero padding modes).
        pad = module._reversed_padding_repeated_twice
        if any(pad):
            mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
            a = F.pad(a, pad, mode=mode)
        patches = F.unfold(a, module.kernel_size, dilation=module.dilation, padding=0, stride=module.stride)
        a = patches.transpose(1, 2)  # (n, T, C * kh * kw)
    else:
        if a.dim() == 1:  # unbatched (d_in,) call
            a = a.unsqueeze(0)
        a = a.reshape(a.shape[0], -1, a.shape[-1])
    if module.bias is not None:
        a = th.cat([a, a.new_ones(a.shape[:-1] + (1,))], dim=-1)
    return a


def _output_grads(module: nn.Module, g: th.Tensor, n: int) -> th.Tensor:
    """Output gradient as ``(n, T, d_out)``, positions matching :func:`_layer_patches`."""
    if isinstance(module, nn.Conv2d):
        g = g.reshape(n, g.shape[-3], -1).transpose(1, 2)  # (n, C_out, H', W') -> (n, T, C_out)
    else:
        g = g.reshape(n, -1, g.shape[-1])
    return g


def kfac_factor_rows(
    model: nn.Module,
    inputs: Any,
    loss_fn: LossFn,
    layers: Iterable[str] | None = None,
) -> dict[str, tuple[th.Tensor, th.Tensor]]:
    """The per-position rows whose Gram matrices are the K-FAC factors: ``{layer: (a_rows, g_rows)}`` with

        A = a_rows^T a_rows / m,   G = g_rows^T g_rows / m,   m = n T rows (samples x positions)

    the factors of :func:`kfac_factors` (which documents the parameters and conventions). The rows are what a
    spectrum needs when ``m`` is smaller than a factor's side: the non-zero eigenvalues of ``X^T X / m`` are
    those of the ``(m, m)`` matrix ``X X^T / m`` (:func:`kfac_spectrum_from_rows`), far cheaper for a wide
    Linear layer probed on a few hundred samples.

    :return: ``{layer name: (a_rows, g_rows)}``, float64 tensors of shapes ``(m, d_in (+1))`` and ``(m, d_out)``.
    """
    _check_inputs_finite(inputs)
    explicit = layers is not None
    modules = _select_layers(model, layers)
    records: dict[str, list[tuple[th.Tensor, th.Tensor]]] = {name: [] for name in modules}

    def make_hook(name: str) -> Callable[..., th.Tensor | None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: th.Tensor) -> th.Tensor | None:
            if not (th.is_grad_enabled() and output.requires_grad):
                return None
            records[name].append((args[0].detach(), output))
            # Hand a copy downstream so that an in-place op (e.g. ReLU(inplace=True)) cannot overwrite the
            # tensor we differentiate with respect to.
            return output.clone()

        return hook

    handles = [m.register_forward_hook(make_hook(name)) for name, m in modules.items()]
    try:
        loss = loss_fn(model, inputs)
    finally:
        for handle in handles:
            handle.remove()

    if not isinstance(loss, th.Tensor) or loss.numel() != 1:
        raise ValueError(
            f"loss_fn must return a scalar tensor, got {type(loss).__name__}"
            + (f" of shape {tuple(loss.shape)}" if isinstance(loss, th.Tensor) else "")
        )
    check_finite("loss", loss.detach())
    for name, calls in records.items():
        if len(calls) > 1:
            raise ValueError(
                f"layer {name!r} was called {len(calls)} times with gradient tracking; "
                "K-FAC for a layer shared across calls is not supported"
            )
    used = [name for name, calls in records.items() if calls]
    missing = [name for name in modules if not records[name]]
    if explicit and missing:
        raise ValueError(f"layers {missing} were not called (with gradient tracking) by loss_fn")
    if not used:
        raise ValueError("no selected layer took part in the loss (were the layers called under no_grad?)")
    if not loss.requires_grad:
        raise ValueError("the loss does not require grad; cannot differentiate it w.r.t. the layer outputs")

    outputs = [records[name][0][1] for name in used]
    grads = th.autograd.grad(loss.reshape(()), outputs, allow_unused=True)

    rows: dict[str, tuple[th.Tensor, th.Tensor]] = {}
    for name, grad in zip(used, grads):
        module = modules[name]
        layer_input, output = records[name][0]
        a = _layer_patches(module, layer_input).to(th.float64)
        n, positions = a.shape[0], a.shape[1]
        if n < 1:
            raise ValueError(f"layer {name!r} saw an empty batch")
        if grad is None:  # output does not influence the loss: zero gradient
            grad = th.zeros_like(output)
        # n * dL/ds: per-sample loss gradients from the batch-mean loss.
        g = _output_grads(module, grad.detach().to(th.float64), n) * n
        if g.shape[1] != positions:
            raise ValueError(f"layer {name!r}: {positions} input patches but {g.shape[1]} output positions")
        rows[name] = (a.reshape(-1, a.shape[-1]), g.reshape(-1, g.shape[-1]))
    return rows


def kfac_factors(
    model: nn.Module,
    inputs: Any,
    loss_fn: LossFn,
    layers: Iterable[str] | None = None,
) -> dict[str, tuple[th.Tensor, th.Tensor]]:
    """K-FAC factors ``(A, G)`` of every ``nn.Linear`` and ``nn.Conv2d`` layer, for the agent's own loss.

    Martens & Grosse 2015 (Linear) and Grosse & Martens 2016 (KFC, Conv2d); docs/reference/metrics.md "Curvature
    (K-FAC)"::

        A = E[a a^T]  (d_in (+1) square),   G = E[g g^T]  (d_out square),   block ~ A (x) G

    with ``a`` the layer input (plus a 1 for the bias) and ``g = dl_i/ds`` the per-sample gradient of the
    loss w.r.t. the layer's pre-activation output ``s``. See the module docstring for the two conventions:
    ``g = n * dL/ds`` because ``L`` is a batch mean, and the spatial scaling (A and G both averaged over
    positions, as docs/reference/metrics.md says).

    Forward hooks capture each layer's input and output during one call ``loss_fn(model, inputs)``; the
    output gradients come from ``torch.autograd.grad(loss, outputs)``, so no ``.grad`` field of the model
    is written and all hooks are removed afterwards, even on error. Layer calls made without gradient
    tracking (e.g. a Double-DQN target computed under ``no_grad``) are ignored: they are not part of the
    loss gradient. A layer that is called more than once with gradient tracking raises ``ValueError``.

    :param model: the network; its parameters must require grad for the layers to be probed.
    :param inputs: anything ``loss_fn`` accepts (a tensor, a tuple, an SB3 replay/rollout batch...). Floating
        tensors in it are checked for NaN/inf.
    :param loss_fn: ``loss_fn(model, inputs) -> scalar Tensor``, the batch-MEAN training loss, built by
        calling ``model`` (or its submodules) on ``inputs``. For an agent:
        ``lambda model, batch: agent.training_loss(batch)[0]`` with ``model = agent.policy``.
    :param layers: names (as in ``model.named_modules()``) of the layers to probe; default all Linear and
        Conv2d layers that take part in the loss. An explicitly named layer that does not raises ValueError.
    :return: ``{layer name: (A, G)}``, float64 tensors on the model's device.
    :raises ValueError: NaN/inf inputs or loss, a non-scalar loss, an empty batch, or unusable layers.
    """
    factors: dict[str, tuple[th.Tensor, th.Tensor]] = {}
    for name, (a_rows, g_rows) in kfac_factor_rows(model, inputs, loss_fn, layers).items():
        m = a_rows.shape[0]
        # docs/reference/metrics.md: means over samples and positions.
        factors[name] = (a_rows.T @ a_rows / m, g_rows.T @ g_rows / m)
    return factors


def _sym_eigvals(name: str, M: th.Tensor) -> th.Tensor:
    M = check_matrix(name, M)
    if M.shape[0] != M.shape[1]:
        raise ValueError(f"{name} must be square, got shape {tuple(M.shape)}")
    scale = M.abs().max().clamp_min(1e-300)
    if (M - M.T).abs().max() > _SYMMETRY_RTOL * scale:
        raise ValueError(f"{name} must be symmetric")
    return _psd_eigvals(M)


def _psd_eigvals(M: th.Tensor) -> th.Tensor:
    """Eigenvalues (descending) of a symmetric PSD matrix; negative ones are rounding noise, clamped to 0."""
    return th.linalg.eigvalsh((M + M.T) / 2).clamp_min(0.0).flip(0)


def kfac_spectrum(A: th.Tensor, G: th.Tensor, eps: float = 1e-3) -> dict[str, Any]:
    """Spectral summary of one K-FAC block ``A (x) G`` (docs/reference/metrics.md "Curvature (K-FAC)").

    The block's eigenvalues are the products ``lambda_i(A) * mu_j(G)`` (Martens & Grosse 2015). Reported:

    * ``top_eig_A``, ``top_eig_G``, ``top_eig_product = top_eig_A * top_eig_G``;
    * ``erank_A``, ``erank_G``: effective rank (Roy & Vetterli 2007) of the eigenvalue spectra,
      ``p = lambda / sum(lambda)``, ``exp(-sum p log p)``. Note ``erank(A (x) G) = erank_A * erank_G``;
    * ``kfac_eps_rank``: the *fraction* of the ``d_A * d_G`` products with ``lambda_i mu_j > eps * max``
      (0 when the block is zero);
    * ``eigs_A``, ``eigs_G``: the eigenvalues (descending, float64 CPU tensors) for histograms.

    Tiny negative eigenvalues (rounding) are clamped to 0.

    :param A: symmetric PSD input factor.
    :param G: symmetric PSD output-gradient factor.
    :param eps: relative threshold of the K-FAC epsilon-rank (default 1e-3, docs/reference/metrics.md).
    :raises ValueError: non-square, non-symmetric or non-finite factors, or eps outside [0, 1].
    """
    check_threshold("eps", eps, 0.0, 1.0)
    return _block_summary(_sym_eigvals("A", A), _sym_eigvals("G", G), eps)


def _gram_eigvals(name: str, rows: th.Tensor) -> th.Tensor:
    """Eigenvalues (descending) of ``rows^T rows / m`` from the smaller of its two Gram matrices."""
    rows = check_matrix(name, rows)
    m, d = rows.shape
    if m < 1:
        raise ValueError(f"{name} has no rows")
    # A Gram matrix of checked rows is symmetric PSD by construction: no second validation.
    if m >= d:
        return _psd_eigvals(rows.T @ rows / m)
    # X^T X and X X^T share their non-zero eigenvalues; the other d - m are exactly 0.
    small = _psd_eigvals(rows @ rows.T / m)
    return th.cat([small, small.new_zeros(d - m)])


def kfac_spectrum_from_rows(a_rows: th.Tensor, g_rows: th.Tensor, eps: float = 1e-3) -> dict[str, Any]:
    """:func:`kfac_spectrum` of the factors ``A = a_rows^T a_rows / m`` and ``G = g_rows^T g_rows / m``
    (the rows of :func:`kfac_factor_rows`), without forming a factor larger than ``(m, m)``.

    Same keys and values as ``kfac_spectrum(A, G, eps)`` up to rounding: when ``m`` is below a factor's side
    its eigenvalues come from the ``(m, m)`` Gram matrix, padded with exact zeros. For the MinAtar network's
    first Linear layer (``A`` of side 1025) on a 256-sample probe set this is about 30 times cheaper.

    :param a_rows: ``(m, d_A)`` input rows (patches, with the bias column).
    :param g_rows: ``(m, d_G)`` per-sample output-gradient rows.
    :param eps: relative threshold of the K-FAC epsilon-rank (default 1e-3, docs/reference/metrics.md).
    :raises ValueError: non-finite rows, or eps outside [0, 1].
    """
    check_threshold("eps", eps, 0.0, 1.0)
    if a_rows.dim() != 2 or g_rows.dim() != 2 or a_rows.shape[0] != g_rows.shape[0]:
        raise ValueError(
            f"a_rows and g_rows must be (m, d) matrices with the same m, got shapes "
            f"{tuple(a_rows.shape)} and {tuple(g_rows.shape)}"
        )
    return _block_summary(_gram_eigvals("a_rows", a_rows), _gram_eigvals("g_rows", g_rows), eps)


def _block_summary(eigs_A: th.Tensor, eigs_G: th.Tensor, eps: float) -> dict[str, Any]:
    """The :func:`kfac_spectrum` dict from the (descending, non-negative) eigenvalues of A and G."""
    top_A, top_G = float(eigs_A[0]), float(eigs_G[0])
    top = top_A * top_G
    if top > 0:
        products = th.outer(eigs_A, eigs_G)
        eps_rank = float((products > eps * top).sum()) / products.numel()
    else:
        eps_rank = 0.0
    return {
        "top_eig_A": top_A,
        "top_eig_G": top_G,
        "top_eig_product": top,
        "erank_A": float(effective_rank_from_spectrum(eigs_A)),
        "erank_G": float(effective_rank_from_spectrum(eigs_G)),
        "kfac_eps_rank": eps_rank,
        "eigs_A": eigs_A.cpu(),
        "eigs_G": eigs_G.cpu(),
    }


_KFAC_KEYS = ("top_eig_A", "top_eig_G", "top_eig_product", "erank_A", "erank_G", "kfac_eps_rank")


@register_probe(
    "kfac",
    "light",
    tuple(f"kfac_{key.removeprefix('kfac_').lower()}" for key in _KFAC_KEYS),
    "curvature",
    charts=(
        ("K-FAC epsilon-rank", "kfac_eps_rank/.*"),
        ("K-FAC top eigenvalues", "kfac_top_eig_.*"),
        ("K-FAC eranks", "kfac_erank_.*"),
    ),
    main=(("kfac_eps_rank", "K-FAC epsilon-rank"),),
    order=40,
)
def _run(inputs: ProbeInputs) -> ProbeResult:
    """K-FAC factor spectra of every Linear and Conv2d layer for the agent's own loss (Martens & Grosse 2015)."""
    # From the factors' rows: the wide first Linear layer's A (side 1025) has rank <= the batch size.
    rows = kfac_factor_rows(inputs.module, inputs.batch, lambda _model, b: inputs.loss(b))
    scalars: dict[str, float] = {}
    hists: dict[str, th.Tensor] = {}
    for layer, (a_rows, g_rows) in rows.items():
        spec = kfac_spectrum_from_rows(a_rows, g_rows)
        for key in _KFAC_KEYS:
            scalars[f"kfac_{key.removeprefix('kfac_').lower()}/{layer}"] = spec[key]
        hists[f"kfac_eigs_A/{layer}"] = spec["eigs_A"].float().cpu()
        hists[f"kfac_eigs_G/{layer}"] = spec["eigs_G"].float().cpu()
    return ProbeResult(scalars, hists)
