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
  converted to float once (the networks would convert them on each of their two or three forward passes).
- **Preprocessing** (SB3's ``preprocess_obs``) is decided once: float observations, scaled by 1/255 only for
  image spaces with ``normalize_images``, as SB3 does.
- **No per-update** ``set_training_mode(True)`` traversal when the network has no module whose forward
  depends on the mode (dropout, batch norm): SB3 sets eval mode at each rollout and training mode at each
  update, and for such networks both are the same computation.
- **Acting**: ``predict`` draws epsilon and the random action exactly as SB3's ``DQN.predict`` does, then one
  forward pass of the online network on the observation as given (no SB3 ``policy.predict`` wrapping: no
  copy, no mode switch, no shape dispatch).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.buffers import ReplayBuffer, ReplayBufferSamples
from stable_baselines3.common.preprocessing import is_image_space
from torch import nn
from torch.nn import functional as F

from agents.networks import split_output_layer

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


class FastState:
    """What the fast path builds once per agent (not saved: it is rebuilt from the agent after a load)."""

    def __init__(self, agent: PlasticDQN) -> None:
        self.sampler: ReplaySampler | None = None
        # The network's forward is the same in training and eval mode: SB3's mode switches can be skipped.
        self.mode_free = not any(isinstance(m, MODE_DEPENDENT) for m in agent.policy.modules())
        # SB3's preprocess_obs for a Box: float, and / 255 for an image space with normalize_images.
        q_net = agent.q_net
        self.scale_images = bool(q_net.normalize_images and is_image_space(q_net.observation_space))

    def sample(self, agent: PlasticDQN, batch_size: int) -> ReplayBufferSamples:
        """A training batch: :class:`ReplaySampler` where it applies, else the buffer's own ``sample``."""
        buffer = agent.replay_buffer
        assert buffer is not None, "the replay buffer is built by SB3's _setup_model"
        if self.sampler is None or self.sampler.buffer is not buffer:
            self.sampler = ReplaySampler(buffer) if ReplaySampler.supports(buffer, agent._vec_normalize_env) else None
        if self.sampler is None:
            return buffer.sample(batch_size, env=agent._vec_normalize_env)
        return self.sampler.sample(batch_size)


def value_features(agent: PlasticDQN, obs: th.Tensor) -> th.Tensor:
    """``agent.value_features(obs)`` (the input of the Q head, with its graph), with the preprocessing decided
    once (:class:`FastState`) instead of at each call."""
    q_net = agent.q_net
    x = q_net.features_extractor(obs.float() / 255.0 if fast_state(agent).scale_images else obs.float())
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


def fast_state(agent: PlasticDQN) -> FastState:
    """The agent's :class:`FastState`, built on first use."""
    if agent._fast_state is None:
        agent._fast_state = FastState(agent)
    return agent._fast_state


def train(agent: PlasticDQN, gradient_steps: int, batch_size: int) -> None:
    """``PlasticDQN.train`` on the fast path: the same hooks, in the same order, around a leaner update."""
    state = fast_state(agent)
    policy = agent.policy
    if not (state.mode_free or policy.training):
        policy.set_training_mode(True)
    optimizer = policy.optimizer
    agent._update_learning_rate(optimizer)

    def clip() -> th.Tensor:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        return clip_grad_norm(grads, agent.max_grad_norm)

    losses = []
    for _ in range(gradient_steps):
        batch = state.sample(agent, batch_size)
        loss, features = td_loss(agent, batch)
        losses.append(loss.item())
        agent._check_finite("train/loss", losses[-1])
        extra = agent._intervention_loss(batch, features, loss)
        if extra is not None:
            loss = loss + extra

        agent._optimizer_step(loss, clip)
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
    with th.no_grad():
        q_values = agent.q_net(th.as_tensor(observation, device=agent.device))
    return q_values.argmax(dim=1).cpu().numpy(), None
