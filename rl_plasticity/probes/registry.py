"""The registry of probes: config name -> what it logs, when it runs and how it reads a batch.

A probe module of this package registers its probe with :func:`register_probe` on a *run* function that takes
:class:`ProbeInputs` (tensors and closures, no agent) and returns flat ``"<tag>/<layer>"`` values; the
package imports every module at import, so adding a probe is one new module and nothing else. What the
registry feeds: the config's valid names (``monitor.probes``, ``monitor.switch_probes``), ``rlp list probes``,
the monitor's TensorBoard layout and its may-be-NaN set, and the report's main probes. Filling
:class:`ProbeInputs` from an SB3 agent is :mod:`rl_plasticity.probing`'s job, the one place that knows SB3.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import torch as th
from torch import nn


class ProbeResult(NamedTuple):
    """Scalars keyed ``"<tag>/<layer>"`` and tensors (for histograms) keyed the same way."""

    scalars: dict[str, float]
    histograms: dict[str, th.Tensor]


@dataclass(frozen=True)
class ProbeInputs:
    """What a probe may read of a network and one batch (filled by :func:`rl_plasticity.probing.probe_batch`).

    :param module: the probed network (DQN's online Q-network, PPO's actor-critic policy).
    :param observations: ``(n, *obs_shape)`` observations of the batch.
    :param features: ``(n, d)`` value-head features (the input of the value head).
    :param activations: module path -> post-activation values ``(n, ...)`` of every activation module.
    :param labels: ``(n,)`` classes for neural collapse; ``classifier``: ``(C, d)`` head weight or ``None``.
    :param batch: the batch as the agent's loss takes it.
    :param loss: the agent's own scalar training loss on a batch, through ``module``'s parameters.
    :param gram_inputs: for the first ``n`` samples: the inputs, the scalar output per sample
        ``output_fn(model, inputs) -> (n,)`` and the loss curvature ``D`` (``None``: MSE) of the Gram probe.
    :param value_model: the network whose outputs the trainability probe fits (a module of its own).
    """

    module: nn.Module
    observations: th.Tensor
    features: th.Tensor
    activations: Mapping[str, th.Tensor]
    labels: th.Tensor
    classifier: th.Tensor | None
    batch: Any
    loss: Callable[[Any], th.Tensor]
    gram_inputs: Callable[[int], tuple[Any, Callable[[nn.Module, Any], th.Tensor], th.Tensor | None]]
    value_model: Callable[[], nn.Module]


RunFn = Callable[..., ProbeResult]
Kind = Literal["light", "heavy"]


@dataclass(frozen=True)
class ProbeSpec:
    """A registered probe.

    :param name: its config name (``monitor.probes`` or ``monitor.switch_probes``).
    :param description: one line, shown by ``rlp list probes`` (the run function's docstring's first line).
    :param kind: ``light`` (every probe round) or ``heavy`` (at task switches only, on the fixed probe set).
    :param tags: the scalar tags it logs, ``plasticity/<tag>/<layer>@<source>``.
    :param group: its group in TensorBoard's Custom Scalars layout.
    :param charts: (title, tag regex) charts of the layout; default one chart per tag.
    :param may_be_nan: its tags that are NaN by definition in some cases (any other non-finite value stops a run).
    :param main: (tag, title) pairs the report shows in its tables and plots.
    :param order: where it runs and appears among the probes (lower first).
    :param run: ``run(inputs, **settings) -> ProbeResult``; ``None`` for a probe the monitor computes itself
        (``weights``: from the parameters and the training steps, not from a batch).
    :param settings: the keyword parameters of ``run`` (monitor config keys, e.g. ``dormant_tau``), whose
        defaults are the published ones.
    """

    name: str
    description: str
    kind: Kind
    tags: tuple[str, ...]
    group: str
    charts: tuple[tuple[str, str], ...]
    may_be_nan: tuple[str, ...] = ()
    main: tuple[tuple[str, str], ...] = ()
    order: int = 100
    run: RunFn | None = None
    settings: tuple[str, ...] = field(default=())


PROBES: dict[str, ProbeSpec] = {}


def register_probe(
    name: str,
    kind: Kind,
    tags: Sequence[str],
    group: str,
    charts: Sequence[tuple[str, str]] | None = None,
    may_be_nan: Sequence[str] = (),
    main: Sequence[tuple[str, str]] = (),
    order: int = 100,
    description: str | None = None,
) -> Callable[[RunFn], RunFn]:
    """Decorator: register ``run(inputs: ProbeInputs, **settings) -> ProbeResult`` as probe ``name``.

    Its docstring's first line describes the probe (or ``description``); see :class:`ProbeSpec` for the rest.
    """

    def decorate(run: RunFn) -> RunFn:
        add_probe(
            ProbeSpec(
                name,
                description or (run.__doc__ or "").strip().splitlines()[0],
                kind,
                tuple(tags),
                group,
                tuple(charts) if charts is not None else tuple((tag, f"{tag}/.*") for tag in tags),
                tuple(may_be_nan),
                tuple(main),
                order,
                run,
                tuple(list(inspect.signature(run).parameters)[1:]),
            )
        )
        return run

    return decorate


def add_probe(spec: ProbeSpec) -> None:
    """Register ``spec`` (keeping :data:`PROBES` in :attr:`ProbeSpec.order`)."""
    if spec.name in PROBES:
        raise ValueError(f"probe '{spec.name}' is registered twice")
    PROBES[spec.name] = spec
    ordered = sorted(PROBES.values(), key=lambda s: s.order)
    PROBES.clear()
    PROBES.update((s.name, s) for s in ordered)


def probe_kinds() -> dict[str, Kind]:
    """Probe name -> ``light`` or ``heavy``, in order (what the config validates ``monitor.*probes`` against)."""
    return {name: spec.kind for name, spec in PROBES.items()}


def may_be_nan_prefixes() -> tuple[str, ...]:
    """``"<tag>/"`` of every tag that may be NaN by definition."""
    return tuple(f"{tag}/" for spec in PROBES.values() for tag in spec.may_be_nan)


def probe_tag_prefixes() -> tuple[str, ...]:
    """``"<tag>/"`` of every tag any probe logs, in probe order (how a ``<tag>/<layer>`` column is told apart)."""
    return tuple(f"{tag}/" for spec in PROBES.values() for tag in spec.tags)


def main_probes() -> dict[str, str]:
    """The report's main probes: tag -> title, in probe order."""
    return {tag: title for spec in PROBES.values() for tag, title in spec.main}


def layout_groups(prefix: str = "") -> dict[str, dict[str, list[Any]]]:
    """TensorBoard Custom Scalars charts of every probe, by group (groups in the order of their first probe).

    :param prefix: put before every tag regex (the monitor's ``plasticity/``).
    """
    groups: dict[str, dict[str, list[Any]]] = {}
    for spec in PROBES.values():
        charts = groups.setdefault(spec.group, {})
        for title, regex in spec.charts:
            charts[title] = ["Multiline", [prefix + regex]]
    return groups


def run_probes(inputs: ProbeInputs, names: Sequence[str], settings: Mapping[str, Any] | None = None) -> ProbeResult:
    """Run the named probes that read a batch on ``inputs``, in registry order.

    :param names: probe names (those without a run function, i.e. ``weights``, are skipped).
    :param settings: the probes' parameters by name (monitor config keys); missing ones keep their defaults.
    """
    settings = settings or {}
    unknown = [name for name in names if name not in PROBES]
    if unknown:
        raise ValueError(f"unknown probes {unknown}; valid: {', '.join(PROBES)}")
    scalars: dict[str, float] = {}
    hists: dict[str, th.Tensor] = {}
    for name, spec in PROBES.items():
        if name in names and spec.run is not None:
            result = spec.run(inputs, **{key: settings[key] for key in spec.settings if key in settings})
            scalars.update(result.scalars)
            hists.update(result.histograms)
    return ProbeResult(scalars, hists)
