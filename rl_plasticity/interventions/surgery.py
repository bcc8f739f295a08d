"""Helpers that re-initialise parts of a network and the matching optimizer state.

Shared by the resets, shrink-and-perturb, ReDo and continual backprop, so that "re-initialise with the
layer's own initialiser" and "forget Adam's moments of what was touched" mean one thing everywhere.

Both ReDo and continual backprop (:mod:`rl_plasticity.interventions.cbp`) act on the *units* of hidden
layers: they re-initialise a unit's incoming weights and zero its outgoing weights. This module also holds what
they share:

- :class:`HiddenLayer`, a parametrised layer together with where its units go (the map below);
- :func:`trace_hidden_layers`, which finds the hidden layers and their post-activation values by tracing
  one forward pass of the agent's online network;
- the trace runs on :class:`~rl_plasticity.recording.ForwardRecorder` (as ``cbp``'s per-update capture does);
- :func:`recycle_units`, the surgery itself, with the optimizer state of the touched entries.

**The hidden-layer map.** A *hidden layer* is a ``Linear`` or ``Conv2d`` of :meth:`agent.online_network`
whose output goes, through nothing but these modules, into other parametrised layers::

    layer -> [LayerNorm over its units] -> activation -> [Flatten(1, -1)] -> next layer(s)

where the activation is elementwise (``ReLU``, ``tanh``, ...; :data:`ELEMENTWISE_ACTIVATIONS`) or
concatenates ``expansion`` elementwise copies along the feature dimension (``CReLU``: output ``k * d + i``
belongs to unit ``i``). The next layers are ``Linear`` (after a ``Linear``, or a conv plus flatten) or
``Conv2d`` (after a conv). Unit ``i`` of a layer with ``d`` units is output ``i`` (a conv channel is one
unit, over all positions); its outgoing weights are the input columns of each next layer that carry it:
column ``c`` comes from unit ``(c // positions) % d``, with ``positions = 1`` after a linear layer and
``H * W`` after a flattened conv (channel-major, as ``nn.Flatten`` orders ``C x H x W``). In the MinAtar
DQN the conv channel ``c`` thus owns columns ``c*64 .. c*64+63`` of ``Linear(1024, 128)``; in PPO the
shared conv torso feeds both ``mlp_extractor.policy_net.0`` and ``mlp_extractor.value_net.0``, and each
MLP's last hidden layer feeds its head (``action_net`` or ``value_net``).

The map is read off the data flow, not off module names: a :class:`~rl_plasticity.recording.ForwardRecorder`
hooks every leaf module during one forward pass and links a module to the module whose output object it
received. So it covers SB3's MLPs of any depth (actor and critic, shared or separate torsos), the MinAtar
CNN, and the LayerNorm and CReLU options of :mod:`agents.networks`. Its limits:

- only modules are seen: an output also used by functional code (``x + skip``, ``torch.cat``) outside any
  module is invisible, so zeroing the outgoing weights would not silence that unit;
- a layer whose output goes to anything else (two consumers, a non-elementwise module, a conv straight into
  a ``Linear`` without ``Flatten``, a grouped next conv) is not recycled, with a warning; the heads, whose
  output feeds no module, are never hidden;
- with LayerNorm, re-initialising a unit's incoming weights changes the normalisation statistics of the
  whole layer, so the network's function is not preserved exactly (it is without LayerNorm, see below).
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch as th
from torch import nn

from agents.hooks import PlasticAgent
from rl_plasticity.recording import ForwardRecorder


def fresh_parameters(agent: PlasticAgent, layer: nn.Module) -> dict[str, th.Tensor]:
    """A new initialisation of ``layer`` by the agent's own initialiser, leaving ``layer`` as it was.

    The layer itself is re-initialised and then restored (not a copy of it): PPO's initialiser picks the
    gain by which part of the policy the layer belongs to, which a copy is not.
    """
    saved = {name: p.detach().clone() for name, p in layer.named_parameters()}
    agent.init_layer(layer)
    fresh = {name: p.detach().clone() for name, p in layer.named_parameters()}
    with th.no_grad():
        for name, p in layer.named_parameters():
            p.copy_(saved[name])
    return fresh


def forget_optimizer_state(optimizer: th.optim.Optimizer, params: list[nn.Parameter]) -> None:
    """Drop the optimizer state of ``params``: Adam's moments and step count start afresh for them."""
    for p in params:
        optimizer.state.pop(p, None)


def zero_optimizer_entries(optimizer: th.optim.Optimizer, param: nn.Parameter, mask: th.Tensor) -> None:
    """Zero the per-entry optimizer state (e.g. Adam's ``exp_avg`` and ``exp_avg_sq``) where ``mask`` is true.

    The step count is shared by the whole tensor, so it is left alone.
    """
    state = optimizer.state.get(param)
    if not state:
        return
    for value in state.values():
        if isinstance(value, th.Tensor) and value.shape == param.shape:
            value[mask] = 0.0


#: Activations that map each unit to its own output(s) only, so a unit can be recycled on its own.
ELEMENTWISE_ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Tanh, nn.Sigmoid, nn.Softplus, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid,
)  # fmt: skip


def _expansion(activation: nn.Module) -> int | None:
    """Outputs per unit of ``activation``: 1 if elementwise, ``expansion`` for a concatenating one
    (:class:`agents.networks.CReLU` declares it), ``None`` if it mixes units."""
    if isinstance(activation, ELEMENTWISE_ACTIVATIONS):
        return 1
    expansion = getattr(activation, "expansion", None)
    if isinstance(expansion, int) and expansion >= 1 and getattr(activation, "dim", None) == 1:
        return expansion
    return None


@dataclass(frozen=True, eq=False)
class HiddenLayer:
    """A parametrised layer of the online network whose units feed other parametrised layers.

    :param name: module path of the layer in :meth:`agent.online_network`.
    :param layer: the ``Linear`` or ``Conv2d`` itself (its output rows/channels are the units).
    :param activation: module path of its activation; that module's output is the layer's post-activation
        values ``H`` (``(n, expansion * d)`` or ``(n, expansion * C, H, W)``).
    :param outgoing: the layers that read the activation (after a flatten for a conv), in module order.
    :param norm: the LayerNorm between the layer and its activation, if any.
    :param expansion: outputs of the activation per unit (2 for CReLU, else 1).
    """

    name: str
    layer: nn.Linear | nn.Conv2d
    activation: str
    outgoing: tuple[nn.Linear | nn.Conv2d, ...]
    norm: nn.LayerNorm | None = None
    expansion: int = 1

    @property
    def units(self) -> int:
        """Number of units: output features of a ``Linear``, output channels of a ``Conv2d``."""
        return self.layer.out_features if isinstance(self.layer, nn.Linear) else self.layer.out_channels

    def column_units(self, next_layer: nn.Module) -> th.Tensor:
        """For each input column of ``next_layer`` (dim 1 of its weight), the unit of this layer it comes from."""
        columns = next_layer.weight.shape[1]
        positions = columns // (self.expansion * self.units)  # 1, or H * W after a flattened conv
        return (th.arange(columns, device=next_layer.weight.device) // positions) % self.units

    def unit_view(self, H: th.Tensor) -> th.Tensor:
        """``H`` arranged as :func:`~rl_plasticity.probes.unit_scores` reads it: ``(n, d)`` for a plain dense
        layer, else ``(n, d, expansion, positions)``, so a conv channel's positions and CReLU's two outputs
        of a unit are averaged together as that unit's values."""
        n = H.shape[0]
        if self.expansion == 1 and H.dim() == 2:
            return H
        # Outputs are ordered (copy k, unit i, position p): move the unit first.
        return H.reshape(n, self.expansion, self.units, -1).transpose(1, 2)

    def mean_abs(self, H: th.Tensor) -> th.Tensor:
        """Mean ``|h_i|`` of each unit over the batch (and positions, and CReLU's outputs), float64."""
        view = self.unit_view(H.detach()).abs().double()
        return view.mean(dim=0) if view.dim() == 2 else view.mean(dim=(0, 2, 3))

    def outgoing_magnitude(self) -> th.Tensor:
        """``sum_k |w_{k,i}|`` over every outgoing weight of each unit ``i`` (all next layers), float64."""
        total = th.zeros(self.units, dtype=th.float64, device=self.layer.weight.device)
        for nxt in self.outgoing:
            weight = nxt.weight.detach().abs().double()
            per_column = weight.sum(dim=0) if weight.dim() == 2 else weight.sum(dim=(0, 2, 3))
            total.index_add_(0, self.column_units(nxt), per_column)
        return total


def _follow(
    name: str, layer: nn.Module, modules: dict[str, nn.Module], consumers: dict[str, list[str]]
) -> HiddenLayer | str | None:
    """The :class:`HiddenLayer` rooted at ``layer``, a reason string if it has an activation but an
    unsupported path to the next layers, or ``None`` if it is not a hidden layer (a head)."""
    units = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    chain = consumers.get(name, [])
    norm = None
    if len(chain) == 1 and isinstance(modules[chain[0]], nn.LayerNorm):
        norm = modules[chain[0]]
        if not isinstance(layer, nn.Linear) or tuple(norm.normalized_shape) != (units,):
            return f"its LayerNorm normalises {tuple(norm.normalized_shape)}, not its {units} units"
        chain = consumers.get(chain[0], [])
    if len(chain) != 1 or _expansion(modules[chain[0]]) is None:
        return None if norm is None else "its LayerNorm does not feed a single elementwise activation"
    activation = chain[0]
    expansion = _expansion(modules[activation])
    assert expansion is not None
    outgoing: list[nn.Module] = []
    for consumer in consumers.get(activation, []):
        module = modules[consumer]
        if isinstance(module, nn.Flatten) and module.start_dim == 1 and module.end_dim == -1:
            nexts = [modules[c] for c in consumers.get(consumer, [])]
            if not all(isinstance(m, nn.Linear) for m in nexts):
                return f"its flattened output goes to {[type(m).__name__ for m in nexts]}, not only to Linear layers"
            outgoing += nexts
        elif isinstance(module, nn.Linear) and isinstance(layer, nn.Linear):
            outgoing.append(module)
        elif isinstance(module, nn.Conv2d) and isinstance(layer, nn.Conv2d) and module.groups == 1:
            outgoing.append(module)
        else:
            return f"its activation {activation} feeds {type(module).__name__} {consumer}"
    if not outgoing:
        return f"its activation {activation} feeds no parametrised layer"
    for nxt in outgoing:
        if nxt.weight.shape[1] % (expansion * units):
            return f"{nxt.weight.shape[1]} input columns of the next layer are not a multiple of {expansion * units}"
    unique = tuple(dict.fromkeys(outgoing))
    return HiddenLayer(name, layer, activation, unique, norm, expansion)  # type: ignore[arg-type]


def find_hidden_layers(agent: PlasticAgent, edges: Iterable[tuple[str, str]]) -> list[HiddenLayer]:
    """The hidden layers of the agent's online network, input to output, given traced data-flow ``edges``.

    Layers that have an activation but an unsupported path to the next layer are skipped with a warning
    (see the module docstring); layers whose output feeds no module are heads and are skipped silently.
    """
    modules = dict(agent.online_network().named_modules())
    consumers: dict[str, list[str]] = defaultdict(list)
    for source, consumer in sorted(edges):
        consumers[source].append(consumer)
    hidden = []
    for name, layer in agent.parametrized_layers():
        found = _follow(name, layer, modules, consumers)
        if isinstance(found, HiddenLayer):
            hidden.append(found)
        elif found is not None:
            warnings.warn(f"layer {name} is not recycled: {found}", stacklevel=2)
    return hidden


def network_forward(agent: PlasticAgent, batch: NamedTuple) -> None:
    """Run every branch of the agent's online network on ``batch.observations``, through its own modules
    (:meth:`~agents.hooks.PlasticAgent.forward_all`; DQN: the Q-network; PPO: SB3's ``evaluate_actions``).

    The network's own ``forward`` calls each head's layers as modules, in order, which the trace needs;
    the agents' training losses may read a head's last linear map off its weights instead (after plasticity
    injection, one map over three hidden layers).
    """
    agent.forward_all(batch)


def trace_hidden_layers(agent: PlasticAgent, batch: NamedTuple) -> tuple[list[HiddenLayer], dict[str, th.Tensor]]:
    """Find the hidden layers and their post-activation values on ``batch`` from one forward pass.

    The pass is the online network's own forward on the batch (:func:`network_forward`), so every hidden
    layer of every branch (actor, critic, Q-network) runs as in training, with the current weights. It runs
    under ``no_grad``: it builds no graph and does not trigger other interventions' hooks, which record
    gradient-enabled calls only.

    :return: the hidden layers (input to output) and activation module path -> ``H`` (detached).
    """
    with th.no_grad(), ForwardRecorder(agent.online_network(), trace=True) as recorder:
        network_forward(agent, batch)
    hidden = find_hidden_layers(agent, recorder.edges)
    if not hidden:
        raise RuntimeError("found no hidden layer (a Linear/Conv2d feeding another through an activation)")
    return hidden, {h.activation: recorder.outputs[h.activation].detach() for h in hidden}


def _entries(param: th.Tensor, index: th.Tensor, dim: int) -> th.Tensor:
    """Boolean mask of ``param``'s shape selecting the slices ``index`` (boolean) along ``dim``."""
    shape = [1] * param.dim()
    shape[dim] = -1
    return index.reshape(shape).expand_as(param)


@th.no_grad()
def recycle_units(agent: PlasticAgent, selections: Sequence[tuple[HiddenLayer, th.Tensor]]) -> int:
    """Re-initialise chosen units: fresh incoming weights, zero outgoing weights, zeroed optimizer entries.

    For each ``(hidden, mask)`` (``mask``: boolean, one entry per unit):

    1. the units' incoming weights and biases (rows, or output channels) are copied from a fresh draw of
       the agent's own initialiser (:func:`~rl_plasticity.interventions.surgery.fresh_parameters`:
       PyTorch's default for DQN, SB3's orthogonal init with the layer's gain and zero bias for PPO); a
       LayerNorm's scale and offset of those units go back to PyTorch's 1 and 0;
    2. their outgoing weights, in every next layer, are set to zero (after step 1 for all layers, so a
       unit whose next layer was also re-initialised still ends with zero outgoing weights);
    3. the optimizer's per-entry state (Adam's ``exp_avg``, ``exp_avg_sq``) of every touched entry is
       zeroed (:func:`~rl_plasticity.interventions.surgery.zero_optimizer_entries`); Adam's step count is
       one per tensor and stays.

    With zero outgoing weights the recycled units no longer reach the output, whatever their new incoming
    weights: the output changes only by the (small) contribution the old units had, and not at all for
    units that were silent on the batch. The target network (DQN) is left alone: it is a lagged copy of
    the online network and takes the new weights at its next sync.

    :return: number of units recycled.
    """
    optimizer = agent.optimizer
    selections = [(hidden, mask) for hidden, mask in selections if bool(mask.any())]
    for hidden, mask in selections:
        fresh = fresh_parameters(agent, hidden.layer)
        for pname, param in hidden.layer.named_parameters(recurse=False):
            param[mask] = fresh[pname][mask].to(param.dtype)
            zero_optimizer_entries(optimizer, param, _entries(param, mask, 0))
        if hidden.norm is not None and hidden.norm.elementwise_affine:
            hidden.norm.weight[mask] = 1.0
            if hidden.norm.bias is not None:
                hidden.norm.bias[mask] = 0.0
            for param in hidden.norm.parameters(recurse=False):
                zero_optimizer_entries(optimizer, param, _entries(param, mask, 0))
    for hidden, mask in selections:
        for nxt in hidden.outgoing:
            columns = mask[hidden.column_units(nxt)]
            entries = _entries(nxt.weight, columns, 1)
            nxt.weight[entries] = 0.0
            zero_optimizer_entries(optimizer, nxt.weight, entries)
    return sum(int(mask.sum()) for _, mask in selections)
