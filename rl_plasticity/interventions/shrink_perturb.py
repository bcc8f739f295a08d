"""Shrink-and-perturb (``shrink_perturb``): theta <- alpha * theta + sigma * theta_fresh, hard or soft.

Ash & Adams 2020, "On Warm-Starting Neural Network Training" (NeurIPS), and its soft, every-update form
from Juliani & Ash 2024, "A Study of Plasticity Loss in On-Policy Deep Reinforcement Learning" (NeurIPS).
Definition: ``docs/reference/interventions.md#shrink_perturb``.
"""

from __future__ import annotations

from typing import Any, Literal

import torch as th
from pydantic import Field, model_validator
from torch import nn

from agents.hooks import PlasticAgent
from rl_plasticity.interventions.base import TriggeredIntervention, TriggerParams
from rl_plasticity.interventions.registry import register

#: (alpha, sigma, at, every) of each mode: Ash & Adams 2020 (hard), Juliani & Ash 2024 (soft).
MODE_DEFAULTS: dict[bool, tuple[float, float, str, int]] = {
    False: (0.8, 0.2, "task_switch", 1000),
    True: (0.999999, 1e-6, "every", 1),
}


class ShrinkPerturbParams(TriggerParams):
    """Parameters of :class:`ShrinkPerturb`.

    ``soft`` picks the mode; every other parameter left out (``None``) takes that mode's published value,
    and one given explicitly always wins. Hard (``soft: false``): alpha 0.8, sigma 0.2 at each task switch.
    Soft (``soft: true``): alpha 0.999999, sigma 1e-6 after every update (``at: every``, ``every: 1``).
    So ``{soft: true, every: 10}`` is the soft step every 10 updates, and ``{alpha: 0.5}`` a harder shrink
    at task switches. The values are filled in when the parameters are validated.
    """

    soft: bool = Field(False, description="Soft shrink-and-perturb (Juliani & Ash 2024): other defaults change.")
    alpha: float | None = Field(None, ge=0, description="Shrink factor (default: 0.8, or 0.999999 if soft).")
    sigma: float | None = Field(
        None, ge=0, description="Weight of the fresh initialisation (default: 0.2, or 1e-6 if soft)."
    )
    at: Literal["task_switch", "every"] | None = Field(  # type: ignore[assignment]
        None, description="task_switch, or every `every` updates (default: task_switch, or every if soft)."
    )
    every: int | None = Field(  # type: ignore[assignment]
        None, gt=0, description="Updates between firings when at=every (default: 1000, or 1 if soft)."
    )

    @model_validator(mode="after")
    def _mode_defaults(self) -> ShrinkPerturbParams:
        alpha, sigma, at, every = MODE_DEFAULTS[self.soft]
        self.alpha = alpha if self.alpha is None else self.alpha
        self.sigma = sigma if self.sigma is None else self.sigma
        self.at = at if self.at is None else self.at  # type: ignore[assignment]
        self.every = every if self.every is None else self.every
        return self


@register("shrink_perturb")
class ShrinkPerturb(TriggeredIntervention):
    """Shrink-and-perturb theta <- alpha*theta + sigma*theta_fresh, hard or soft (Ash & Adams 2020; Juliani & Ash 2024).

    Ash & Adams 2020, "On Warm-Starting Neural Network Training"; soft version: Juliani & Ash 2024,
    "A Study of Plasticity Loss in On-Policy Deep Reinforcement Learning". Each firing replaces the weight
    and bias of every parametrised layer of the online network (:meth:`agent.parametrized_layers`; norm
    layers are left alone) by ``alpha * theta + sigma * theta_fresh``, where ``theta_fresh`` is a new draw
    of the layer's own initialiser (:meth:`agent.init_layer`, so PPO's heads get orthogonal noise with
    gain 0.01 and 1, and PPO's zero biases are only shrunk). Defaults, see
    :class:`ShrinkPerturbParams`: hard alpha 0.8, sigma 0.2 at task switches; soft alpha 0.999999,
    sigma 1e-6 after every update.

    Design decisions:

    - **Optimizer state is kept.** A shrink keeps most of each weight (80% in the hard mode, all but 1e-6
      in the soft one), so Adam's moment estimates still describe the gradients the network will see, and
      the soft mode fires after *every* update, where forgetting the moments would turn Adam into a
      bias-corrected sign descent. (Contrast ``reset``, whose layers are entirely new.)
    - **DQN's target network gets the same transformation, with the same theta_fresh.** It stays the
      lagged copy of the same network: if it equalled the online network, it still does; otherwise their
      difference shrinks by alpha. Leaving it alone would make the TD targets come from the un-shrunk
      network until the next target update, pulling the online network back towards it.

    ``theta_fresh`` is drawn by re-initialising the layer in place and then mixing in the saved weights
    (one copy less than ``surgery.fresh_parameters``, which matters in the soft mode, run every update). The
    draw consumes the global torch RNG exactly as ``init_layer`` does, layer by layer, input to output.

    Logged at each firing under ``interventions/shrink_perturb/``: ``fired``, ``layers`` and ``params``
    (scalars transformed in the online network).
    """

    Params = ShrinkPerturbParams
    params: ShrinkPerturbParams

    def apply(self, agent: PlasticAgent) -> dict[str, float]:
        alpha, sigma = float(self.params.alpha), float(self.params.sigma)  # type: ignore[arg-type]
        target = getattr(agent, "q_net_target", None)
        target_modules = dict(target.named_modules()) if target is not None else {}
        layers = agent.parametrized_layers()
        touched = 0
        with th.no_grad():
            for name, layer in layers:
                theta = [p.detach().clone() for p in layer.parameters()]
                agent.init_layer(layer)  # the layer now holds theta_fresh
                for param, old, target_param in zip(
                    layer.parameters(), theta, self._target_parameters(target_modules, name, layer), strict=True
                ):
                    if target_param is not None:
                        target_param.mul_(alpha).add_(param, alpha=sigma)
                    param.mul_(sigma).add_(old, alpha=alpha)
                    touched += param.numel()
        return {"layers": len(layers), "params": touched}

    @staticmethod
    def _target_parameters(target_modules: dict[str, nn.Module], name: str, layer: nn.Module) -> list[Any]:
        """The parameters of the target network's copy of ``layer`` (DQN), else ``None`` for each."""
        if name not in target_modules:
            return [None for _ in layer.parameters()]
        return list(target_modules[name].parameters())
