"""Continual backprop (``cbp``), Dohare et al. 2024.

Dohare, Hernandez-Garcia, Lan, Rahman, Mahmood & Sutton 2024, "Loss of plasticity in deep continual
learning" (Nature 632). Definition: ``docs/reference/interventions.md#cbp``. The unit surgery and the
hidden-layer map are shared with ReDo (:mod:`rl_plasticity.interventions.surgery`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch as th
from pydantic import Field

from agents.hooks import PlasticAgent
from rl_plasticity.interventions.base import Params, PlasticityIntervention
from rl_plasticity.interventions.registry import register
from rl_plasticity.interventions.surgery import HiddenLayer, recycle_units, trace_hidden_layers
from rl_plasticity.recording import ForwardRecorder


class CBPParams(Params):
    """Parameters of :class:`ContinualBackprop` (defaults from Dohare et al. 2024 and their code)."""

    replacement_rate: float = Field(
        1e-4, ge=0.0, le=1.0, description="rho: expected replacements per mature unit per update (paper: 1e-4)."
    )
    maturity_threshold: int = Field(
        100, ge=0, description="m: a unit can be replaced once its age exceeds m updates (paper: 100)."
    )
    decay_rate: float = Field(
        0.99, ge=0.0, lt=1.0, description="eta: decay of the running contribution utility (paper's code: 0.99)."
    )


@register("cbp")
class ContinualBackprop(PlasticityIntervention):
    """Continual backprop: replace mature units of lowest contribution utility at rate rho (Dohare et al. 2024).

    Dohare et al. 2024, "Loss of plasticity in deep continual learning" (Nature), Algorithm 1 and the
    ``GnT``/``ConvGnT`` classes of their code (``shibhansh/loss-of-plasticity``, ``lop/algos``). After every
    gradient update, for each hidden layer (:class:`~rl_plasticity.interventions.surgery.HiddenLayer`; a conv
    channel is a unit):

    1. every unit ages by one update;
    2. its contribution utility is updated with the post-activation values ``h_i`` of that update's batch
       and its outgoing weights ``w_{k,i}`` (all next layers)::

           u_i <- eta * u_i + (1 - eta) * mean|h_i| * sum_k |w_{k,i}|
           u_hat_i = u_i / (1 - eta ** age_i)        (bias-corrected, as Adam's moments)

       ``mean|h_i|`` runs over the batch (and a conv channel's positions, and CReLU's two outputs);
    3. units with ``age_i > m`` are mature; the layer's accumulator grows by ``rho * (number mature)``;
    4. ``int(accumulator)`` mature units with the lowest ``u_hat`` (ties: lowest index) are replaced and the
       accumulator keeps the fraction: their incoming weights and bias are redrawn from the agent's
       initialiser, their outgoing weights zeroed, the Adam moments of those entries zeroed
       (:func:`~rl_plasticity.interventions.surgery.recycle_units`), and their utility and age reset to 0.

    Zero outgoing weights mean a new unit does not change the output; the output loses the replaced unit's
    old contribution, which is the smallest in its layer by construction.

    Choices and differences from the paper's code:

    - utility: the *contribution* utility with ``sum_k |w_{k,i}|``, the paper's equation (the code takes the
      mean over the next layer's rows, a constant factor per layer, so the ranking is the same with one next
      layer; with several, as PPO's shared torso feeding actor and critic, the sum counts both). The code's
      variant with mean-corrected activations (``|h_i - mean h_i|``, "zero_contribution") is not used. For a
      conv channel feeding a flattened linear layer the code averages the per-position products; here it is
      mean ``|h|`` over positions times the sum over all the channel's weights, one number per unit as above;
    - replacements: the accumulator of ``GnT`` with ``accumulate=True`` (``rho * n_mature`` per update;
      ``ConvGnT`` adds ``rho * n_units``), not ``GnT``'s default coin flip when ``rho * n < 1``; maturity is
      ``age > m`` as in the code;
    - no bias compensation in the next layer: the fully-connected ``GnT`` adds the removed unit's mean
      contribution to the next layer's bias, ``ConvGnT`` does not; zero outgoing weights alone keep the
      new unit out of the output, as the spec asks;
    - initialiser: the agent's own (the code uses Kaiming-uniform weights and zero bias);
    - optimizer: PyTorch's Adam keeps one step count per tensor, so only the moments of the touched
      entries are zeroed (the code's ``AdamGnT`` also restarts a per-entry step count);
    - utilities are updated at every update, also when ``rho = 0`` (the code then skips them), so they can
      be inspected without replacing anything.

    The DQN target network is not touched (see :class:`~rl_plasticity.interventions.redo.ReDo`).

    **Activations.** They are those of the training forward pass of each update (weights before the step,
    as the code passes the step's features to ``gen_and_test`` after ``opt.step()``), captured by forward
    hooks on the activation modules for gradient-enabled calls and read in :meth:`loss_terms`, right after
    that pass; the outgoing weights are read after the step. Hooks are cheaper than recomputing: the
    utilities need every update's activations, and a recomputation would add a forward pass to each. The
    hidden layers are found once, by tracing the first batch
    (:func:`~rl_plasticity.interventions.surgery.trace_hidden_layers`).

    State (:meth:`state_dict`): per hidden layer the raw utilities, the ages and the accumulator, as tensors,
    plus the counters, so a resumed run replaces the same units at the same updates.

    Logged at each update that replaces units, under ``interventions/cbp/``: ``fired``, ``replaced`` (that
    update, all layers), ``replaced/<layer>`` and ``replaced_total`` (since the start).
    """

    Params = CBPParams
    params: CBPParams

    def __init__(self, params: CBPParams | None = None) -> None:
        super().__init__(params)
        #: Per hidden layer (module path): raw utility u (float64), age in updates (int64), accumulator (float64, 0-d).
        self.utility: dict[str, th.Tensor] = {}
        self.age: dict[str, th.Tensor] = {}
        self.accumulator: dict[str, th.Tensor] = {}
        self.replaced_total = 0
        self._hidden: list[HiddenLayer] | None = None
        self._recorder: ForwardRecorder | None = None
        self._activity: dict[str, th.Tensor] | None = None

    @property
    def hidden_layers(self) -> list[HiddenLayer]:
        """The hidden layers it acts on (empty until the first training batch has been seen)."""
        return list(self._hidden or [])

    def attach(self, agent: PlasticAgent) -> None:
        # A (re)built network: find its layers again at the next batch; utilities and ages are kept by name.
        if self._recorder is not None:
            self._recorder.remove()
        self._recorder, self._hidden, self._activity = None, None, None

    def _setup(self, agent: PlasticAgent, hidden: list[HiddenLayer]) -> None:
        """Start tracking ``hidden``: hooks on their activations for the training passes, and their state."""
        self._hidden = hidden
        self._recorder = ForwardRecorder(agent.online_network(), names={h.activation for h in hidden}, grad_only=True)
        self._check_state()

    def _check_state(self) -> None:
        """Give every tracked layer its state (zeros if none was loaded), checked and on the layer's device."""
        for h in self.hidden_layers:
            device = h.layer.weight.device
            if h.name not in self.utility:
                self.utility[h.name] = th.zeros(h.units, dtype=th.float64)
                self.age[h.name] = th.zeros(h.units, dtype=th.int64)
                self.accumulator[h.name] = th.zeros((), dtype=th.float64)
            if self.utility[h.name].shape != (h.units,) or self.age[h.name].shape != (h.units,):
                units = self.utility[h.name].numel()
                raise ValueError(f"cbp: the state of {h.name} has {units} units, the layer {h.units}")
            for state in (self.utility, self.age, self.accumulator):
                state[h.name] = state[h.name].to(device)

    def loss_terms(
        self, agent: PlasticAgent, batch: NamedTuple, features: th.Tensor, loss: th.Tensor
    ) -> dict[str, th.Tensor]:
        # Called right after the training forward pass: keep mean |h| of each unit for on_update.
        if self._hidden is None:
            hidden, activations = trace_hidden_layers(agent, batch)  # same weights and batch as that pass
            self._setup(agent, hidden)
        else:
            assert self._recorder is not None
            activations = dict(self._recorder.outputs)
            missing = [h.activation for h in self.hidden_layers if h.activation not in activations]
            if missing:
                raise RuntimeError(f"cbp: the training forward pass did not run {missing} with gradients enabled")
            self._recorder.outputs.clear()  # never reuse a stale batch
        self._activity = {h.name: h.mean_abs(activations[h.activation]) for h in self.hidden_layers}
        return {}

    def bias_corrected_utility(self, name: str) -> th.Tensor:
        """``u_hat = u / (1 - eta ** age)`` of the units of layer ``name`` (0 for a unit of age 0)."""
        age = self.age[name]
        correction = 1.0 - self.params.decay_rate ** age.double()
        return th.where(age > 0, self.utility[name] / correction.clamp_min(1e-300), th.zeros_like(self.utility[name]))

    def on_update(self, agent: PlasticAgent, num_gradient_steps: int) -> None:
        if self._activity is None:
            return  # no training forward pass since the last update
        activity, self._activity = self._activity, None
        eta, rho, maturity = self.params.decay_rate, self.params.replacement_rate, self.params.maturity_threshold
        selections = []
        for h in self.hidden_layers:
            age, utility, accumulator = self.age[h.name], self.utility[h.name], self.accumulator[h.name]
            age += 1
            utility.mul_(eta).add_((1.0 - eta) * activity[h.name] * h.outgoing_magnitude())
            mature = th.nonzero(age > maturity).flatten()
            accumulator += rho * mature.numel()
            count = min(int(accumulator), mature.numel())
            accumulator -= count
            mask = th.zeros(h.units, dtype=th.bool, device=age.device)
            if count:
                lowest = th.argsort(self.bias_corrected_utility(h.name)[mature], stable=True)[:count]
                mask[mature[lowest]] = True
                utility[mask] = 0.0
                age[mask] = 0
            selections.append((h, mask))
        replaced = recycle_units(agent, selections)
        if replaced:
            self.replaced_total += replaced
            per_layer = {f"replaced/{h.name}": int(mask.sum()) for h, mask in selections}
            self.fire(agent, replaced=replaced, replaced_total=self.replaced_total, **per_layer)

    def state_dict(self) -> dict[str, Any]:
        layers = {
            name: {"utility": u.clone(), "age": self.age[name].clone(), "accumulator": self.accumulator[name].clone()}
            for name, u in self.utility.items()
        }
        return {**super().state_dict(), "replaced_total": self.replaced_total, "layers": layers}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.replaced_total = int(state["replaced_total"])
        layers = state["layers"]
        self.utility = {name: th.as_tensor(s["utility"], dtype=th.float64).clone() for name, s in layers.items()}
        self.age = {name: th.as_tensor(s["age"], dtype=th.int64).clone() for name, s in layers.items()}
        self.accumulator = {
            name: th.as_tensor(s["accumulator"], dtype=th.float64).clone() for name, s in layers.items()
        }
        self._check_state()  # if layers are tracked already; otherwise when they are found
