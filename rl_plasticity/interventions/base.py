"""What every registered intervention shares: typed parameters, a trigger, counters and logging."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from agents import Intervention, TaskSwitch
from agents.hooks import PlasticAgent


class Params(BaseModel):
    """Base of every intervention's parameters: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


class TriggerParams(Params):
    """When an event-type intervention fires: at each task switch, or every N gradient updates."""

    at: Literal["task_switch", "every"] = Field("task_switch", description="task_switch, or every `every` updates.")
    every: int = Field(1000, gt=0, description="Gradient updates between firings when at=every.")


class PlasticityIntervention(Intervention):
    """Base class of the registered interventions.

    Subclasses set ``Params`` (a pydantic model whose defaults are the published values), implement the
    hooks of :class:`agents.Intervention` they need, and call :meth:`fire` or :meth:`log` so that what
    they did shows up under ``interventions/<name>/`` in TensorBoard. ``state_dict`` holds the counters;
    subclasses with more state extend it.
    """

    Params: ClassVar[type[Params]] = Params

    def __init__(self, params: Params | None = None) -> None:
        self.params = params if params is not None else self.Params()
        self.fired = 0

    def log(self, agent: PlasticAgent, key: str, value: float) -> None:
        """Record ``interventions/<name>/<key>`` (written at the logger's next dump)."""
        agent.logger.record(f"interventions/{self.name}/{key}", value)

    def log_layers(self, agent: PlasticAgent, values: Mapping[str, float]) -> None:
        """Record per-layer values as ``interventions/<name>/<key>``, in TensorBoard only.

        They stay out of the console table: SB3 truncates its keys to 36 characters and fails on two that then
        coincide (PPO's ``mlp_extractor.policy_net.0`` / ``value_net.0``).
        """
        for key, value in values.items():
            agent.logger.record(f"interventions/{self.name}/{key}", value, exclude=("stdout", "log"))

    def fire(self, agent: PlasticAgent, **touched: float) -> None:
        """Count one firing and log it with what it touched (units, parameters, fraction, ...)."""
        self.fired += 1
        self.log(agent, "fired", self.fired)
        for key, value in touched.items():
            self.log(agent, key, value)

    def state_dict(self) -> dict[str, Any]:
        return {"fired": self.fired}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.fired = int(state["fired"])


class TriggeredIntervention(PlasticityIntervention, ABC):
    """An event that fires at task switches or every N updates (``params.at``, ``params.every``).

    Subclasses implement :meth:`apply` and return what it touched, as keyword values for :meth:`fire`.
    """

    Params: ClassVar[type[Params]] = TriggerParams

    @abstractmethod
    def apply(self, agent: PlasticAgent) -> dict[str, float]:
        """Do the intervention once; return what was touched (logged under ``interventions/<name>/``)."""

    def on_task_switch(self, agent: PlasticAgent, switch: TaskSwitch) -> None:
        if self.params.at == "task_switch":
            self.fire(agent, **self.apply(agent))

    def on_update(self, agent: PlasticAgent, num_gradient_steps: int) -> None:
        if self.params.at == "every" and num_gradient_steps % self.params.every == 0:
            self.fire(agent, **self.apply(agent))
