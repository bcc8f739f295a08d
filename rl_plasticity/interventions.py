"""The registry of interventions that configs name in their ``interventions:`` list.

Each entry maps a config name to a factory returning an :class:`agents.Intervention`. The
interventions themselves (resets, regularizers, ReDo, ...) register here as they are added;
``rlp list interventions`` shows what is registered.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from agents import Intervention


@dataclass(frozen=True)
class InterventionSpec:
    """A registered intervention: its config name, one-line description and factory."""

    name: str
    description: str
    factory: Callable[[], Intervention]


INTERVENTIONS: dict[str, InterventionSpec] = {}


def valid_intervention_names() -> str:
    """The registered names, for error messages."""
    return ", ".join(sorted(INTERVENTIONS)) or "(none registered yet)"


def build_interventions(names: Sequence[str]) -> list[Intervention]:
    """Instantiate the named interventions, in order.

    :raises KeyError: for a name that is not registered (the config validator reports it first).
    """
    return [INTERVENTIONS[name].factory() for name in names]
