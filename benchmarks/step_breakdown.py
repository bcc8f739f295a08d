"""Where one env step of the fast DQN path goes: CPU ms per env step of each piece, inclusive and exclusive.

What it measures: ``PlasticDQN(fast=True)`` in ``benchmarks/throughput.py``'s setting (continual MinAtar,
train_freq 1, batch 32, 50k buffer, one torch thread, no intervention or monitor, ``double_q=False``). After
the untimed start, ``--steps`` more steps of ``learn`` run first as they are (the reference rate), then with
each piece of the step wrapped in a CPU-time counter (``time.process_time``, robust to the other load on the
machine): the collection loop (the fast path's own, :func:`agents.fast_dqn.collect_rollouts`, with
``DummyVecEnv.step`` and ``_store_transition`` written out: the mode switch if needed, acting, each layer of
the env stack down to MinAtar's ``act``, info buffer, replay add, ``_on_step``) and the update (sampling, the
path check, the forward passes, the loss, the backward, the clip, Adam). A piece's exclusive time is its own,
without the timed pieces it calls.

How to read it: ``incl`` and ``excl`` ms per env step, and calls per step (the acting forward pass and the
target network's forward both run :meth:`~agents.fast_dqn.ExplicitQNetwork.q_values`, 1.9 calls per step in
all). The counters cost a few microseconds per timed call, which land in the callers' exclusive time: the
first line prints both rates, so the inflation shows. Small Python pieces cost 2-5 times more here than in a
loop of their own (``benchmarks/fast_levers.py``): between two calls the update's arithmetic evicts their
code and data from the caches.

With ``--compare-loop ROUNDS``, first the fast path with its lean collection loop
(:func:`agents.fast_dqn.collect_rollouts`) against the same agent on SB3's ``collect_rollouts``, in alternating
turns of ``--steps`` env steps, ``ROUNDS`` rounds: CPU ms per env step of the whole step and of the collection
in it, and per round the time the lean loop saves. The saving is the robust figure: the whole step's per-round
ratio spreads by +-15% on this machine (the update's 80% of the step drifts), the collection's time far less.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/step_breakdown.py --steps 1500
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/step_breakdown.py --steps 500 --compare-loop 12
"""

from __future__ import annotations

import argparse
import collections
import functools
import gc
import statistics
import time
from collections.abc import Callable
from typing import Any

import minatar.environment
import minatar.gym
import torch as th
from gymnasium.wrappers import TransformObservation
from stable_baselines3 import DQN
from stable_baselines3.common import off_policy_algorithm
from stable_baselines3.common.buffers import ReplayBuffer
from stable_baselines3.common.monitor import Monitor
from throughput import build_env, plastic  # benchmarks/ is on sys.path when a script here runs

from agents import dqn, fast_dqn
from agents import plastic as plastic_mixin
from envs import minatar as envs_minatar
from envs.sequence import TaskSequenceEnv


class PieceClock:
    """CPU time spent inside wrapped callables, inclusive and exclusive of the wrapped callables they call."""

    def __init__(self) -> None:
        self.inclusive: collections.defaultdict[str, float] = collections.defaultdict(float)
        self.exclusive: collections.defaultdict[str, float] = collections.defaultdict(float)
        self.calls: collections.Counter[str] = collections.Counter()
        self.on = False
        self._stack: list[list[float]] = []  # per open call: [CPU seconds of its timed callees]

    def timed(self, label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` counted under ``label`` while :attr:`on`."""

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if not self.on:
                return fn(*args, **kwargs)
            self._stack.append([0.0])
            start = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                spent = time.process_time() - start
                (callees,) = self._stack.pop()
                self.inclusive[label] += spent
                self.exclusive[label] += spent - callees
                self.calls[label] += 1
                if self._stack:
                    self._stack[-1][0] += spent

        return wrapper

    def wrap(self, owner: object, name: str, label: str) -> None:
        """Replace ``owner.name`` by its :meth:`timed` version."""
        setattr(owner, name, self.timed(label, getattr(owner, name)))


def compare_loops(model: dqn.PlasticDQN, steps: int, rounds: int) -> None:
    """Print CPU ms per env step of ``learn`` and of the ``collect_rollouts`` inside it, with the fast path's
    lean collection loop and with SB3's, in alternating turns of ``steps`` env steps, and per round what the
    lean loop saves. Both loops run under the same timer, so the timer's cost is the same in both."""
    times: dict[str, list[float]] = {"lean": [], "SB3": []}
    collect: dict[str, list[float]] = {"lean": [], "SB3": []}
    loops = {"lean": dqn.PlasticDQN.collect_rollouts, "SB3": off_policy_algorithm.OffPolicyAlgorithm.collect_rollouts}
    for r in range(rounds):
        for loop in ("lean", "SB3") if r % 2 == 0 else ("SB3", "lean"):
            clock = PieceClock()
            model.collect_rollouts = clock.timed("collect", functools.partial(loops[loop], model))  # type: ignore[method-assign]
            gc.collect()
            clock.on = True
            start = time.process_time()
            model.learn(steps, reset_num_timesteps=False, progress_bar=False)
            times[loop].append((time.process_time() - start) / steps * 1e3)
            collect[loop].append(clock.inclusive["collect"] / steps * 1e3)
            del model.collect_rollouts
    saved = [sb3 - lean for lean, sb3 in zip(collect["lean"], collect["SB3"])]
    med = statistics.median
    print(f"lean collection loop vs SB3's, {rounds} rounds x {steps} steps each, CPU ms per env step (medians):")
    print(f"  whole step: lean {med(times['lean']):.3f}  SB3 {med(times['SB3']):.3f}")
    print(f"  collect_rollouts: lean {med(collect['lean']):.3f}  SB3 {med(collect['SB3']):.3f}")
    print(f"  saved per round (ms): {', '.join(f'{x:.3f}' for x in saved)}; median {med(saved):.3f}")
    shares = [x / sb3 for x, sb3 in zip(saved, times["SB3"])]
    ratios = [lean / sb3 for lean, sb3 in zip(times["lean"], times["SB3"])]
    print(f"  saved / SB3 step: median {med(shares):.3f}; whole step lean / SB3: median {med(ratios):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1_500, help="timed env steps, each way (default 1500)")
    parser.add_argument("--compare-loop", type=int, default=0, metavar="ROUNDS", help="first compare the loops")
    args = parser.parse_args()
    th.set_num_threads(1)
    steps = args.steps
    env = build_env(switch_every=10 * steps * (2 * args.compare_loop + 1) + 10_000)
    model = plastic(fast=True, double_q=False)(env, 1_000)
    model.learn(1_500, progress_bar=False)
    if args.compare_loop:
        compare_loops(model, steps, args.compare_loop)
    start = time.process_time()
    model.learn(steps, reset_num_timesteps=False, progress_bar=False)
    reference = (time.process_time() - start) / steps

    clock = PieceClock()
    pieces: list[tuple[object, str, str]] = [
        (dqn.PlasticDQN, "collect_rollouts", "collect_rollouts (the fast path's lean loop)"),
        (model.policy, "set_training_mode", "  set_training_mode(False)"),
        (dqn.PlasticDQN, "_sample_action", "  _sample_action"),
        (fast_dqn, "predict", "    fast predict"),
        (Monitor, "step", "  Monitor.step"),
        (TaskSequenceEnv, "step", "    TaskSequenceEnv.step"),
        (TransformObservation, "step", "      TransformObservation.step"),
        (envs_minatar._MinAtarEnv, "step", "        _MinAtarEnv.step"),
        (minatar.gym.BaseEnv, "step", "          minatar BaseEnv.step"),
        (minatar.environment.Environment, "act", "            game.act"),
        (minatar.environment.Environment, "state", "            game.state"),
        (DQN, "_update_info_buffer", "  _update_info_buffer"),
        (ReplayBuffer, "add", "  ReplayBuffer.add"),
        (DQN, "_on_step", "  DQN._on_step"),
        (dqn.PlasticDQN, "train", "train"),
        (fast_dqn.FastState, "sample", "  sample"),
        (fast_dqn.FastState, "explicit", "  explicit (path check, also in predict)"),
        (fast_dqn.ExplicitLoss, "__init__", "  ExplicitLoss (forwards, TD target, loss)"),
        (fast_dqn.ExplicitQNetwork, "q_values", "    q_values (target on s'; acting)"),
        (fast_dqn.ExplicitQNetwork, "forward", "    online forward"),
        (fast_dqn.FastState, "preprocess", "    preprocess"),
        (fast_dqn.TD_LOSSES, "huber", "    loss (smooth_l1_loss)"),
        (plastic_mixin.PlasticMixin, "_optimizer_step", "  _optimizer_step"),
        (fast_dqn.ExplicitLoss, "backward", "    ExplicitLoss.backward"),
        (fast_dqn.ExplicitQNetwork, "backward", "      network backward"),
        (fast_dqn, "clip_buffer", "    clip"),
        (fast_dqn.AdamStep, "__call__", "    Adam"),
    ]
    for owner, name, label in pieces:
        if isinstance(owner, dict):
            owner[name] = clock.timed(label, owner[name])
        else:
            clock.wrap(owner, name, label)
    sequence = env.envs[0].unwrapped
    assert isinstance(sequence, TaskSequenceEnv)
    for task_id in range(sequence.num_tasks):
        task_env = sequence._task_env(task_id)
        if isinstance(task_env, TransformObservation):
            task_env.func = clock.timed("        observation padding", task_env.func)

    clock.on = True
    start = time.process_time()
    model.learn(steps, reset_num_timesteps=False, progress_bar=False)
    timed = (time.process_time() - start) / steps
    clock.on = False
    accounted = (clock.inclusive[pieces[0][2]] + clock.inclusive["train"]) / steps
    print(f"{steps} steps: {reference * 1e3:.3f} ms per env step as is, {timed * 1e3:.3f} with the counters")
    print(f"learn's loop outside collect_rollouts and train: {(timed - accounted) * 1e3:.3f} ms per env step")
    print(f"{'piece':46s} {'incl ms':>8s} {'excl ms':>8s} {'calls':>6s}")
    for label in clock.inclusive:
        incl, excl = clock.inclusive[label] / steps * 1e3, clock.exclusive[label] / steps * 1e3
        print(f"{label:46s} {incl:8.3f} {excl:8.3f} {clock.calls[label] / steps:6.2f}")


if __name__ == "__main__":
    main()
