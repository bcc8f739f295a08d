"""Plasticity probes: pure functions from tensors (or a network and a batch) to numbers.

Every definition follows ``docs/reference/metrics.md`` and cites its source; every threshold is a
parameter with the published default. No probe imports SB3, keeps state, or draws from the global RNG.

- ranks (:mod:`.rank`): effective_rank, srank, approx_rank, epsilon_rank, lyle_feature_rank
- dormant and active units (:mod:`.dormant`): dormant_fraction, active_fraction, mean_active_fraction
- neural collapse of the value-head features (:mod:`.collapse`): neural_collapse
- curvature: K-FAC factors and spectra (:mod:`.kfac`), NTK / loss-weighted Gram (:mod:`.gram`),
  Hessian spectrum by stochastic Lanczos quadrature (:mod:`.hessian`)
- trainability (:mod:`.trainability`), and weight, update and gradient statistics (:mod:`.weights`)

Each module also registers the probe the monitor runs by name (:mod:`.registry`); every module of the package is
imported here, so a new probe is one new module (``rlp list probes`` and the config see it), e.g. feature norm
and variance (:mod:`.feature_norm`, :mod:`.feature_variance`: their functions are imported from there).
"""

import importlib
import pkgutil

from rl_plasticity.probes.collapse import nc1_differentiable, neural_collapse
from rl_plasticity.probes.dormant import active_fraction, dormant_fraction, mean_active_fraction, unit_scores
from rl_plasticity.probes.gram import gram_spectrum, huber_curvature, loss_curvature
from rl_plasticity.probes.hessian import hessian_spectrum, hessian_vector_product
from rl_plasticity.probes.kfac import kfac_factor_rows, kfac_factors, kfac_spectrum, kfac_spectrum_from_rows
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
from rl_plasticity.probes.registry import PROBES, ProbeInputs, ProbeResult, ProbeSpec, probe_kinds, register_probe
from rl_plasticity.probes.trainability import trainability
from rl_plasticity.probes.weights import grad_stats, snapshot, update_stats, weight_stats

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_") and _module.name != "registry":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "PROBES",
    "ProbeInputs",
    "ProbeResult",
    "ProbeSpec",
    "active_fraction",
    "approx_rank",
    "dormant_fraction",
    "effective_rank",
    "effective_rank_differentiable",
    "effective_rank_from_spectrum",
    "effective_rank_psd_differentiable",
    "epsilon_rank",
    "grad_stats",
    "gram_spectrum",
    "hessian_spectrum",
    "hessian_vector_product",
    "huber_curvature",
    "kfac_factor_rows",
    "kfac_factors",
    "kfac_spectrum",
    "kfac_spectrum_from_rows",
    "loss_curvature",
    "lyle_feature_rank",
    "mean_active_fraction",
    "nc1_differentiable",
    "neural_collapse",
    "probe_kinds",
    "register_probe",
    "singular_values",
    "snapshot",
    "srank",
    "trainability",
    "unit_scores",
    "update_stats",
    "weight_stats",
]
