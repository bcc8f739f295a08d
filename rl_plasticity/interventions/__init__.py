"""Interventions against loss of plasticity, chosen by name in the config (``interventions: [reset, l2]``).

Every module of this package registers its intervention(s) with :func:`register`; they are all imported
here, so ``rlp list interventions`` and the config see them. Definitions: ``docs/reference/interventions.md``.
"""

import importlib
import pkgutil

from rl_plasticity.interventions.base import PlasticityIntervention, TriggeredIntervention
from rl_plasticity.interventions.registry import (
    INTERVENTIONS,
    InterventionSpec,
    build_interventions,
    register,
)

_INFRASTRUCTURE = {"base", "registry", "surgery"}
for _module in pkgutil.iter_modules(__path__):
    if _module.name not in _INFRASTRUCTURE:
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "INTERVENTIONS",
    "InterventionSpec",
    "PlasticityIntervention",
    "TriggeredIntervention",
    "build_interventions",
    "register",
]
