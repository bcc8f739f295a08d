"""Trainability probe: how well a copy of the network can still fit fixed random regression targets.

Source: Lyle, Rowland & Dabney 2022, "Understanding and Preventing Capacity Loss in Reinforcement Learning";
definition as in ``docs/reference/metrics.md#trainability``.
"""

from __future__ import annotations

import copy
import math

import torch as th
import torch.nn.functional as F
from torch import nn

from rl_plasticity.probes._checks import check_finite
from rl_plasticity.probes.registry import ProbeInputs, ProbeResult, register_probe


def _probe_seed(seed: int) -> int:
    """Mix ``seed`` into an unrelated 63-bit seed.

    Without this, a network initialised right after ``torch.manual_seed(seed)`` (a common run seed such as 0)
    would be re-initialised to *itself* by the target copy, and the "random" targets would be its own outputs.
    """
    return (int(seed) * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) % (2**63)


def _detached_copy(model: nn.Module) -> nn.Module:
    """A deep copy with no ``.grad`` and no module hooks.

    Hooks are dropped because ``deepcopy`` shares hook closures: a recorder hook on the live network would
    otherwise be fed by the copy's forward passes.
    """
    clone = copy.deepcopy(model)
    for module in clone.modules():
        for hooks in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
            getattr(module, hooks, {}).clear()
    for p in clone.parameters():
        p.grad = None
        p.requires_grad_(True)  # "freeze nothing"
    return clone


def _output(model: nn.Module, inputs: th.Tensor) -> th.Tensor:
    out = model(inputs)
    if not isinstance(out, th.Tensor):
        raise ValueError(f"model(inputs) must return a tensor, got {type(out).__name__}")
    return out


def trainability(
    model: nn.Module,
    inputs: th.Tensor,
    steps: int = 200,
    lr: float = 1e-3,
    target_scale: float = 1.0,
    seed: int = 0,
) -> float:
    """Final MSE of a copy of ``model`` fitted to fixed random targets (Lyle et al. 2022; docs/reference/metrics.md).

    1. Deep-copy the network (nothing frozen).
    2. Targets: ``target_scale * f_fresh(inputs)``, where ``f_fresh`` is another copy with every module
       that has ``reset_parameters()`` re-initialised (PyTorch default init) from a seed derived from
       ``seed`` (mixed, so it never reproduces a network built right after ``torch.manual_seed(seed)``).
       The targets are therefore fixed per seed (and do not depend on the live weights).
    3. Fit the copy with a fresh Adam(lr) for ``steps`` full-batch steps on
       ``MSE = mean over all output entries of (f_copy(inputs) - targets)^2``.
    4. Return the MSE of the fitted copy, evaluated after the last step (higher = less trainable).

    All randomness (re-initialisation, any dropout in the copies) runs inside ``torch.random.fork_rng``
    seeded with ``seed``, so the global RNG state is unchanged afterwards and the same seed gives the same
    value. The live network's parameters, ``.grad``, optimizer and training mode are never touched.

    :param model: the network, called as ``model(inputs)``; its output may have any shape.
    :param inputs: ``(n, ...)`` probe batch, with ``n >= 1``.
    :param steps: Adam steps K (default 200, docs/reference/metrics.md).
    :param lr: Adam learning rate (default 1e-3, docs/reference/metrics.md).
    :param target_scale: scale of the random targets (default 1.0).
    :param seed: seed of the targets (and of anything random during fitting).
    :return: final MSE, a Python float.
    :raises ValueError: NaN/inf inputs, an empty batch, ``steps < 0``, ``lr <= 0`` or a non-finite scale.
    """
    if not isinstance(inputs, th.Tensor):
        raise ValueError(f"inputs must be a torch.Tensor, got {type(inputs).__name__}")
    if inputs.dim() < 1 or inputs.shape[0] < 1:
        raise ValueError(f"trainability needs at least 1 sample, got inputs of shape {tuple(inputs.shape)}")
    check_finite("inputs", inputs)
    if int(steps) != steps or steps < 0:
        raise ValueError(f"steps must be a non-negative integer, got {steps}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if not math.isfinite(target_scale):
        raise ValueError(f"target_scale must be finite, got {target_scale}")

    param = next(model.parameters(), None)
    device = param.device if param is not None else inputs.device
    inputs = inputs.detach().to(device)
    fork_devices = [device] if device.type == "cuda" else []

    with th.random.fork_rng(devices=fork_devices, device_type=device.type if fork_devices else "cuda"):
        local_seed = _probe_seed(seed)
        th.default_generator.manual_seed(local_seed)
        if fork_devices:
            with th.cuda.device(device):
                th.cuda.manual_seed(local_seed)

        learner = _detached_copy(model)
        fresh = _detached_copy(model)
        for module in fresh.modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()
        with th.no_grad():
            targets = _output(fresh, inputs).detach() * target_scale
        del fresh
        check_finite("targets", targets)

        # The copy gets its own optimizer; the live one (and its state) is never seen here.
        optimizer = th.optim.Adam(learner.parameters(), lr=lr)
        with th.enable_grad():
            for _ in range(int(steps)):
                optimizer.zero_grad(set_to_none=True)
                loss = F.mse_loss(_output(learner, inputs), targets)
                loss.backward()
                optimizer.step()
        with th.no_grad():
            final = F.mse_loss(_output(learner, inputs), targets)
    return float(final)


@register_probe("trainability", "heavy", ("trainability",), "curvature", order=70)
def _run(inputs: ProbeInputs, trainability_steps: int = 200, trainability_lr: float = 1e-3) -> ProbeResult:
    """Final MSE of a copy of the value network fitted to random targets for trainability_steps Adam steps."""
    return ProbeResult(
        {
            "trainability/value": trainability(
                inputs.value_model(), inputs.observations, steps=trainability_steps, lr=trainability_lr
            )
        },
        {},
    )
