"""Plasticity injection (``plasticity_injection``): freeze the head, learn a correction from a fresh one.

Nikishin, Oh, Ostrovski, Lyle, Pascanu, Dabney & Barreto 2023, "Deep Reinforcement Learning with
Plasticity Injection" (NeurIPS). Definition: ``docs/reference/interventions.md#plasticity_injection``.

The paper splits the network into an encoder ``phi`` and a head ``h_theta`` and, at injection, computes
(its Expression (1), Figure 2)::

    h(x) = h_theta(phi(x)) + h_theta'(phi(x)) - h_theta'_0(phi(x))

``theta`` is the head as it was (frozen), ``theta'`` a freshly initialised head (trained) and ``theta'_0``
a frozen copy of ``theta'`` at injection: the output is unchanged at that moment, and the number of
trained parameters is unchanged too. **The head is the whole MLP after the encoder**, not its last layer
only: with a linear head, ``W x + W' x - W'_0 x`` is again one linear map with the same gradient, so
"injecting" there only restarts Adam's state of the head. Here:

- DQN (SB3's ``QNetwork``): the encoder is the features extractor (the MinAtar conv torso, or a flatten),
  the head is ``q_net.q_net`` (``Linear -> ReLU -> Linear`` in the MinAtar network);
- PPO: the encoder is the (shared or separate) features extractor, and there are two heads, the actor's
  MLP of ``mlp_extractor`` with ``action_net`` and the critic's with ``value_net``; each is injected.

The encoder keeps training, and its gradient comes through all three heads (the frozen ones are constants,
not cut from the graph), so at the moment of injection it is what it was (up to rounding: the ``new`` and
``new_0`` terms cancel). That is what the
expression computes, and what the PyTorch port ``timoklein/plasticity-injection-torch`` does
(``src/plasticity_injection.py``: ``PlasticityInjectionHead``, an MLP head ``theta`` with two copies
``theta_prime_1``/``theta_prime_2`` after the conv encoder, frozen by ``requires_grad`` only). Plasticine
(``RLE-Foundation/Plasticine``, ``plasticine/standard/ppo_procgen_pi.py``, ``Injector``) injects into the
last ``Linear`` only, which by the argument above is an optimizer-state reset; it is not followed here.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch as th
from pydantic import Field
from torch import nn
from torch.nn import functional as F

from agents import TaskSwitch
from agents.hooks import PlasticAgent
from agents.networks import split_output_layer, trainable_output_layer
from rl_plasticity.interventions.base import TriggeredIntervention, TriggerParams
from rl_plasticity.interventions.registry import register
from rl_plasticity.interventions.surgery import forget_optimizer_state


class FrozenLinear(nn.Module):
    """The map of an ``nn.Linear`` with its weight and bias held as buffers.

    Buffers, not parameters: never in the optimizer, never given a gradient, and (not being an ``nn.Linear``)
    passed by every intervention and probe that walks the trainable layers. They are in ``state_dict()``, so
    an SB3 checkpoint holds them.
    """

    def __init__(self, layer: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.register_buffer("weight", layer.weight.detach().clone())
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().clone())

    def forward(self, x: th.Tensor) -> th.Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class FrozenLayerNorm(nn.Module):
    """The map of an ``nn.LayerNorm`` with its scale and offset held as buffers (see :class:`FrozenLinear`)."""

    def __init__(self, norm: nn.LayerNorm) -> None:
        super().__init__()
        self.normalized_shape, self.eps = tuple(norm.normalized_shape), norm.eps
        weight, bias = norm.weight, norm.bias
        self.register_buffer("weight", None if weight is None else weight.detach().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def forward(self, x: th.Tensor) -> th.Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}"


_FROZEN: dict[type[nn.Module], type[nn.Module]] = {nn.Linear: FrozenLinear, nn.LayerNorm: FrozenLayerNorm}


def frozen_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` that computes the same function and has no parameter.

    Each ``nn.Linear`` and ``nn.LayerNorm`` becomes a :class:`FrozenLinear` / :class:`FrozenLayerNorm` with
    its current values; modules without parameters (activations, flatten, already frozen parts) are copied.

    :raises TypeError: for any other module with parameters (there is no frozen form of it).
    """
    frozen_type = _FROZEN.get(type(module))
    if frozen_type is not None:
        return frozen_type(module)
    frozen = copy.deepcopy(module)
    _freeze_children(frozen)
    return frozen


def _freeze_children(module: nn.Module) -> None:
    for name, child in module.named_children():
        frozen_type = _FROZEN.get(type(child))
        if frozen_type is not None:
            setattr(module, name, frozen_type(child))
        else:
            _freeze_children(child)
    if next(module.parameters(recurse=False), None) is not None:
        raise TypeError(
            f"plasticity injection cannot freeze a {type(module).__name__}: only Linear and LayerNorm "
            "layers (and modules without parameters) can be in a head"
        )


class LinearSum(nn.Module):
    """``sum_k sign_k * layer_k(h_k)`` over consecutive blocks ``h_k`` of its input: one linear map.

    The last linear map of an :class:`InjectedHead`, from the three heads' hidden layers side by side to the
    output. It calls each layer on its block (so hooks on those layers see their own input) and exposes the
    map as a whole: :attr:`weight` ``= [sign_1 W_1 | sign_2 W_2 | ...]`` and :attr:`bias` ``= sum_k sign_k
    b_k``, with their graph to the trainable layers. Built on demand by :meth:`InjectedHead.split_output_layer`.

    :param layers: linear maps (``nn.Linear``, :class:`FrozenLinear`, or a nested :class:`LinearSum`).
    :param signs: ``+1`` or ``-1`` for each layer.
    """

    def __init__(self, layers: Sequence[nn.Module], signs: Sequence[int]) -> None:
        super().__init__()
        if len(layers) != len(signs) or any(s not in (1, -1) for s in signs):
            raise ValueError("LinearSum needs one sign, +1 or -1, per layer")
        self.layers = nn.ModuleList(layers)
        self.signs = tuple(signs)
        self.in_features = sum(layer.in_features for layer in layers)
        self.out_features = layers[0].out_features

    def forward(self, h: th.Tensor) -> th.Tensor:
        blocks = h.split([layer.in_features for layer in self.layers], dim=-1)
        terms = [layer(block) for layer, block in zip(self.layers, blocks)]
        # The first term plus the sum of the others, so that terms that cancel exactly (new and new_0 at
        # injection) leave the first one bit for bit.
        rest = None
        for term, sign in zip(terms[1:], self.signs[1:]):
            rest = (term if sign > 0 else -term) if rest is None else (rest + term if sign > 0 else rest - term)
        first = terms[0] if self.signs[0] > 0 else -terms[0]
        return first if rest is None else first + rest

    @property
    def weight(self) -> th.Tensor:
        """``(out_features, in_features)``: the layers' weights side by side, each times its sign."""
        return th.cat(
            [layer.weight if sign > 0 else -layer.weight for layer, sign in zip(self.layers, self.signs)], dim=1
        )

    @property
    def bias(self) -> th.Tensor | None:
        """``sum_k sign_k b_k`` over the layers that have a bias (``None`` if none has)."""
        terms = [b if s > 0 else -b for layer, s in zip(self.layers, self.signs) if (b := layer.bias) is not None]
        return None if not terms else th.stack(terms).sum(dim=0)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, signs={self.signs}"


class InjectedHead(nn.Module):
    """A head after plasticity injection: ``old(x) + new(x) - new_0(x)``.

    :param old: the head as it was at injection, frozen (:func:`frozen_copy`; after a second injection, the
        whole previous injected head).
    :param new: the trainable head, freshly initialised at injection; its modules are those of the head
        before injection, so the parameters keep their identity (and their places in the optimizer).
    :param new_0: a frozen copy of ``new`` at injection, which cancels it at that moment.

    All three read the encoder's output ``x``. The hidden layers of the three heads, side by side, are the
    input of the last linear map (:meth:`split_output_layer`): the Q-values (or value) are
    ``[W_old | W_new | -W_new_0] [z_old; z_new; z_new_0] + b_old + b_new - b_new_0``.
    """

    def __init__(self, old: nn.Module, new: nn.Module, new_0: nn.Module) -> None:
        super().__init__()
        self.old, self.new, self.new_0 = old, new, new_0

    def forward(self, x: th.Tensor) -> th.Tensor:
        # new - new_0 first: exactly 0 at injection, so the output is then old(x) bit for bit.
        return self.old(x) + (self.new(x) - self.new_0(x))

    def split_output_layer(self) -> tuple[Any, LinearSum]:
        """``(hidden, layer)`` with ``self(x) == layer(hidden(x))`` up to rounding (see
        :func:`agents.networks.split_output_layer`): ``hidden(x) = cat(z_old, z_new, z_new_0)``, each ``z`` the
        input of its head's last linear layer, and ``layer`` the :class:`LinearSum` of those layers."""
        parts = [split_output_layer(head) for head in (self.old, self.new, self.new_0)]

        def hidden(x: th.Tensor) -> th.Tensor:
            return th.cat([part(x) for part, _ in parts], dim=-1)

        return hidden, LinearSum([layer for _, layer in parts], signs=(1, 1, -1))

    def trainable_output_layer(self) -> nn.Module:
        """The last linear layer of :attr:`new`."""
        return trainable_output_layer(self.new)


def injection_depth(head: nn.Module) -> int:
    """How many injections ``head`` has been through (0 for a head never injected)."""
    depth = 0
    while isinstance(head, InjectedHead):
        depth, head = depth + 1, head.old
    return depth


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at path ``name`` of ``root``, in place of what is there."""
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def _reinitialise(agent: PlasticAgent, head: nn.Module) -> None:
    """Fresh draws for every layer of ``head``, in module order, by the agent's own initialiser (PyTorch's
    default for DQN, SB3's orthogonal init with the output gains for PPO); LayerNorms back to 1 and 0."""
    for layer in head.modules():
        if isinstance(layer, (nn.Linear, nn.Conv2d)):
            agent.init_layer(layer)
        elif isinstance(layer, nn.LayerNorm):
            layer.reset_parameters()


class PlasticityInjectionParams(TriggerParams):
    """Parameters of :class:`PlasticityInjection`: when (``at``, ``every``) and how often."""

    max_injections: int | None = Field(
        1, ge=1, description="Injections at most (the paper injects once); null: at every trigger."
    )


@register("plasticity_injection")
class PlasticityInjection(TriggeredIntervention):
    """Freeze each MLP head after the encoder and learn old(x) + new(x) - new_0(x) (Nikishin et al. 2023).

    Nikishin et al. 2023, "Deep Reinforcement Learning with Plasticity Injection". **Head** means the whole
    MLP between the encoder and the output, :meth:`agent.mlp_heads` (DQN: ``q_net.q_net``; PPO: the actor's
    and the critic's MLP with ``action_net`` / ``value_net``); the encoder keeps training (see the module
    docstring). Each head becomes an :class:`InjectedHead`: a frozen copy of the head, the head itself
    re-initialised by the algorithm's own initialiser (:meth:`agent.init_layer`: PyTorch's default for DQN;
    SB3's orthogonal init for PPO, gain sqrt(2) in the hidden layers and 0.01 / 1 in the output layers), and
    a frozen copy of that fresh head, subtracted, so the network computes exactly the same function at the
    moment of injection.

    - **When.** At the first task switch (default), or after ``every`` updates with ``at: every``; at most
      ``max_injections`` times (default 1: the paper injects once; set it higher, or null, to inject at
      each switch). A later injection freezes the whole current injected head as the new ``old``.
    - **Optimizer.** The trainable head keeps its parameter objects, so its places in the optimizer's groups
      (and SB3's learning-rate updates) are unchanged; their Adam state starts afresh. The frozen parts are
      buffers. Parameter names change: ``q_net.0.weight`` becomes ``q_net.new.0.weight``.
    - **Features.** :attr:`agent.value_head` is the last linear map, now from the three heads' hidden layers
      side by side (``3 x`` the width: ``[z_old, z_new, z_new_0]``) to the output, and
      :meth:`agent.value_features` is that input; so the monitor's rank and collapse probes read everything
      the output is linear in (at injection ``z_new = z_new_0``, a fresh network's features, so their rank
      counts once). The dormancy probes also report the frozen heads' activations (``...old.1``, ...).
    - **DQN target network.** It gets the same structure, with the online network's frozen parts and, at
      injection, the online network's fresh head: SB3's target updates move parameters only, so a frozen
      part that differed between the two networks would never be reconciled. The target's encoder keeps its
      lag; from then on SB3's Polyak/hard updates act on the encoder and the trainable head, whose parameter
      lists line up one to one.
    - **Resume.** :meth:`state_dict` holds ``fired``, the number of injections done. A resume loads it
      *before* the agent's parameters: :meth:`attach` (or :meth:`load_state_dict` on an attached
      intervention) rebuilds the injected structure, so that SB3's ``set_parameters`` finds the modules
      (with the frozen buffers, which are in the policy's ``state_dict``). E.g.
      ``iv.load_state_dict(state); PlasticDQN.load(path, interventions=[iv])``.

    Other interventions see the trainable head's layers only; one that recycles units of the encoder
    (``redo``, ``cbp``) skips the layer that feeds the heads, since the frozen heads read it too. Logged at
    each injection under ``interventions/plasticity_injection/``: ``fired``, ``heads`` and ``params``
    (trainable scalars of the new heads).
    """

    Params = PlasticityInjectionParams
    params: PlasticityInjectionParams

    def __init__(self, params: PlasticityInjectionParams | None = None) -> None:
        super().__init__(params)
        self._agent: PlasticAgent = None

    @property
    def exhausted(self) -> bool:
        """``max_injections`` injections are done."""
        return self.params.max_injections is not None and self.fired >= self.params.max_injections

    def attach(self, agent: PlasticAgent) -> None:
        self._agent = agent
        self._rebuild(agent)

    def on_task_switch(self, agent: PlasticAgent, switch: TaskSwitch) -> None:
        if not self.exhausted:
            super().on_task_switch(agent, switch)

    def on_update(self, agent: PlasticAgent, num_gradient_steps: int) -> None:
        if not self.exhausted:
            super().on_update(agent, num_gradient_steps)

    def apply(self, agent: PlasticAgent) -> dict[str, float]:
        injected = self.inject(agent)
        return {"heads": len(injected), "params": sum(p.numel() for head in injected for p in head.new.parameters())}

    def inject(self, agent: PlasticAgent) -> list[InjectedHead]:
        """Inject into every head of ``agent`` now; return the new :class:`InjectedHead` modules."""
        target = getattr(agent, "q_net_target", None)
        injected = []
        for name, head in agent.mlp_heads().items():
            trainable = head.new if isinstance(head, InjectedHead) else head
            module = InjectedHead(frozen_copy(head), trainable, nn.Identity())
            # In place first: PPO's initialiser picks the gain by where the layer sits.
            agent.set_mlp_head(name, module)
            _reinitialise(agent, trainable)
            module.new_0 = frozen_copy(trainable)
            forget_optimizer_state(agent.optimizer, list(trainable.parameters()))
            if target is not None:
                target_head = copy.deepcopy(module).train(target.get_submodule(name).training)
                _set_submodule(target, name, target_head)
            injected.append(module)
        return injected

    def _rebuild(self, agent: PlasticAgent) -> None:
        """Give a freshly built agent the injected structure of ``fired`` injections (values are placeholders
        until it is loaded)."""
        done = injection_depth(next(iter(agent.mlp_heads().values())))
        for _ in range(self.fired - done):
            self.inject(agent)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if self._agent is not None:
            self._rebuild(self._agent)
