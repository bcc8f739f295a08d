"""The fast path of :class:`~agents.dqn.PlasticDQN` (``fast=True``): the same DQN update with less overhead.

The maths is stock SB3 DQN's (and Double DQN's): the same batches (the replay buffer is sampled with the same
NumPy random draws as SB3's ``ReplayBuffer.sample``), the same TD target and loss, the same hook calls in the
same order (:mod:`agents.hooks`), the same gradient clipping and the same Adam. Only the arithmetic order and
the overhead around it change, so results match the stock path to float rounding, not bit for bit.

What is different, and why it is faster (``benchmarks/throughput.py`` measures the whole; docs/benchmarks.md
has each lever's gain):

- **Adam** runs with ``fused=True`` (one kernel for all parameters; CPU Adam is otherwise one Python-driven
  loop of small ops per tensor). The flag lives in the optimizer's parameter groups, so it is saved and
  loaded with the optimizer state.
- **Gradient clipping** is ``torch.nn.utils.clip_grad_norm_``'s formula (``g *= min(1, max_norm / (norm +
  1e-6))``) on the optimizer's gradients, with the foreach kernels called directly (no regrouping by device
  and dtype each step). ``max_grad_norm = inf`` multiplies by exactly 1, as the stock clip does.
- **Sampling**: one gather per field from the replay buffer's arrays into new tensors, the observations
  converted to float once (the networks would convert them on each of their two or three forward passes);
  with one env, no env-index draw (NumPy's draw in ``[0, 1)`` returns zeros without using the RNG).
- **Preprocessing** (SB3's ``preprocess_obs``) is decided once: float observations, scaled by 1/255 only for
  image spaces with ``normalize_images``, as SB3 does.
- **No per-update** ``set_training_mode(True)`` traversal when the network has no module whose forward
  depends on the mode (dropout, batch norm): SB3 sets eval mode at each rollout and training mode at each
  update, and for such networks both are the same computation.
- **Acting**: ``predict`` draws epsilon and the random action exactly as SB3's ``DQN.predict`` does, then one
  forward pass of the online network on the observation as given (no SB3 ``policy.predict`` wrapping: no
  copy, no mode switch, no shape dispatch).
- **Explicit forward and backward** (:class:`ExplicitQNetwork`, :class:`ExplicitLoss`): for the MinAtar network
  (conv -> ReLU -> flatten -> linear -> ReLU -> linear) with no module or parameter hook, the update (and the
  acting forward pass) is written out as the ops autograd would run (the same ATen kernels: ``conv2d``,
  ``addmm``, ``threshold_backward``, ``convolution_backward``), without building a graph, the module calls and
  the autograd engine, and the gradients are written into one preallocated buffer (``.grad`` are views of it),
  so there is no ``zero_grad`` and the clip takes one norm (:func:`clip_flat`). The interventions' loss terms
  see the features and the loss as leaf tensors, and their gradient joins by the chain rule. A hook (a
  recorder's, K-FAC's), another network or a frozen parameter takes the modules and autograd.
- **Adam's step** calls ``torch._fused_adam_`` directly (:class:`AdamStep`), as ``Adam.step`` with ``fused=True``
  does after its Python bookkeeping, on the same state tensors, so a save and load see the usual optimizer state.
- **Collection** (:func:`collect_rollouts`): SB3's ``collect_rollouts`` with ``DummyVecEnv.step`` and
  ``_store_transition`` written out for one env, and no ``set_training_mode(False)`` traversal when the policy
  already is in eval mode and its forward does not depend on the mode. The same calls, draws and stored
  transitions as SB3's loop, bit for bit (unlike the update, nothing in it is arithmetic); for one
  ``DummyVecEnv`` without action noise or ``VecNormalize`` (:func:`lean_collection_applies`), else SB3's loop.
"""

from __future__ import annotations

from collections.abc import Callable
from copy import deepcopy
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.buffers import ReplayBuffer, ReplayBufferSamples
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.off_policy_algorithm import OffPolicyAlgorithm
from stable_baselines3.common.preprocessing import is_image_space
from stable_baselines3.common.type_aliases import RolloutReturn, TrainFreq
from stable_baselines3.common.utils import should_collect_more_steps
from stable_baselines3.common.vec_env import DummyVecEnv
from stable_baselines3.dqn.policies import QNetwork
from torch import nn
from torch.nn import functional as F
from torch.optim import optimizer as torch_optimizer

from agents.networks import MinAtarCNN, split_output_layer

if TYPE_CHECKING:
    from agents.dqn import PlasticDQN

#: Modules whose forward depends on ``train()`` / ``eval()``: with one in the network, the fast path keeps
#: SB3's mode switches.
MODE_DEPENDENT = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._NormBase)

#: The TD losses by ``td_loss`` name, ``(Q(s, a), target) -> mean loss``: SB3's Huber, or MSE (MinAtar, C-CHAIN).
TD_LOSSES = {"huber": F.smooth_l1_loss, "mse": F.mse_loss}


def set_adam_kernel(policy: Any, fast: bool) -> None:
    """Put the policy's Adam on the path's kernel: fused on the fast path (the same update, one kernel for
    all tensors), else the one its ``optimizer_kwargs`` chose (SB3's default: single-tensor on CPU).

    Called when the optimizer is built and after a load, whose optimizer state carries the saving path's flags.

    :raises TypeError: on the fast path, for an optimizer other than Adam or AdamW (SB3's default is Adam).
    """
    optimizer = policy.optimizer
    if fast and not isinstance(optimizer, (th.optim.Adam, th.optim.AdamW)):
        raise TypeError(f"the fast DQN path needs Adam or AdamW, got {type(optimizer).__name__}")
    if not isinstance(optimizer, (th.optim.Adam, th.optim.AdamW)):
        return
    chosen = policy.optimizer_kwargs or {}
    for group in optimizer.param_groups:
        if fast and (group.get("differentiable") or group.get("capturable")):
            raise ValueError("the fast DQN path cannot fuse a differentiable or capturable Adam")
        group["foreach"] = None if fast else chosen.get("foreach")
        group["fused"] = True if fast else chosen.get("fused")


def clip_grad_norm(grads: list[th.Tensor], max_norm: float) -> th.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` (2-norm) on a list of gradients: scales them in place by
    ``min(1, max_norm / (total_norm + 1e-6))`` and returns ``total_norm`` (0-dim), the norm before clipping.

    :param grads: the gradients (non-empty), all on one device and of one dtype.
    """
    total = th.linalg.vector_norm(th.stack(th._foreach_norm(grads, 2.0)), 2.0)
    th._foreach_mul_(grads, th.clamp(max_norm / (total + 1e-6), max=1.0))
    return total


class ReplaySampler:
    """Samples SB3's :class:`~stable_baselines3.common.buffers.ReplayBuffer` as its ``sample`` does, faster.

    The same NumPy random draws in the same order (``batch_inds`` then ``env_indices``), so with the same
    global RNG state the batch is the one SB3 would return; each field is then one ``index_select`` from a
    zero-copy tensor view of the buffer's array. Differences from SB3's batch: ``observations`` and
    ``next_observations`` are float32 (the values the networks compute with; SB3 keeps the stored dtype and
    the network converts it at each forward pass).

    Only the plain buffer (no subclass such as n-step replay, no ``optimize_memory_usage``) without
    ``VecNormalize`` is handled:
    :meth:`supports` says when; otherwise use the buffer's own ``sample``.
    """

    def __init__(self, buffer: ReplayBuffer) -> None:
        self.buffer = buffer
        self._arrays: tuple[np.ndarray, ...] = ()
        self._views: tuple[th.Tensor, ...] = ()
        self._bind()

    @staticmethod
    def supports(buffer: Any, vec_normalize_env: Any) -> bool:
        """Whether ``buffer`` is a plain SB3 ``ReplayBuffer`` on CPU (without ``optimize_memory_usage``), used
        without ``VecNormalize``."""
        return (
            type(buffer) is ReplayBuffer
            and not buffer.optimize_memory_usage
            and vec_normalize_env is None
            and buffer.device.type == "cpu"
        )

    def _bind(self) -> None:
        # Views over (buffer_size * n_envs, ...) so that one flat index picks (batch_ind, env_ind).
        b = self.buffer
        self._arrays = (b.observations, b.next_observations, b.actions, b.rewards, b.dones, b.timeouts)
        rows = b.buffer_size * b.n_envs
        self._views = tuple(th.from_numpy(a.reshape(rows, *a.shape[2:])) for a in self._arrays)

    def sample(self, batch_size: int) -> ReplayBufferSamples:
        """A batch of ``batch_size`` transitions, drawn as SB3's ``ReplayBuffer.sample`` draws it.

        :return: SB3's ``ReplayBufferSamples``: observations ``(B, *obs_shape)`` float32, actions ``(B, 1)``,
            next_observations like observations, dones ``(B, 1)`` (0 for time-outs), rewards ``(B, 1)``.
        """
        b = self.buffer
        if b.observations is not self._arrays[0] or b.next_observations is not self._arrays[1]:
            self._bind()  # the arrays were replaced (e.g. restored from a checkpoint)
        batch_inds = np.random.randint(0, b.buffer_size if b.full else b.pos, size=batch_size)
        if b.n_envs == 1:
            # SB3 draws env indices in [0, 1): NumPy returns zeros without drawing, so skipping it is the same.
            index = th.from_numpy(batch_inds)
        else:
            env_inds = np.random.randint(0, high=b.n_envs, size=(batch_size,))
            index = th.from_numpy(batch_inds * b.n_envs + env_inds)
        obs, next_obs, actions, rewards, dones, timeouts = self._views
        done = dones.index_select(0, index) * (1 - timeouts.index_select(0, index))
        return ReplayBufferSamples(
            observations=obs.index_select(0, index).float(),
            actions=actions.index_select(0, index).reshape(batch_size, -1),
            next_observations=next_obs.index_select(0, index).float(),
            dones=done.reshape(-1, 1),
            rewards=rewards.index_select(0, index).reshape(-1, 1),
        )


def _global_hooks() -> bool:
    """Whether a global module hook (``nn.modules.module.register_module_forward_hook`` and co.) is set."""
    m = nn.modules.module
    return bool(
        m._global_forward_hooks
        or m._global_forward_pre_hooks
        or m._global_backward_hooks
        or m._global_backward_pre_hooks
    )


class ExplicitQNetwork:
    """The MinAtar Q-network, ``Conv2d -> ReLU -> Flatten -> Linear -> ReLU -> Linear``, as explicit tensor ops.

    The forward pass makes the calls the modules make (``conv2d``, ``addmm``, ``relu``) and the backward pass
    the ones autograd makes for them (``addmm``'s two products, ``threshold_backward`` for each ReLU,
    ``convolution_backward`` for the weight and bias of the conv, whose input needs no gradient), so the
    gradients are those of ``loss.backward()`` to float rounding (bit for bit on this CPU build), without the
    module calls, the graph and the autograd engine. It reads the modules' parameters at each call, so an
    intervention that resets or perturbs them in place is seen.

    Built by :meth:`of` for a network of exactly that structure, and used only while it :meth:`matches` and is
    :meth:`unhooked`.
    """

    def __init__(self, net: QNetwork) -> None:
        self.net = net
        self.cnn: nn.Sequential = net.features_extractor.cnn  # type: ignore[assignment]
        self.head: nn.Sequential = net.q_net  # type: ignore[assignment]
        self.layers = (*self.cnn, *self.head)
        conv, _, _, hidden, _, out = self.layers
        self.conv: nn.Conv2d = conv  # type: ignore[assignment]
        self.hidden: nn.Linear = hidden  # type: ignore[assignment]
        self.out: nn.Linear = out  # type: ignore[assignment]
        self.params = [conv.weight, conv.bias, hidden.weight, hidden.bias, out.weight, out.bias]
        #: Every module whose hooks the forward pass would run (SB3's call of each, down the network).
        self.modules = (net, net.features_extractor, self.cnn, self.head, *self.layers)
        # One buffer for the gradients; each parameter's .grad is a view of it, so the clip takes one norm.
        self.flat_grad = th.zeros(sum(p.numel() for p in self.params), dtype=conv.weight.dtype)
        self.grads = [g.view_as(p) for g, p in zip(self.flat_grad.split([p.numel() for p in self.params]), self.params)]

    @staticmethod
    def of(net: nn.Module) -> ExplicitQNetwork | None:
        """The explicit form of ``net`` if it is SB3's ``QNetwork`` on :class:`~agents.networks.MinAtarCNN` with
        the MinAtar head (one hidden ReLU layer), on CPU, float32; else ``None``."""
        if not (
            type(net).forward is QNetwork.forward
            and type(getattr(net, "features_extractor", None)) is MinAtarCNN
            and type(getattr(net, "q_net", None)) is nn.Sequential
        ):
            return None
        layers = (*net.features_extractor.cnn, *net.q_net)  # type: ignore[union-attr]
        if [type(m) for m in layers] != [nn.Conv2d, nn.ReLU, nn.Flatten, nn.Linear, nn.ReLU, nn.Linear]:
            return None
        conv, _, flatten, hidden, _, out = layers
        if not (
            conv.bias is not None
            and conv.padding_mode == "zeros"
            and isinstance(conv.padding, tuple)
            and (flatten.start_dim, flatten.end_dim) == (1, -1)
            and hidden.bias is not None
            and out.bias is not None
            and conv.weight.device.type == "cpu"
            and conv.weight.dtype == th.float32
        ):
            return None
        return ExplicitQNetwork(net)  # type: ignore[arg-type]

    def matches(self, net: nn.Module) -> bool:
        """Whether ``net`` still is the network this was built for, with the same modules and parameters."""
        # Through the modules' own dicts: nn.Module.__getattr__ would cost more than the rest of this check.
        if net is not self.net or net._modules.get("q_net") is not self.head:
            return False
        if self.net._modules["features_extractor"]._modules.get("cnn") is not self.cnn:  # type: ignore[union-attr]
            return False
        if (*self.cnn._modules.values(), *self.head._modules.values()) != self.layers:
            return False
        return all(p is q for p, q in zip(self._current_params(), self.params))

    def _current_params(self) -> list[th.Tensor]:
        c, h, o = self.conv._parameters, self.hidden._parameters, self.out._parameters
        return [c["weight"], c["bias"], h["weight"], h["bias"], o["weight"], o["bias"]]  # type: ignore[list-item]

    def unhooked(self, trainable: bool) -> bool:
        """Whether no module of the network has a hook (a recorder's, a probe's) and, if ``trainable``, every
        parameter needs a gradient and has no hook of its own."""
        for m in self.modules:
            if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks:
                return False
        if trainable:
            for p in self.params:
                if not p.requires_grad or p._backward_hooks or p._post_accumulate_grad_hooks:
                    return False
        return True

    def _conv(self, x: th.Tensor) -> th.Tensor:
        c = self.conv
        return F.conv2d(x, c.weight, c.bias, c.stride, c.padding, c.dilation, c.groups)  # type: ignore[arg-type]

    def q_values(self, x: th.Tensor) -> th.Tensor:
        """Q-values ``(B, n_actions)`` of preprocessed observations ``x`` ``(B, C, H, W)``, without a graph."""
        h = self._conv(x).relu_().flatten(1)
        h = th.addmm(self.hidden.bias, h, self.hidden.weight.t()).relu_()
        return th.addmm(self.out.bias, h, self.out.weight.t())

    def forward(self, x: th.Tensor) -> tuple[th.Tensor, tuple[th.Tensor, ...]]:
        """Q-values of ``x`` as :meth:`q_values`, and what :meth:`backward` needs (the activations)."""
        h1 = self._conv(x).relu_()
        f = h1.flatten(1)
        h2 = th.addmm(self.hidden.bias, f, self.hidden.weight.t()).relu_()
        return th.addmm(self.out.bias, h2, self.out.weight.t()), (x, h1, f, h2)

    def backward(self, grad_q: th.Tensor, saved: tuple[th.Tensor, ...], grad_features: th.Tensor | None = None) -> None:
        """Write the parameters' gradients of a loss whose gradient in the Q-values is ``grad_q`` ``(B,
        n_actions)``, plus ``grad_features`` ``(B, hidden)`` in the head's input if given, into their ``.grad``
        (views of one buffer; any previous value is overwritten, as after ``zero_grad`` and ``backward``)."""
        x, h1, f, h2 = saved
        for p, g in zip(self.params, self.grads):
            if p.grad is not g:
                p.grad = g
        g_conv_w, g_conv_b, g_hidden_w, g_hidden_b, g_out_w, g_out_b = self.grads
        th.mm(grad_q.t(), h2, out=g_out_w)
        th.sum(grad_q, 0, out=g_out_b)
        grad_h2 = grad_q.mm(self.out.weight)
        if grad_features is not None:
            grad_h2 += grad_features
        grad_h2 = th.ops.aten.threshold_backward(grad_h2, h2, 0)
        th.mm(grad_h2.t(), f, out=g_hidden_w)
        th.sum(grad_h2, 0, out=g_hidden_b)
        grad_h1 = th.ops.aten.threshold_backward(grad_h2.mm(self.hidden.weight), f, 0).view_as(h1)
        c = self.conv
        _, grad_w, grad_b = th.ops.aten.convolution_backward(
            grad_h1,
            x,
            c.weight,
            [c.out_channels],
            c.stride,
            c.padding,
            c.dilation,
            False,
            [0, 0],
            c.groups,
            [False, True, True],
        )
        g_conv_w.copy_(grad_w)
        g_conv_b.copy_(grad_b)

    def grads_in_place(self) -> bool:
        """Whether every ``.grad`` still is this network's view (an intervention's gradient term may have
        replaced one), so that :attr:`flat_grad` holds all of them."""
        return all(p.grad is g for p, g in zip(self.params, self.grads))


def clip_flat(flat_grad: th.Tensor, max_norm: float) -> th.Tensor:
    """:func:`clip_grad_norm` on gradients that are all views of ``flat_grad``: one norm and, only when it
    exceeds ``max_norm``, one scaling by ``max_norm / (norm + 1e-6)`` (computed in double precision; the
    skipped scaling would multiply by exactly 1).

    :return: the norm before clipping (0-dim tensor).
    """
    total = th.linalg.vector_norm(flat_grad, 2.0)
    scale = max_norm / (total.item() + 1e-6)
    if not scale >= 1.0:  # a NaN norm scales by NaN, as clip_grad_norm_ does
        flat_grad.mul_(scale)
    return total


class AdamStep:
    """``optimizer.step()`` for a fused Adam (or AdamW) of one parameter group, as one ``torch._fused_adam_``
    call on the optimizer's own state tensors: what ``Adam.step`` ends in, without its Python bookkeeping
    (regrouping by device, state lookups, the profiler's record, the hook dispatch).

    Falls back to ``optimizer.step()`` whenever that bookkeeping would do more: before the state exists, with a
    parameter without gradient, with step hooks, or for a group option the direct call does not cover.
    """

    def __init__(self, optimizer: th.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self._state: tuple[list[th.Tensor], ...] | None = None

    def _direct(self) -> bool:
        opt = self.optimizer
        if not (type(opt) in (th.optim.Adam, th.optim.AdamW) and len(opt.param_groups) == 1):
            return False
        if opt._optimizer_step_pre_hooks or opt._optimizer_step_post_hooks:
            return False
        if torch_optimizer._global_optimizer_pre_hooks or torch_optimizer._global_optimizer_post_hooks:
            return False
        group = opt.param_groups[0]
        return bool(
            group["fused"]
            and not (group["amsgrad"] or group["maximize"] or group["capturable"] or group["differentiable"])
        )

    def _state_lists(self, params: list[th.Tensor]) -> tuple[list[th.Tensor], ...] | None:
        """(exp_avgs, exp_avg_sqs, steps) of ``params``, or ``None`` if some are not there yet."""
        states = [self.optimizer.state.get(p) for p in params]
        cached = self._state
        if cached is not None and len(cached[0]) == len(params):
            if all(
                s is not None and s["exp_avg"] is a and s["exp_avg_sq"] is b and s["step"] is t
                for s, a, b, t in zip(states, *cached)
            ):
                return cached
        if any(s is None or "exp_avg" not in s for s in states):
            return None
        self._state = (
            [s["exp_avg"] for s in states],  # type: ignore[index]
            [s["exp_avg_sq"] for s in states],  # type: ignore[index]
            [s["step"] for s in states],  # type: ignore[index]
        )
        return self._state

    def __call__(self) -> None:
        """One step of the optimizer."""
        opt = self.optimizer
        if self._direct():
            group = opt.param_groups[0]
            params = group["params"]
            grads = [p.grad for p in params]
            state = None if any(g is None for g in grads) else self._state_lists(params)
            if state is not None:
                exp_avgs, exp_avg_sqs, steps = state
                beta1, beta2 = group["betas"]
                decoupled = group.get("decoupled_weight_decay", type(opt) is th.optim.AdamW)
                th._foreach_add_(steps, 1)
                (th._fused_adamw_ if decoupled else th._fused_adam_)(
                    params, grads, exp_avgs, exp_avg_sqs, [], steps,
                    amsgrad=False, lr=group["lr"], beta1=beta1, beta2=beta2,
                    weight_decay=group["weight_decay"], eps=group["eps"], maximize=False,
                    grad_scale=None, found_inf=None,
                )  # fmt: skip
                return
        opt.step()


class FastState:
    """What the fast path builds once per agent (not saved: it is rebuilt from the agent after a load)."""

    def __init__(self, agent: PlasticDQN) -> None:
        self.sampler: ReplaySampler | None = None
        # The network's forward is the same in training and eval mode: SB3's mode switches can be skipped.
        self.mode_free = not any(isinstance(m, MODE_DEPENDENT) for m in agent.policy.modules())
        # SB3's preprocess_obs for a Box: float, and / 255 for an image space with normalize_images.
        q_net = agent.q_net
        self.scale_images = bool(q_net.normalize_images and is_image_space(q_net.observation_space))
        self.adam_step = AdamStep(agent.policy.optimizer)
        self._nets: tuple[ExplicitQNetwork, ExplicitQNetwork] | None = None
        # The (online, target) networks found not to be the MinAtar network, not to be examined again.
        self._not_explicit: tuple[nn.Module, nn.Module] | None = None

    def sample(self, agent: PlasticDQN, batch_size: int) -> ReplayBufferSamples:
        """A training batch: :class:`ReplaySampler` where it applies, else the buffer's own ``sample``."""
        buffer = agent.replay_buffer
        assert buffer is not None, "the replay buffer is built by SB3's _setup_model"
        if self.sampler is None or self.sampler.buffer is not buffer:
            self.sampler = ReplaySampler(buffer) if ReplaySampler.supports(buffer, agent._vec_normalize_env) else None
        if self.sampler is None:
            return buffer.sample(batch_size, env=agent._vec_normalize_env)
        return self.sampler.sample(batch_size)

    def preprocess(self, obs: th.Tensor) -> th.Tensor:
        """SB3's ``preprocess_obs`` of a batch of ``Box`` observations: float, scaled by 1/255 for images."""
        return obs.float() / 255.0 if self.scale_images else obs.float()

    def explicit(self, agent: PlasticDQN, training: bool) -> tuple[ExplicitQNetwork, ExplicitQNetwork] | None:
        """The (online, target) networks as :class:`ExplicitQNetwork`, or ``None`` where the fast path must take
        the modules and autograd: another network, a hook on a module, or (``training``) a parameter hook or a
        parameter that needs no gradient."""
        online, target = agent.q_net, agent.q_net_target
        nets = self._nets
        if nets is None or not (nets[0].matches(online) and nets[1].matches(target)):
            if self._not_explicit is not None and self._not_explicit[0] is online and self._not_explicit[1] is target:
                return None
            pair = ExplicitQNetwork.of(online), ExplicitQNetwork.of(target)
            if pair[0] is None or pair[1] is None:
                self._nets, self._not_explicit = None, (online, target)
                return None
            self._nets = nets = pair  # type: ignore[assignment]
        assert nets is not None
        if _global_hooks() or not (nets[0].unhooked(training) and nets[1].unhooked(False)):
            return None
        return nets


def value_features(agent: PlasticDQN, obs: th.Tensor) -> th.Tensor:
    """``agent.value_features(obs)`` (the input of the Q head, with its graph), with the preprocessing decided
    once (:class:`FastState`) instead of at each call."""
    q_net = agent.q_net
    x = q_net.features_extractor(fast_state(agent).preprocess(obs))
    hidden, _ = split_output_layer(q_net.q_net)  # the injected head of plasticity injection too
    return hidden(x)


def td_loss(agent: PlasticDQN, batch: ReplayBufferSamples) -> tuple[th.Tensor, th.Tensor]:
    """The TD loss (``agent.td_loss``: Huber or MSE) on ``batch`` and the Q head's input features, with graph.

    The same maths as :meth:`PlasticDQN.training_loss`: target ``r + (1 - done) * gamma * Q_target(s', a')``
    with ``a' = argmax Q_target(s')`` or, for Double DQN, ``argmax Q_online(s')``.
    """
    discounts = batch.discounts if batch.discounts is not None else agent.gamma
    with th.no_grad():
        next_q = agent.q_net_target(batch.next_observations)
        if agent.double_q:
            next_q = next_q.gather(1, agent.q_net(batch.next_observations).argmax(dim=1, keepdim=True))
        else:
            next_q = next_q.amax(dim=1, keepdim=True)
        target = batch.rewards + (1 - batch.dones) * discounts * next_q
    features = value_features(agent, batch.observations)
    current = agent.value_head(features).gather(1, batch.actions.long())
    return TD_LOSSES[agent.td_loss](current, target), features


class ExplicitLoss:
    """:func:`td_loss` on the explicit (online, target) networks (:class:`ExplicitQNetwork`), without a graph.

    ``loss`` is the TD loss and ``features`` the head's input ``(B, hidden)``. For the interventions' loss
    terms, :meth:`leaves` gives both as leaf tensors that need a gradient: a term built on them (and on the
    parameters, directly or through forward passes of its own) has a graph back to them, and :meth:`backward`
    applies the chain rule through the explicit network, so the gradient is that of ``loss + terms``.
    """

    def __init__(
        self, agent: PlasticDQN, batch: ReplayBufferSamples, nets: tuple[ExplicitQNetwork, ExplicitQNetwork]
    ) -> None:
        self.online, target_net = nets
        state = fast_state(agent)
        discounts = batch.discounts if batch.discounts is not None else agent.gamma
        with th.no_grad():
            next_obs = state.preprocess(batch.next_observations)
            next_q = target_net.q_values(next_obs)
            if agent.double_q:
                next_q = next_q.gather(1, self.online.q_values(next_obs).argmax(dim=1, keepdim=True))
            else:
                next_q = next_q.amax(dim=1, keepdim=True)
            self.target = batch.rewards + (1 - batch.dones) * discounts * next_q
            self.q, self.saved = self.online.forward(state.preprocess(batch.observations))
            self.actions = batch.actions.long()
            self.current = self.q.gather(1, self.actions)
            self.loss = TD_LOSSES[agent.td_loss](self.current, self.target)
        self.features = self.saved[-1]
        self.huber = agent.td_loss == "huber"
        self._leaves: tuple[th.Tensor, th.Tensor] | None = None

    def leaves(self) -> tuple[th.Tensor, th.Tensor]:
        """(features, loss) as leaves that need a gradient, for the interventions' loss terms."""
        self._leaves = (self.features.detach().requires_grad_(), self.loss.detach().requires_grad_())
        return self._leaves

    def backward(self, extra: th.Tensor | None = None) -> None:
        """Write the gradient of ``loss`` (plus ``extra``, the loss terms built on :meth:`leaves`) into the online
        parameters' ``.grad``.

        The gradient of the mean loss in ``Q(s, a)`` is what PyTorch's ``smooth_l1_loss`` (beta 1) and
        ``mse_loss`` backward compute: ``clamp(Q - y, -1, 1) / B`` and ``2 (Q - y) / B``, scattered to the taken
        actions. A term's gradient reaches the parameters through the features, through the loss (scaling that
        gradient by ``1 + d extra / d loss``) and directly.
        """
        online = self.online
        grad_features, grad_loss, direct = None, None, ()
        if extra is not None and extra.requires_grad:
            assert self._leaves is not None, "loss terms are built on leaves()"
            grads = th.autograd.grad(extra, [*self._leaves, *online.params], allow_unused=True)
            grad_features, grad_loss, direct = grads[0], grads[1], grads[2:]
        with th.no_grad():
            diff = self.current - self.target
            grad = diff.clamp_(-1.0, 1.0).mul_(1.0 / diff.numel()) if self.huber else diff.mul_(2.0 / diff.numel())
            if grad_loss is not None:
                grad.mul_(1.0 + grad_loss)
            online.backward(th.zeros_like(self.q).scatter_(1, self.actions, grad), self.saved, grad_features)
            for p, g in zip(online.params, direct):
                if g is not None:
                    p.grad.add_(g)  # type: ignore[union-attr]  # backward() set every .grad


def fast_state(agent: PlasticDQN) -> FastState:
    """The agent's :class:`FastState`, built on first use."""
    if agent._fast_state is None:
        agent._fast_state = FastState(agent)
    return agent._fast_state


def clip_buffer(
    online: ExplicitQNetwork, groups: list[dict[str, Any]], max_norm: float, fallback: Callable[[], th.Tensor]
) -> th.Tensor:
    """:func:`clip_flat` on the explicit network's gradient buffer while it holds every gradient the optimizer
    steps (the optimizer's one group is the network's parameters, whose ``.grad`` are still the buffer's views),
    else ``fallback()``."""
    params = groups[0]["params"]
    if (
        len(groups) == 1
        and len(params) == len(online.params)
        and all(p is q for p, q in zip(params, online.params))
        and online.grads_in_place()
    ):
        return clip_flat(online.flat_grad, max_norm)
    return fallback()


def train(agent: PlasticDQN, gradient_steps: int, batch_size: int) -> None:
    """``PlasticDQN.train`` on the fast path: the same hooks, in the same order, around a leaner update.

    Each update takes the explicit networks (:meth:`FastState.explicit`) where they apply, else the modules
    and autograd (:func:`td_loss`); both end in the shared :meth:`~agents.plastic.PlasticMixin._optimizer_step`.
    """
    state = fast_state(agent)
    policy = agent.policy
    if not (state.mode_free or policy.training):
        policy.set_training_mode(True)
    optimizer = policy.optimizer
    agent._update_learning_rate(optimizer)
    groups = optimizer.param_groups

    def clip() -> th.Tensor:
        grads = [p.grad for group in groups for p in group["params"] if p.grad is not None]
        return clip_grad_norm(grads, agent.max_grad_norm)

    losses = []
    for _ in range(gradient_steps):
        batch = state.sample(agent, batch_size)
        nets = state.explicit(agent, training=True)
        if nets is None:
            loss, features = td_loss(agent, batch)
        else:
            explicit = ExplicitLoss(agent, batch, nets)
            loss = explicit.loss
        losses.append(loss.item())
        agent._check_finite("train/loss", losses[-1])
        if nets is None:
            extra = agent._intervention_loss(batch, features, loss)
            if extra is not None:
                loss = loss + extra
            agent._optimizer_step(loss, clip, step=state.adam_step)
            continue
        # The terms see the features and the loss as leaves; explicit.backward takes their gradient on.
        extra = agent._intervention_loss(batch, *explicit.leaves()) if agent.interventions else None
        clip_explicit = partial(clip_buffer, nets[0], groups, agent.max_grad_norm, clip)
        agent._optimizer_step(loss, clip_explicit, backward=partial(explicit.backward, extra), step=state.adam_step)
    agent._check_grad_norms()

    agent._n_updates += gradient_steps
    agent.logger.record("train/n_updates", agent._n_updates, exclude="tensorboard")
    agent.logger.record("train/loss", float(np.mean(losses)))
    agent._record_terms()


def predict(agent: PlasticDQN, observation: Any, deterministic: bool) -> tuple[np.ndarray, None] | None:
    """SB3's ``DQN.predict`` for a batch of observations ``(n_envs, *obs_shape)`` of a ``Box`` space with
    ``Discrete`` actions: epsilon-greedy with the same random draws, the greedy action by one forward pass.

    :return: ``(actions of shape (n_envs,), None)``, or ``None`` for any other input or a network whose
        forward depends on the training mode (the caller then uses SB3's own ``predict``).
    """
    space = agent.observation_space
    if not (
        fast_state(agent).mode_free
        and isinstance(observation, np.ndarray)
        and isinstance(agent.action_space, spaces.Discrete)
        and isinstance(space, spaces.Box)
        and observation.shape[1:] == space.shape
        and observation.ndim == len(space.shape) + 1
    ):
        return None
    if not deterministic and np.random.rand() < agent.exploration_rate:
        return np.array([agent.action_space.sample() for _ in range(observation.shape[0])]), None
    state = fast_state(agent)
    nets = state.explicit(agent, training=False)
    with th.no_grad():
        obs = th.as_tensor(observation, device=agent.device)
        q_values = agent.q_net(obs) if nets is None else nets[0].q_values(state.preprocess(obs))
    return q_values.argmax(dim=1).cpu().numpy(), None


def lean_collection_applies(agent: PlasticDQN, env: Any, action_noise: Any) -> bool:
    """Whether :func:`collect_rollouts` may stand in for SB3's ``collect_rollouts``: the env is SB3's own
    ``DummyVecEnv`` (not a subclass, no ``VecEnv`` wrapper such as ``VecNormalize``) with one copy of a
    non-dict, non-tuple observation space, no action noise, no gSDE, and the agent does not override SB3's
    ``_store_transition``."""
    return (
        type(env) is DummyVecEnv
        and env.num_envs == 1
        and env.keys == [None]
        and action_noise is None
        and not agent.use_sde
        and agent._vec_normalize_env is None
        and type(agent)._store_transition is OffPolicyAlgorithm._store_transition
    )


def collect_rollouts(
    agent: PlasticDQN,
    env: DummyVecEnv,
    callback: BaseCallback,
    train_freq: TrainFreq,
    replay_buffer: ReplayBuffer,
    learning_starts: int,
    log_interval: int | None,
) -> RolloutReturn:
    """SB3's ``OffPolicyAlgorithm.collect_rollouts`` (2.x) where :func:`lean_collection_applies`, with less
    machinery around each env step and the same effects in the same order.

    The same calls to the agent (``_sample_action``, ``_update_info_buffer``, ``_update_current_progress_remaining``,
    ``_on_step``, ``dump_logs``), to the callback (``on_rollout_start``, ``update_locals`` with the names SB3's
    loop has then, ``on_step`` whose ``False`` stops, ``on_rollout_end``) and to the replay buffer (``add`` of the
    previous observation, the next one, or ``infos[0]["terminal_observation"]`` at an episode's end, terminated
    or truncated), the same random draws (those of ``_sample_action`` and of the env) and the same episode
    bookkeeping. What it leaves out, each the same computation:

    - ``policy.set_training_mode(False)`` (a traversal of every module) when the policy already is in eval mode
      and its network has no module whose forward depends on the mode (:attr:`FastState.mode_free`; the fast
      path's update leaves such a policy in eval mode). A module put into such a network in training mode keeps
      that flag until the next full switch: its forward is the same in both modes.
    - ``DummyVecEnv.step``'s dispatch and ``deepcopy`` of its one-key observation dict: its ``step_wait`` for one
      env is written out (the same env calls, buffers and ``TimeLimit.truncated`` / ``terminal_observation``
      entries; the infos are still deep-copied).
    - ``_store_transition``'s ``deepcopy`` of the next observation (an array: a copy) and its dispatch.

    :return: SB3's ``RolloutReturn`` (env steps collected, episodes ended, whether to go on).
    """
    policy = agent.policy
    if policy.training or not fast_state(agent).mode_free:
        policy.set_training_mode(False)
    num_collected_steps, num_collected_episodes = 0, 0
    assert train_freq.frequency > 0, "Should at least collect one step or episode."
    inner, buf_obs = env.envs[0], env.buf_obs[None]
    callback.on_rollout_start()
    continue_training = True
    idx_done: dict[str, Any] = {}  # SB3's loop variables idx and done, once its episode loop has run
    while should_collect_more_steps(train_freq, num_collected_steps, num_collected_episodes):
        actions, buffer_actions = agent._sample_action(learning_starts, None, 1)

        # DummyVecEnv.step for its one env (step_async, then step_wait).
        env.actions = actions
        obs, env.buf_rews[0], terminated, truncated, env.buf_infos[0] = inner.step(actions[0])
        env.buf_dones[0] = terminated or truncated
        env.buf_infos[0]["TimeLimit.truncated"] = truncated and not terminated
        if env.buf_dones[0]:
            env.buf_infos[0]["terminal_observation"] = obs
            obs, env.reset_infos[0] = inner.reset()
        buf_obs[0] = obs
        new_obs, rewards, dones = buf_obs.copy(), env.buf_rews.copy(), env.buf_dones.copy()
        infos = deepcopy(env.buf_infos)

        agent.num_timesteps += 1
        num_collected_steps += 1
        # SB3's locals() at this point.
        callback.update_locals(
            {
                "self": agent,
                "env": env,
                "callback": callback,
                "train_freq": train_freq,
                "replay_buffer": replay_buffer,
                "action_noise": None,
                "learning_starts": learning_starts,
                "log_interval": log_interval,
                "num_collected_steps": num_collected_steps,
                "num_collected_episodes": num_collected_episodes,
                "continue_training": continue_training,
                **idx_done,
                "actions": actions,
                "buffer_actions": buffer_actions,
                "new_obs": new_obs,
                "rewards": rewards,
                "dones": dones,
                "infos": infos,
            }
        )
        if not callback.on_step():
            return RolloutReturn(num_collected_steps, num_collected_episodes, continue_training=False)
        agent._update_info_buffer(infos, dones)

        # _store_transition without VecNormalize.
        agent._last_original_obs = agent._last_obs
        next_obs = new_obs.copy()
        if dones[0] and infos[0].get("terminal_observation") is not None:
            next_obs[0] = infos[0]["terminal_observation"]
        replay_buffer.add(agent._last_original_obs, next_obs, buffer_actions, rewards, dones, infos)  # type: ignore[arg-type]
        agent._last_obs = new_obs  # type: ignore[assignment]

        agent._update_current_progress_remaining(agent.num_timesteps, agent._total_timesteps)
        agent._on_step()
        idx_done = {"idx": 0, "done": dones[0]}
        if dones[0]:
            num_collected_episodes += 1
            agent._episode_num += 1
            if log_interval is not None and agent._episode_num % log_interval == 0:
                agent.dump_logs()
    callback.on_rollout_end()
    return RolloutReturn(num_collected_steps, num_collected_episodes, continue_training)
