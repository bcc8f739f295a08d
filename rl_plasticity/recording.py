"""Forward hooks that record what modules of a network output: the one recorder the monitor and the
interventions share (the probes' activations, ``l2_er``'s, ReDo's data-flow trace, CBP's per-update capture,
``kfac_rank``'s layer inputs and outputs).

The probes package keeps its own hook in :func:`rl_plasticity.probes.kfac.kfac_factor_rows`: the probes import
nothing else of the project, and that hook also hands a copy of the output downstream.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from typing import Any, Self

import torch as th
from torch import nn
from torch.utils.hooks import RemovableHandle

from agents import CReLU

#: Activation modules whose outputs the dormancy probes read (the post-activation values H of
#: docs/reference/metrics.md).
#: A CReLU output has two entries per linear unit (its positive and negative parts); each counts as a unit.
ACTIVATIONS = (nn.ReLU, nn.Tanh, CReLU)


def _recording_hook(module: nn.Module, name: str, recorder: ForwardRecorder) -> Any:
    """A forward hook for ``module`` that writes into ``recorder`` (see :class:`ForwardRecorder`).

    A closure over the recorder's dicts, not a bound method: ``copy.deepcopy`` of a module copies its hooks,
    and a bound method would drag the recorder (and everything it references) into the copy.
    """
    outputs, inputs, versions = recorder.outputs, recorder.inputs, recorder.versions
    edges = recorder.edges if recorder.trace else None
    detach, grad_only, graph_only, keep_inputs = (
        recorder.detach,
        recorder.grad_only,
        recorder.graph_only,
        recorder.keep_inputs,
    )

    def hook(called: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        # Deep copies of the module (e.g. the trainability probe's) share this hook: ignore their calls.
        if called is not module or not isinstance(output, th.Tensor):
            return
        if (grad_only and not th.is_grad_enabled()) or (graph_only and not output.requires_grad):
            return
        if keep_inputs:
            inputs[name] = args[0]
            # The output's version tells a reader if an in-place op (ReLU(inplace=True)) changed it later.
            versions[name] = output._version
        if edges is None:
            outputs[name] = output.detach() if detach else output
            return
        if args:
            # The latest module that returned this very object produced it (an in-place activation or a
            # no-op flatten returns its input object, which its own producer returned before).
            source = next((src for src, out in reversed(outputs.items()) if out is args[0]), None)
            if source is not None:
                edges.add((source, name))
        # Keep the object itself (its identity links it to its consumers), moved last: the dict is in call order.
        outputs.pop(name, None)
        outputs[name] = output

    return hook


class ForwardRecorder:
    """Forward hooks on modules of a network: each one's last output (and input) and, when tracing, the data flow.

    :param network: the network (e.g. the agent's online network).
    :param names: module paths to hook; ``None`` hooks the modules ``select`` picks.
    :param select: with ``names=None``, which modules to hook (default: every leaf module). The network itself
        is never hooked.
    :param trace: also record ``(producer, consumer)`` edges: module B consumed module A's output if B's
        first input *is* the tensor object A returned. Outputs are then kept as they are (no ``detach``),
        which is meant for a short ``no_grad`` pass, in the order of their last call.
    :param detach: keep detached outputs (without ``trace``); ``False`` keeps their graph, for a loss that
        differentiates through them.
    :param grad_only: record only calls made with gradients enabled, i.e. the training forward pass, not
        rollouts, targets or evaluation (which run under ``no_grad``).
    :param graph_only: record only calls whose output requires grad (a frozen layer fed by the observations
        does not).
    :param keep_inputs: also keep each call's first input (``inputs``) and its output's version (``versions``).
    """

    def __init__(
        self,
        network: nn.Module,
        names: Collection[str] | None = None,
        trace: bool = False,
        grad_only: bool = False,
        *,
        select: Callable[[nn.Module], bool] | None = None,
        detach: bool = True,
        graph_only: bool = False,
        keep_inputs: bool = False,
    ) -> None:
        self.outputs: dict[str, th.Tensor] = {}
        self.inputs: dict[str, th.Tensor] = {}
        self.versions: dict[str, int] = {}
        self.edges: set[tuple[str, str]] = set()
        self.trace, self.detach, self.grad_only, self.graph_only = trace, detach, grad_only, graph_only
        self.keep_inputs = keep_inputs
        self._handles: list[RemovableHandle] = []
        for name, module in network.named_modules():
            if names is not None:
                chosen = name in names
            else:
                chosen = select(module) if select is not None else next(module.children(), None) is None
            if chosen and name:
                self._handles.append(module.register_forward_hook(_recording_hook(module, name, self)))

    def clear(self) -> None:
        """Forget what was recorded (the hooks stay)."""
        self.outputs.clear()
        self.inputs.clear()
        self.versions.clear()
        self.edges.clear()

    def remove(self) -> None:
        """Remove the hooks (the recorded outputs stay readable)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


@contextmanager
def activation_outputs(module: nn.Module, detach: bool = True) -> Iterator[dict[str, th.Tensor]]:
    """Collect the output of every activation module of ``module`` (:data:`ACTIVATIONS`) during the block,
    keyed by module path, each ``(n, ...)``.

    :param detach: drop the graph (the probes); keep it for a loss that differentiates through them (l2_er).
    """
    with ForwardRecorder(module, select=lambda m: isinstance(m, ACTIVATIONS), detach=detach) as recorder:
        yield recorder.outputs
