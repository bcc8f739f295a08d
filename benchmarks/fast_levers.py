"""Each lever of the fast DQN path on its own: the stock piece against the fast piece, on one agent's state.

What it measures: the CPU time of one call of each piece of a DQN step (MinAtar network, batch 32, one
torch thread), the stock way and the fast way (:mod:`agents.fast_dqn`), on a PlasticDQN that has trained a
little on continual MinAtar. The two versions of a piece run alternately, ``--reps`` calls at a time, for
``--rounds`` rounds, and each gets the median over rounds of its per-call time: on this shared machine the
speed drifts, and alternating exposes both to the same drift. The pieces:

- ``adam``: ``optimizer.step()`` single-tensor (SB3's default on CPU) vs ``fused=True``;
- ``clip``: ``torch.nn.utils.clip_grad_norm_`` on ``policy.parameters()`` vs :func:`~agents.fast_dqn.clip_grad_norm`;
- ``sample``: SB3's ``ReplayBuffer.sample`` vs :class:`~agents.fast_dqn.ReplaySampler`;
- ``train_mode``: ``policy.set_training_mode(True)`` vs skipping it (0);
- ``act``: SB3's ``DQN.predict`` vs :func:`~agents.fast_dqn.predict` (greedy, epsilon 0);
- ``conv``: forward and backward of the MinAtar conv, PyTorch's (oneDNN) vs the weight gradient computed as a
  convolution of the input with the output gradient, batch as channels (:class:`ConvWeightGradAsConv`; a lever
  tried and left out of the fast path: it measured no faster);
- ``online+target fwd (ddqn)``: Double DQN's online forward on s and on s' separately vs one forward of the
  online network on ``[s; s']`` (with the graph, then split), both followed by the backward of the loss;
- ``compile``: the online forward and backward eager vs ``torch.compile`` (default mode);
- ``explicit fwd+bwd``: one update's forward passes (target on s', online on s), loss and backward through the
  modules and autograd (:func:`~agents.fast_dqn.td_loss`, ``zero_grad``, ``backward``) vs the explicit
  networks (:class:`~agents.fast_dqn.ExplicitLoss`);
- ``adam direct``: ``optimizer.step()`` of the fused Adam vs :class:`~agents.fast_dqn.AdamStep`;
- ``clip flat``: :func:`~agents.fast_dqn.clip_grad_norm` (foreach) vs :func:`~agents.fast_dqn.clip_flat` on the
  explicit networks' gradient buffer;
- ``conv im2col``: the online conv's forward and weight gradient by oneDNN (``conv2d``,
  ``convolution_backward``) vs an index gather of the 3x3 patches and two GEMMs (:func:`conv_by_gemm`; tried
  and left out: see docs/benchmarks.md).

How to read it: the saving of each lever in ms per env step (one update per step) and the ratio. The pieces
overlap with nothing, but the whole step has more (env, SB3's loop): ``benchmarks/throughput.py`` times it.

    .venv/bin/python benchmarks/fast_levers.py
    .venv/bin/python benchmarks/fast_levers.py --skip-compile   # without the torch.compile row (slow to build)
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch as th
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import DummyVecEnv
from torch.nn import functional as F

from agents import PlasticDQN, fast_dqn, minatar_policy_kwargs
from envs import make_sequence


def alternate(stock: Callable[[], object], fast: Callable[[], object], reps: int, rounds: int) -> tuple[float, float]:
    """Median over rounds of the CPU ms per call of ``stock`` and of ``fast``, run alternately."""
    for f in (stock, fast):
        for _ in range(10):
            f()
    times: tuple[list[float], list[float]] = ([], [])
    for r in range(rounds):
        for i in (0, 1) if r % 2 == 0 else (1, 0):
            f = (stock, fast)[i]
            start = time.process_time()
            for _ in range(reps):
                f()
            times[i].append((time.process_time() - start) / reps * 1e3)
    return statistics.median(times[0]), statistics.median(times[1])


class ConvWeightGradAsConv(th.autograd.Function):
    """``F.conv2d(x, weight, bias)`` (stride 1, no padding, input without gradient) whose weight gradient is
    ``conv2d(x^T, grad_out^T)^T``, the batch as channels."""

    @staticmethod
    def forward(ctx: Any, x: th.Tensor, weight: th.Tensor, bias: th.Tensor) -> th.Tensor:
        ctx.save_for_backward(x)
        return F.conv2d(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad_out: th.Tensor) -> tuple[None, th.Tensor, th.Tensor]:
        (x,) = ctx.saved_tensors
        grad_w = F.conv2d(x.transpose(0, 1), grad_out.transpose(0, 1)).transpose(0, 1).contiguous()
        return None, grad_w, grad_out.sum(dim=(0, 2, 3))


def conv_by_gemm(x: th.Tensor, weight: th.Tensor, bias: th.Tensor, grad_out: th.Tensor) -> tuple[th.Tensor, ...]:
    """The forward of a 3x3, stride-1, unpadded conv on ``x`` ``(B, C, H, W)`` and its weight and bias gradients
    for the output gradient ``grad_out`` ``(B, O, H-2, W-2)``, by im2col (one index gather) and two GEMMs.

    :return: the output, channels last ``(B * (H-2) * (W-2), O)``, the weight gradient and the bias gradient.
    """
    b, c, h, w = x.shape
    out_h, out_w, o = h - 2, w - 2, weight.shape[0]
    cols = x.reshape(b, -1).index_select(1, patch_index(c, h, w)).view(b * out_h * out_w, c * 9)
    out = th.addmm(bias, cols, weight.view(o, -1).t())
    grad = grad_out.reshape(b, o, -1).transpose(1, 2).reshape(-1, o)
    return out, grad.t().mm(cols).view_as(weight), grad.sum(0)


def patch_index(c: int, h: int, w: int) -> th.Tensor:
    """Flat indices into a ``(C, H, W)`` input of every 3x3 patch, ``(out position, (channel, dy, dx))`` order."""
    ch, dy, dx = th.meshgrid(th.arange(c), th.arange(3), th.arange(3), indexing="ij")
    i, j = th.meshgrid(th.arange(h - 2), th.arange(w - 2), indexing="ij")
    rows = (i.reshape(-1, 1) + dy.reshape(1, -1)) * w + j.reshape(-1, 1) + dx.reshape(1, -1)
    return (ch.reshape(1, -1) * h * w + rows).reshape(-1)


def build_agent(steps: int) -> PlasticDQN:
    """PlasticDQN (fast path, its optimizer switched per piece) after ``steps`` steps of continual MinAtar."""
    env = make_vec_env(
        make_sequence,
        n_envs=1,
        vec_env_cls=DummyVecEnv,
        env_kwargs=dict(name="continual_minatar", switch_every=100_000, seed=0),
    )
    agent = PlasticDQN(
        "MlpPolicy",
        env,
        learning_rate=3e-4,
        buffer_size=10_000,
        learning_starts=steps // 2,
        batch_size=32,
        policy_kwargs=minatar_policy_kwargs("dqn"),
        device="cpu",
        seed=0,
        fast=True,
    )
    agent.learn(steps)
    return agent


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=50, help="calls per turn (default 50)")
    parser.add_argument("--rounds", type=int, default=10, help="turns per version (default 10)")
    parser.add_argument("--skip-compile", action="store_true", help="leave out the torch.compile row")
    args = parser.parse_args()
    th.set_num_threads(1)
    agent = build_agent(2_000)
    policy, optimizer = agent.policy, agent.policy.optimizer
    state = fast_dqn.fast_state(agent)
    batch = state.sample(agent, 32)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    fast_dqn.td_loss(agent, batch)[0].backward()
    rows: dict[str, tuple[float, float]] = {}

    def set_fused(fused: bool) -> Callable[[], None]:
        def step() -> None:
            for group in optimizer.param_groups:
                group["fused"] = fused
            optimizer.step()

        return step

    rows["adam"] = alternate(set_fused(False), set_fused(True), args.reps, args.rounds)
    rows["clip"] = alternate(
        lambda: th.nn.utils.clip_grad_norm_(policy.parameters(), 10.0),
        lambda: fast_dqn.clip_grad_norm([p.grad for p in params], 10.0),
        args.reps,
        args.rounds,
    )
    rows["sample"] = alternate(
        lambda: agent.replay_buffer.sample(32), lambda: state.sample(agent, 32), args.reps, args.rounds
    )
    rows["train_mode"] = alternate(lambda: policy.set_training_mode(True), lambda: None, args.reps, args.rounds)
    obs = agent.get_env().reset()  # type: ignore[union-attr]
    agent.exploration_rate = 0.0
    rows["act"] = alternate(
        lambda: super(PlasticDQN, agent).predict(obs),
        lambda: fast_dqn.predict(agent, obs, False),
        args.reps,
        args.rounds,
    )

    conv = agent.q_net.features_extractor.cnn[0]
    x = batch.observations
    grad = th.ones(32, conv.out_channels, 8, 8)
    rows["conv"] = alternate(
        lambda: conv(x).backward(grad),
        lambda: ConvWeightGradAsConv.apply(x, conv.weight, conv.bias).backward(grad),
        args.reps,
        args.rounds,
    )

    q_net, obs_s, obs_next = agent.q_net, batch.observations, batch.next_observations

    def separate() -> None:
        with th.no_grad():
            best = q_net(obs_next).argmax(dim=1)
        q_net(obs_s)[:, 0].sum().add(best.sum() * 0).backward()

    def joint() -> None:
        q = q_net(th.cat([obs_s, obs_next]))
        best = q[32:].detach().argmax(dim=1)
        q[:32, 0].sum().add(best.sum() * 0).backward()

    rows["online fwd s, s' (ddqn)"] = alternate(separate, joint, args.reps, args.rounds)

    if not args.skip_compile:
        compiled = th.compile(q_net)
        rows["compile"] = alternate(
            lambda: F.smooth_l1_loss(q_net(obs_s), th.zeros(32, q_net.action_space.n)).backward(),
            lambda: F.smooth_l1_loss(compiled(obs_s), th.zeros(32, q_net.action_space.n)).backward(),
            args.reps,
            args.rounds,
        )

    nets = state.explicit(agent, training=True)
    assert nets is not None, "the MinAtar network without hooks takes the explicit networks"

    def autograd_update() -> None:
        loss, _ = fast_dqn.td_loss(agent, batch)
        optimizer.zero_grad()
        loss.backward()

    rows["explicit fwd+bwd"] = alternate(
        autograd_update, lambda: fast_dqn.ExplicitLoss(agent, batch, nets).backward(), args.reps, args.rounds
    )
    for group in optimizer.param_groups:
        group["fused"] = True
    rows["adam direct"] = alternate(optimizer.step, state.adam_step, args.reps, args.rounds)
    flat = nets[0]
    rows["clip flat"] = alternate(
        lambda: fast_dqn.clip_grad_norm([p.grad for p in params], 10.0),
        lambda: fast_dqn.clip_flat(flat.flat_grad, 10.0),
        args.reps,
        args.rounds,
    )

    def conv_onednn() -> tuple[th.Tensor, ...]:
        out = F.conv2d(x, conv.weight, conv.bias)
        stride, padding, dilation, out_channels = [1, 1], [0, 0], [1, 1], [conv.out_channels]
        mask = [False, True, True]
        _, grad_w, grad_b = th.ops.aten.convolution_backward(
            grad, x, conv.weight, out_channels, stride, padding, dilation, False, [0, 0], 1, mask
        )
        return out, grad_w, grad_b

    with th.no_grad():
        want, got = conv_onednn(), conv_by_gemm(x, conv.weight, conv.bias, grad)
        channels_last = want[0].flatten(2).transpose(1, 2).reshape(-1, conv.out_channels)
        for a, b in zip((channels_last, *want[1:]), got):
            assert th.allclose(a, b, rtol=1e-4, atol=1e-5), "im2col conv differs from oneDNN's"
        rows["conv im2col"] = alternate(
            conv_onednn, lambda: conv_by_gemm(x, conv.weight, conv.bias, grad), args.reps, args.rounds
        )

    print(f"{'lever':26s} {'stock ms':>9s} {'fast ms':>9s} {'saved ms':>9s} {'fast/stock':>10s}")
    for name, (stock, fast) in rows.items():
        print(f"{name:26s} {stock:9.3f} {fast:9.3f} {stock - fast:9.3f} {fast / stock if stock else np.nan:10.2f}")


if __name__ == "__main__":
    main()
