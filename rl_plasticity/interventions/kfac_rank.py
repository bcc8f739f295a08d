"""K-FAC effective-rank regularizer (``kfac_rank``), this project's K-FAC form of effective-rank ascent."""

from __future__ import annotations

from typing import NamedTuple

import torch as th
from pydantic import Field
from torch import nn

from agents.hooks import PlasticAgent
from rl_plasticity.interventions.base import Params, PlasticityIntervention
from rl_plasticity.interventions.l2 import L2Penalty
from rl_plasticity.interventions.registry import register
from rl_plasticity.probes import effective_rank_psd_differentiable
from rl_plasticity.probes.kfac import _layer_patches, _output_grads
from rl_plasticity.recording import ForwardRecorder


def factor_erank(rows: th.Tensor) -> th.Tensor:
    """Effective rank of the eigenvalues of ``rows^T rows``, through the smaller of its two Gram matrices.

    A K-FAC factor is ``c * rows^T rows`` (``rows``: one row per sample and position, ``c > 0`` a scale that
    erank ignores). Its non-zero eigenvalues are those of ``rows rows^T`` too, so the cheaper of the two
    Gram matrices (``min(r, d)`` square) is built. A Gram matrix is PSD, so its singular values are its
    eigenvalues, and :func:`~rl_plasticity.probes.rank.effective_rank_psd_differentiable` takes them with
    ``eigvalsh`` (with the finite-gradient guarantees of the SVD form when ``rows`` carries a graph; G, and A
    of a layer fed by the observations, carry none).

    :param rows: ``(r, d)`` tensor, may require grad.
    :return: 0-dim float64 tensor on ``rows``' device, with a graph if ``rows`` has one.
    """
    # The product is formed in the rows' own precision (float32 for the agents, half the cost of float64) and
    # its spectrum taken in float64.
    gram = (rows @ rows.T if rows.shape[0] <= rows.shape[1] else rows.T @ rows).to(th.float64)
    return effective_rank_psd_differentiable(gram)


class KFACRankParams(Params):
    """Parameters of :class:`KFACRank`."""

    coef: float = Field(1e-3, ge=0, description="Weight of the term -coef * mean_l erank(A_l) * erank(G_l).")
    l2_coef: float = Field(
        1e-4, ge=0, description="L2 coefficient: the loss term l2_coef * sum ||theta||^2 / 2 (as l2_er's coef)."
    )
    include_biases: bool = Field(False, description="Also penalise the biases in the L2 term.")
    input_layers: bool = Field(
        False,
        description="Also compute the product of the layers fed by the observations: a constant of the batch with "
        "no gradient, so it only changes the logged value (about +30% step time on MinAtar DQN).",
    )


@register("kfac_rank")
class KFACRank(L2Penalty, PlasticityIntervention):
    """Ascent on the effective rank of each layer's K-FAC block erank(A) * erank(G), plus L2.

    This project's K-FAC form of the effective-rank argument of Prakash et al. 2025 ("Spectral Collapse
    Drives Loss of Plasticity in Deep Continual Learning"); K-FAC factors as in Martens & Grosse 2015 and,
    for Conv2d, Grosse & Martens 2016 (see :mod:`rl_plasticity.probes.kfac` and docs/reference/metrics.md). Loss terms::

        kfac_rank = -coef * mean_l erank(A_l) * stopgrad(erank(G_l))        l2 = l2_coef * sum ||theta||^2 / 2

    over every Linear and Conv2d layer ``l`` of the online network, with ``A_l = E[a a^T]`` (``a`` the layer
    input with a 1 appended for the bias; for Conv2d the ``F.unfold`` patches, summed over positions) and
    ``G_l = E[g g^T]`` (``g = n dL/ds`` per sample and position, from the agent's own TD or PPO loss ``L``).
    erank is the effective rank of the eigenvalues (Roy & Vetterli 2007).

    **Why erank(A (x) G) = erank(A) * erank(G).** The eigenvalues of ``A (x) G`` are the products
    ``lambda_i mu_j``, so their normalised distribution is ``p_ij = lambda_i mu_j / (sum lambda)(sum mu) =
    p_i q_j``, a product distribution. The entropy of a product distribution is the sum of the entropies,
    ``H(p (x) q) = H(p) + H(q)``, and erank = ``exp(H)`` turns the sum into a product. So the layer's K-FAC
    curvature block spreads over ``erank(A) * erank(G)`` effective directions, and raising either factor
    raises it.

    **Why only A gets a gradient.** ``A_l`` is the uncentred second moment of the layer's inputs, the
    features the layer below produced: raising its erank is the effective-rank ascent on the features of
    ``l2_er``, applied to every layer's input, and its gradient flows through those activations into all
    the layers below (the first layer's input is the observation, a constant). ``G_l`` is built from the
    back-propagated loss gradients; differentiating it would need a double backward through the loss
    (about the cost of another training step) and would reward changing the *errors* (making the TD/PPO
    residuals more diverse) rather than the representation. So ``erank(G_l)`` only weights each layer: a
    layer whose output gradients use more directions counts more, and a layer that gets no gradient
    (``G_l = 0``) contributes nothing.

    **Layers fed by the observations.** A layer whose input carries no gradient (the observations) has an
    ``A_l`` that does not depend on the parameters, so its product ``erank(A_l) * erank(G_l)`` is a constant
    of the batch with no gradient: it cannot change training. By default (``input_layers=False``) it is not
    computed and counts as 0 in the sum, while the mean still divides by the number of *all* layers, so the
    gradient is exactly that of the full definition and the value differs from it by that constant. This
    skips the costliest part, the unfolded conv input (MinAtar DQN, batch 32, one update per env step: about
    2.0x the step time of no intervention with it, about 1.55x without). With ``input_layers=True`` the term
    is the full mean. The monitor's K-FAC probe reports these layers' eranks.

    **Computation.** Forward hooks registered at :meth:`attach` record each layer's input (with its graph)
    and output, only for calls made with gradient tracking, so the DQN target network and the Double-DQN
    online forward on the next observations (both under ``no_grad``) are ignored. In :meth:`loss_terms`
    the output gradients come from ``torch.autograd.grad(loss, outputs, retain_graph=True)`` without
    ``create_graph``, so ``G`` carries no graph and no ``.grad`` is written. Both eranks are taken from the
    smaller Gram matrix of the row matrix (:func:`factor_erank`): for MinAtar's Linear(1024 -> 128) layer
    at batch 32 that is 32 x 32 instead of a 1025 x 1025 eigendecomposition, and for the conv layer the
    ``d_in`` side. The constant scales of A and G (``1/n``, ``1/(nT)``, and the ``n`` of ``n dL/ds``)
    are left out: erank is scale-invariant.

    Defaults: ``coef = 1e-3`` (docs/reference/interventions.md); ``l2_coef = 1e-4``, the same as ``l2_er``'s ``coef``
    (docs/reference/interventions.md
    gives no value for this one). Logged under ``interventions/kfac_rank/``: the two terms and
    ``erank_A/<layer>``, ``erank_G/<layer>`` for the layers computed (``kfac_rank``: mean over the updates of
    the last train() call; ``l2``: its value at the dump; the eranks: last value, not in the console table).
    """

    Params = KFACRankParams
    params: KFACRankParams
    coef_field = "l2_coef"  # its own ``coef`` weighs the rank term

    def __init__(self, params: KFACRankParams | None = None) -> None:
        super().__init__(params)
        self._layers: dict[str, nn.Module] = {}
        self._recorder: ForwardRecorder | None = None

    def attach(self, agent: PlasticAgent) -> None:
        if self._recorder is not None:
            self._recorder.remove()
        self._layers = dict(agent.parametrized_layers())
        # Each layer's input (with its graph), output and output version of its last call with gradient tracking.
        self._recorder = ForwardRecorder(
            agent.online_network(), names=self._layers, grad_only=True, graph_only=True, detach=False, keep_inputs=True
        )

    def loss_terms(
        self, agent: PlasticAgent, batch: NamedTuple, features: th.Tensor, loss: th.Tensor
    ) -> dict[str, th.Tensor]:
        recorder = self._recorder
        assert recorder is not None, "kfac_rank: attach() first"
        records = {
            name: (recorder.inputs[name], out, recorder.versions[name]) for name, out in recorder.outputs.items()
        }
        recorder.clear()
        if not records:
            raise RuntimeError("kfac_rank recorded no layer call in the training forward pass")
        # The layers whose product is computed (see "Layers fed by the observations"), input to output.
        names = [
            name
            for name in self._layers
            if name in records and (self.params.input_layers or records[name][0].requires_grad)
        ]
        for name in names:
            if records[name][1]._version != records[name][2]:
                raise RuntimeError(f"kfac_rank: layer {name!r}'s output was changed in place (inplace activation?)")
        outputs = [records[name][1] for name in names]
        grads = th.autograd.grad(loss, outputs, retain_graph=True, allow_unused=True) if names else []

        products, logged = [], []
        for name, grad in zip(names, grads):
            if grad is None:  # the layer does not reach the loss: G = 0, the product is 0
                continue
            module, layer_input = self._layers[name], records[name][0]
            a = _layer_patches(module, layer_input)
            erank_a = factor_erank(a.reshape(-1, a.shape[-1]))
            with th.no_grad():  # g = dL/ds: the n of n * dL/ds is a scale, which erank ignores
                g = _output_grads(module, grad, a.shape[0])
                erank_g = factor_erank(g.reshape(-1, g.shape[-1]))
            products.append(erank_a * erank_g)
            logged += [(f"erank_A/{name}", erank_a), (f"erank_G/{name}", erank_g)]
        values = th.stack([value.detach() for _, value in logged]).tolist() if logged else []
        self.log_layers(agent, {key: value for (key, _), value in zip(logged, values)})

        # Mean over all layers, the skipped ones counting 0.
        total = th.stack(products).sum() if products else loss.new_zeros(())
        term = -self.params.coef * total / len(self._layers)
        return {"kfac_rank": term.to(loss.dtype)}
