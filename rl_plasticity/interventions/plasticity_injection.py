"""Plasticity injection (``plasticity_injection``): freeze the head, learn a correction from a fresh one.

Nikishin, Oh, Ostrovski, Lyle, Pascanu, Dabney & Barreto 2023, "Deep Reinforcement Learning with
Plasticity Injection" (NeurIPS). Definition: ``shared/reference/interventions.md``.

After an injection each head computes ``h(x) = old(x) + new(x) - new_0(x)``: ``old`` is the head as it
was (frozen), ``new`` a freshly initialised head (trained) and ``new_0`` a frozen copy of ``new`` at
injection, so the output is unchanged at that moment and only ``new`` learns from then on.
"""

from __future__ import annotations

import copy
from typing import Any

import torch as th
from pydantic import Field
from torch import nn
from torch.nn import functional as F

from agents import TaskSwitch
from rl_plasticity.interventions.base import TriggeredIntervention, TriggerParams
from rl_plasticity.interventions.registry import register
from rl_plasticity.interventions.surgery import forget_optimizer_state


class InjectedLinear(nn.Module):
    """A linear head after plasticity injection: ``old(x) + new(x) - new_0(x)``.

    The frozen parts are buffers, not parameters, so they are never in the optimizer, never get a gradient
    and are not seen by interventions that walk the parameters or the Linear layers: the only trainable
    part, and the only ``nn.Linear`` inside, is :attr:`new`. The buffers are in ``state_dict()``, so an SB3
    checkpoint holds them.

    The sum is a linear map again; :attr:`weight` and :attr:`bias` give it (with the graph to ``new``), so
    the module can stand wherever the last ``nn.Linear`` is read (e.g. neural collapse's classifier).

    :param frozen_weight: weight of the head being frozen (``old``).
    :param frozen_bias: its bias, or ``None``.
    :param new: the trainable new head. Its current values become the frozen copy ``new_0``; re-initialise
        it and call :meth:`anchor` again if it is initialised after construction.
    """

    def __init__(self, frozen_weight: th.Tensor, frozen_bias: th.Tensor | None, new: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = new.in_features, new.out_features
        self.new = new
        self.register_buffer("frozen_weight", frozen_weight.detach().clone())
        self.register_buffer("frozen_bias", None if frozen_bias is None else frozen_bias.detach().clone())
        self.register_buffer("copy_weight", th.empty_like(new.weight))
        self.register_buffer("copy_bias", None if new.bias is None else th.empty_like(new.bias))
        self.anchor()

    @th.no_grad()
    def anchor(self) -> None:
        """Make the frozen copy ``new_0`` equal to ``new`` as it is now (so ``new`` and ``new_0`` cancel)."""
        self.copy_weight.copy_(self.new.weight)
        if self.copy_bias is not None:
            self.copy_bias.copy_(self.new.bias)

    def forward(self, x: th.Tensor) -> th.Tensor:
        old = F.linear(x, self.frozen_weight, self.frozen_bias)
        return old + self.new(x) - F.linear(x, self.copy_weight, self.copy_bias)

    @property
    def weight(self) -> th.Tensor:
        """The effective weight ``W_old + W_new - W_new_0``."""
        return self.frozen_weight + self.new.weight - self.copy_weight

    @property
    def bias(self) -> th.Tensor | None:
        """The effective bias ``b_old + b_new - b_new_0`` (``None`` for a head without bias)."""
        if self.frozen_bias is None:
            return None
        return self.frozen_bias + self.new.bias - self.copy_bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at path ``name`` of ``root``, in place of what is there."""
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def _swap_optimizer_params(optimizer: th.optim.Optimizer, old: list[nn.Parameter], new: list[nn.Parameter]) -> None:
    """Put ``new`` in ``old``'s places in the optimizer's parameter groups and drop ``old``'s state.

    Same positions, same groups: the groups keep their length and order (so a checkpointed optimizer
    state loads into a rebuilt network), and their settings (lr, which SB3 updates on every group) apply.
    """
    replacement = {id(p): q for p, q in zip(old, new, strict=True)}
    for group in optimizer.param_groups:
        group["params"] = [replacement.get(id(p), p) for p in group["params"]]
    forget_optimizer_state(optimizer, old)


class PlasticityInjectionParams(TriggerParams):
    """Parameters of :class:`PlasticityInjection`: when (``at``, ``every``) and how often."""

    max_injections: int | None = Field(
        1, ge=1, description="Injections at most (the paper injects once); null: at every trigger."
    )


@register("plasticity_injection")
class PlasticityInjection(TriggeredIntervention):
    """Freeze the head(s) and learn old(x) + new(x) - new_0(x), output unchanged (Nikishin et al. 2023).

    Nikishin et al. 2023, "Deep Reinforcement Learning with Plasticity Injection". Each head in
    :meth:`agent.head_layers` (DQN: the Q head; PPO: the action and the value head) becomes an
    :class:`InjectedLinear`: the head is frozen, a new head initialised by the algorithm's own initialiser
    (:meth:`agent.init_layer`, with the head's gain for PPO) is trained, and a frozen copy of the new head
    is subtracted, so the network computes the same function at the moment of injection.

    - **When.** At the first task switch (default), or after ``every`` updates with ``at: every``; at most
      ``max_injections`` times (default 1: the paper injects once, as a one-off boost of plasticity; set
      it higher, or null, to inject at each switch). A later injection freezes the current *effective*
      head, so the structure stays one level deep.
    - **Optimizer.** The new head's parameters take the old head's places in the optimizer's parameter
      group (so SB3's learning-rate updates reach them) with fresh Adam state; the frozen parts are buffers.
      The trainable parameters are renamed accordingly: ``<head>.weight`` becomes ``<head>.new.weight``.
    - **DQN target network.** It gets the same structure, with the *online* network's frozen parts (they
      are constants, the same in both) and its own lag moved into its new head:
      ``W_new_target = W_target - W_old + W_new_0``. Its output is unchanged too, and since the parameter
      lists of the two networks still line up one to one, SB3's Polyak/hard updates act exactly on the
      effective heads.
    - **Resume.** :meth:`state_dict` holds ``fired``, the number of injections done. A resume loads it
      *before* the agent's parameters: :meth:`attach` (or :meth:`load_state_dict` on an attached
      intervention) rebuilds the injected structure, so that SB3's ``set_parameters`` finds the modules
      (with the frozen buffers, which are in the policy's ``state_dict``) and the optimizer's groups laid
      out as they were saved. E.g. ``iv.load_state_dict(state); PlasticDQN.load(path, interventions=[iv])``.

    With a one-layer linear head the injected map is linear in ``W_new``, so the gradient of ``W_new`` is
    that of the effective head: in exact arithmetic, training after an injection is training the old head
    on with Adam's state started afresh (plus where other interventions act: L2 terms and resets see only
    ``new``). Logged at each injection under ``interventions/plasticity_injection/``: ``fired``, ``heads``
    and ``params`` (trainable scalars of the new heads).
    """

    Params = PlasticityInjectionParams
    params: PlasticityInjectionParams

    def __init__(self, params: PlasticityInjectionParams | None = None) -> None:
        super().__init__(params)
        self._agent: Any = None

    @property
    def exhausted(self) -> bool:
        """``max_injections`` injections are done."""
        return self.params.max_injections is not None and self.fired >= self.params.max_injections

    def attach(self, agent: Any) -> None:
        self._agent = agent
        if self.fired > 0:
            self._rebuild(agent)

    def on_task_switch(self, agent: Any, switch: TaskSwitch) -> None:
        if not self.exhausted:
            super().on_task_switch(agent, switch)

    def on_update(self, agent: Any, num_gradient_steps: int) -> None:
        if not self.exhausted:
            super().on_update(agent, num_gradient_steps)

    def apply(self, agent: Any) -> dict[str, float]:
        injected = self.inject(agent)
        return {"heads": len(injected), "params": sum(p.numel() for head in injected for p in head.new.parameters())}

    def inject(self, agent: Any) -> list[InjectedLinear]:
        """Inject into every head of ``agent`` now; return the new :class:`InjectedLinear` modules."""
        online = agent.online_network()
        target = getattr(agent, "q_net_target", None)
        names = {id(m): name for name, m in online.named_modules()}
        injected = []
        for head in agent.head_layers():
            name = names[id(head)]
            old_params = list(head.parameters())
            # deepcopy, not a new nn.Linear: the constructor would draw an initialisation of its own.
            fresh = copy.deepcopy(head.new if isinstance(head, InjectedLinear) else head)
            module = InjectedLinear(head.weight, head.bias, fresh)
            # Initialise in place, inside the network: PPO's init_layer picks the gain by the head it is in.
            _set_submodule(online, name, module)
            agent.init_layer(module.new)
            module.anchor()
            _swap_optimizer_params(agent.optimizer, old_params, list(module.new.parameters()))
            if target is not None:
                _set_submodule(target, name, self._target_head(module, target.get_submodule(name)))
            injected.append(module)
        return injected

    @staticmethod
    def _target_head(online: InjectedLinear, target_head: nn.Module) -> InjectedLinear:
        """The target network's injected head: the online one's frozen parts, the target's own lag in ``new``."""
        head = copy.deepcopy(online).train(target_head.training)
        with th.no_grad():
            head.new.weight.copy_(target_head.weight - online.frozen_weight + online.copy_weight)
            if online.frozen_bias is not None:
                head.new.bias.copy_(target_head.bias - online.frozen_bias + online.copy_bias)
        return head

    def _rebuild(self, agent: Any) -> None:
        """Give a freshly built agent the injected structure (values are placeholders until it is loaded)."""
        if not any(isinstance(head, InjectedLinear) for head in agent.head_layers()):
            self.inject(agent)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if self._agent is not None and self.fired > 0:
            self._rebuild(self._agent)
