"""The registry of interventions: config name -> class, parameters and the agents it supports.

An intervention module registers itself with :func:`register`; the package imports every module in
``rl_plasticity/interventions/`` at import, so adding one is one new module and nothing else.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from rl_plasticity.interventions.base import PlasticityIntervention


@dataclass(frozen=True)
class InterventionSpec:
    """A registered intervention.

    :param name: its config name, e.g. ``"reset"``.
    :param description: one line, shown by ``rlp list interventions``.
    :param cls: the :class:`PlasticityIntervention` subclass; it is built as ``cls(params)``.
    :param algos: the agents it supports (``"dqn"``, ``"ppo"``).
    :param why_not: for an agent left out, the reason, shown in the error and the listing.
    """

    name: str
    description: str
    cls: type[PlasticityIntervention]
    algos: tuple[str, ...] = ("dqn", "ppo")
    why_not: str = ""

    @property
    def params(self) -> type[BaseModel]:
        """The pydantic model of its parameters (defaults are the published ones)."""
        return self.cls.Params

    def defaults(self) -> dict[str, Any]:
        """Parameter name -> default, for the listing."""
        return self.params().model_dump()


INTERVENTIONS: dict[str, InterventionSpec] = {}


def register(
    name: str, algos: Sequence[str] = ("dqn", "ppo"), why_not: str = ""
) -> Callable[[type[PlasticityIntervention]], type[PlasticityIntervention]]:
    """Class decorator: register an intervention under ``name``. Its docstring's first line describes it."""

    def decorate(cls: type[PlasticityIntervention]) -> type[PlasticityIntervention]:
        if name in INTERVENTIONS:
            raise ValueError(f"intervention '{name}' is registered twice")
        cls.name = name
        description = (cls.__doc__ or "").strip().splitlines()[0]
        INTERVENTIONS[name] = InterventionSpec(name, description, cls, tuple(algos), why_not)
        return cls

    return decorate


def build_interventions(names: Sequence[str], params: Mapping[str, Mapping[str, Any]]) -> list[PlasticityIntervention]:
    """Instantiate the named interventions, in order, each with its (validated) parameters.

    :param names: registered names (the config has checked them).
    :param params: name -> parameter overrides; missing names use the defaults.
    """
    return [INTERVENTIONS[name].cls(INTERVENTIONS[name].params(**params.get(name, {}))) for name in names]
