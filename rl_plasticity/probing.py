"""Run the probe functions on an SB3 agent: the one place that knows how to get tensors out of SB3 models.

:func:`probe_batch` takes an agent and a batch (a fixed probe set or a training batch) and returns flat
``"<probe>/<layer>"`` values plus tensors for histograms. The probe functions themselves
(:mod:`rl_plasticity.probes`) are pure and know nothing of SB3.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch as th
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.preprocessing import preprocess_obs
from torch import nn

from agents import CReLU, PlasticDQN
from agents.dqn import TD_LOSSES
from rl_plasticity.config import MonitorConfig
from rl_plasticity.probes import (
    active_fraction,
    approx_rank,
    dormant_fraction,
    effective_rank,
    epsilon_rank,
    gram_spectrum,
    hessian_spectrum,
    kfac_factor_rows,
    kfac_spectrum_from_rows,
    loss_curvature,
    lyle_feature_rank,
    mean_active_fraction,
    neural_collapse,
    singular_values,
    srank,
    trainability,
)


class ProbeResult(NamedTuple):
    """Scalars keyed ``"<probe>/<layer>"`` and tensors (for histograms) keyed the same way."""

    scalars: dict[str, float]
    histograms: dict[str, th.Tensor]


def probed_module(agent: BaseAlgorithm) -> nn.Module:
    """The network the probes look at: DQN's online Q-network, PPO's whole actor-critic policy."""
    return agent.q_net if isinstance(agent, PlasticDQN) else agent.policy


class _ValueOutput(nn.Module):
    """PPO's value path (critic torso and value head) as a module of its own, so the trainability probe
    can copy and fit it. The policy itself cannot be deep-copied: it caches its last action distribution,
    graph included."""

    def __init__(self, policy: Any) -> None:
        super().__init__()
        self.observation_space = policy.observation_space
        self.normalize_images = policy.normalize_images
        self.features_extractor = policy.vf_features_extractor
        self.mlp_extractor = policy.mlp_extractor
        self.value_net = policy.value_net

    def forward(self, obs: th.Tensor) -> th.Tensor:
        features = self.features_extractor(preprocess_obs(obs, self.observation_space, self.normalize_images))
        return self.value_net(self.mlp_extractor.forward_critic(features))


#: Activation modules whose outputs the dormancy probes read (the post-activation values H of metrics.md).
#: A CReLU output has two entries per linear unit (its positive and negative parts); each counts as a unit.
ACTIVATIONS = (nn.ReLU, nn.Tanh, CReLU)


@contextmanager
def activation_outputs(module: nn.Module, detach: bool = True) -> Iterator[dict[str, th.Tensor]]:
    """Collect the output of every activation module of ``module`` during the block, keyed by module path.

    :param detach: drop the graph (the probes); keep it for a loss that differentiates through them (l2_er).
    """
    outputs: dict[str, th.Tensor] = {}
    handles = [
        child.register_forward_hook(
            lambda _m, _i, out, name=name: outputs.__setitem__(name, out.detach() if detach else out)
        )
        for name, child in module.named_modules()
        if isinstance(child, ACTIVATIONS)
    ]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def greedy_labels(agent: BaseAlgorithm, obs: th.Tensor, features: th.Tensor) -> tuple[th.Tensor, th.Tensor | None]:
    """Neural-collapse classes: DQN's greedy action (with the Q head as classifier), PPO's actor mode."""
    if isinstance(agent, PlasticDQN):
        head = agent.value_head
        return head(features).argmax(dim=1), head.weight
    return agent.policy.get_distribution(obs).mode(), None



def td_loss_fn(agent: PlasticDQN) -> Callable[[th.Tensor, th.Tensor], th.Tensor]:
    """The per-sample TD loss ``agent.training_loss`` averages: ``TD_LOSSES[agent.td_loss]`` ."""
    return TD_LOSSES[agent.td_loss]


def _gram_inputs(agent: BaseAlgorithm, batch: NamedTuple) -> tuple[Any, Any, th.Tensor | None]:
    """For the Gram probe: inputs, the scalar output per sample, and the loss curvature D (metrics.md).

    DQN: ``f_i = Q(s_i, a_i)`` with ``a_i`` the *stored* action of transition ``i``, and ``D_i = l''(f_i)`` of
    the agent's own per-sample TD loss (:func:`td_loss_fn`) at ``f_i - y_i``, ``y_i`` the TD target of the
    same transition (:meth:`PlasticDQN.compute_target`, a constant). Output and residual belong to the same
    action, so ``K_L = D^1/2 J J^T D^1/2`` has the non-zero spectrum of ``J^T D J``, the Gauss-Newton matrix
    of the TD loss the agent trains on (``n`` times that of the batch mean). (metrics.md names the greedy
    action; its Q-value is in no TD loss unless it is the stored one, so it would pair one output with
    another output's residual.) PPO: ``f_i = V(s_i)`` and ``D = 1`` (the value loss is MSE).
    """
    if isinstance(agent, PlasticDQN):
        inputs = (batch.observations, batch.actions.long().reshape(-1, 1))

        def q_taken(model: nn.Module, x: tuple[th.Tensor, th.Tensor]) -> th.Tensor:
            return th.gather(model(x[0]), 1, x[1]).squeeze(1)

        with th.no_grad():
            q = q_taken(agent.q_net, inputs)
            targets = agent.compute_target(batch).squeeze(1)
        return inputs, q_taken, loss_curvature(td_loss_fn(agent), q, targets)

    def value(model: nn.Module, obs: th.Tensor) -> th.Tensor:
        return model.predict_values(obs).squeeze(-1)

    return batch.observations, value, None


def probe_batch(
    agent: BaseAlgorithm, batch: NamedTuple, cfg: MonitorConfig, heavy: bool, probes: list[str] | None = None
) -> ProbeResult:
    """Every configured probe on one batch.

    :param agent: a PlasticDQN or PlasticPPO.
    :param batch: SB3 replay or rollout samples (what the agent's ``training_loss`` takes).
    :param cfg: the probes' sizes and thresholds.
    :param heavy: also run ``cfg.switch_probes`` (Hessian spectrum, Gram, trainability).
    :param probes: the light probes to run (default ``cfg.probes``).
    """
    probes = cfg.probes if probes is None else probes
    module = probed_module(agent)
    obs = batch.observations
    scalars: dict[str, float] = {}
    hists: dict[str, th.Tensor] = {}

    with th.no_grad(), activation_outputs(module) as acts:
        features = agent.value_features(obs)
        labels, classifier = greedy_labels(agent, obs, features)

    if "rank" in probes:
        scalars["erank/value_head"] = effective_rank(features)
        scalars["srank/value_head"] = srank(features)
        scalars["approx_rank/value_head"] = approx_rank(features)
        scalars["eps_rank/value_head"] = epsilon_rank(features)
        scalars["lyle_rank/value_head"] = lyle_feature_rank(features)
        hists["singular_values/value_head"] = singular_values(features).float().cpu()
    if "dormant" in probes:
        for name, h in acts.items():
            scalars[f"dormant/{name}"] = dormant_fraction(h, tau=cfg.dormant_tau)
            scalars[f"active_fraction/{name}"] = active_fraction(h)
            scalars[f"mean_active_fraction/{name}"] = mean_active_fraction(h)
    if "collapse" in probes:
        nc = neural_collapse(features, labels, classifier)
        for key, value in nc.items():
            scalars[f"{key}/value_head"] = float(value)
    if "kfac" in probes:
        # From the factors' rows: the wide first Linear layer's A (side 1025) has rank <= the batch size.
        rows = kfac_factor_rows(module, batch, lambda _model, b: agent.training_loss(b)[0])
        for layer, (a_rows, g_rows) in rows.items():
            spec = kfac_spectrum_from_rows(a_rows, g_rows)
            for key in ("top_eig_A", "top_eig_G", "top_eig_product", "erank_A", "erank_G", "kfac_eps_rank"):
                scalars[f"kfac_{key.removeprefix('kfac_').lower()}/{layer}"] = spec[key]
            hists[f"kfac_eigs_A/{layer}"] = spec["eigs_A"].float().cpu()
            hists[f"kfac_eigs_G/{layer}"] = spec["eigs_G"].float().cpu()

    if heavy:
        if "hessian" in cfg.switch_probes:
            spec = hessian_spectrum(module, lambda: agent.training_loss(batch)[0], order=cfg.hessian_order,
                                    num_vectors=cfg.hessian_vectors)
            scalars["hessian_eps_rank/loss"] = spec["eps_hessian_rank"]
            scalars["hessian_top_eig/loss"] = spec["top_eigenvalue"]
            hists["hessian_ritz_values/loss"] = spec["ritz_values"].float().cpu()
        if "gram" in cfg.switch_probes:
            n = min(cfg.gram_size, len(obs))
            small = type(batch)(*(x[:n] if isinstance(x, th.Tensor) else x for x in batch))
            inputs, output_fn, curvature = _gram_inputs(agent, small)
            spec = gram_spectrum(module, inputs, output_fn, loss_curvature=curvature)
            for key in ("erank_K", "eps_rank_K", "erank_KL", "eps_rank_KL", "top_eig_K", "top_eig_KL",
                        "frac_zero_curvature"):
                scalars[f"gram_{key.lower()}/value"] = spec[key]
        if "trainability" in cfg.switch_probes:
            target_model = module if isinstance(agent, PlasticDQN) else _ValueOutput(module)
            scalars["trainability/value"] = trainability(
                target_model, obs, steps=cfg.trainability_steps, lr=cfg.trainability_lr
            )
    return ProbeResult(scalars, hists)
