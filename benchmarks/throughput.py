"""Training throughput of PlasticDQN, on the stock and the fast path, against stock SB3 DQN on continual MinAtar.

What it measures: environment steps per second of ``model.learn`` with the protocol's update schedule (one
gradient step of batch 32 per env step, 50k buffer, target update every 1000 steps, CPU, the MinAtar
network, one torch thread by default). The env is the ``continual_minatar`` sequence (SpaceInvaders ->
Asterix -> Seaquest) wrapped as the runner wraps it (``make_vec_env``, ``DummyVecEnv``, ``Monitor``); the
task switch falls in the middle of the timed steps. The agents, all with ``double_q=False`` and no
intervention or monitor, so all run the same algorithm on the same seed:

- ``stock``: SB3's ``DQN``;
- ``plain``: ``PlasticDQN`` on the stock path (bit-for-bit stock SB3; its hook plumbing should cost <= 3%);
- ``fast``: ``PlasticDQN(fast=True)`` (:mod:`agents.fast_dqn`; target 2x stock);
- ``fast-ddqn``: the fast path with Double DQN, for information (one more forward pass per update).

How it runs: every agent is built up front and fills its replay buffer, untimed, for ``learning_starts``
steps plus a warm-up. Then the agents take turns, ``--chunk`` env steps each (``learn(chunk,
reset_num_timesteps=False)``), the order reversing every round, for ``--rounds`` rounds: on this shared
virtual machine the speed drifts by 10-30% from minute to minute, and turns of a second or so expose every
agent to the same drift. Each turn is timed in wall time and in CPU time of this process; with one torch
thread the CPU time is the work done, while the wall time also counts the time other processes held the
core. So the ratios use CPU time (wall-time ratios are printed too); each ratio is the median over rounds of
the per-round ratio to stock.

Then, for information, the full C-CHAIN configuration: the fast path with Double DQN and the monitor at its
defaults (``rl_plasticity.monitor.MonitorCallback``, probe set, light probes every 2000 updates, heavy probes
at the switch and at the end), in one ``learn`` call of ``--monitor-steps`` steps. The CPU time inside the
heavy probe rounds is measured apart, and the projected time of the full protocol (6M steps, an update per
step, 2 switches and the end) is ``6M / steady rate + 3 x heavy round``.

How to read it: the last line is ``ratios: plain/stock=<x> fast/stock=<y>``; targets plain >= 0.97, fast >= 2.

    .venv/bin/python benchmarks/throughput.py                 # defaults: 5 rounds x 1000 steps per agent
    .venv/bin/python benchmarks/throughput.py --threads 2     # the same with 2 torch threads
    .venv/bin/python benchmarks/throughput.py --quick         # smoke run, under a minute
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch as th
from stable_baselines3 import DQN
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import DummyVecEnv

from agents import PlasticDQN, minatar_policy_kwargs
from envs import make_sequence
from rl_plasticity.config import MonitorConfig
from rl_plasticity.monitor import MonitorCallback, MonitorSettings
from rl_plasticity.runner import settings_from
from rl_plasticity.task_envs import TaskEnvs

SEQUENCE = "continual_minatar"
SEED = 0
TARGETS = {"plain": 0.97, "fast": 2.0}
#: The full protocol (C-CHAIN, Tang & Berseth 2025): 3 tasks x 2M steps; heavy probes at 2 switches and the end.
PROTOCOL_STEPS, PROTOCOL_HEAVY_ROUNDS = 6_000_000, 3

#: Agent label -> factory(env, learning_starts) returning an unlearned model.
Factory = Callable[[DummyVecEnv, int], DQN]


def dqn_kwargs(learning_starts: int) -> dict[str, Any]:
    """The settings every agent shares (the protocol's, with a 50k buffer and an early start)."""
    return dict(
        learning_rate=3e-4,
        buffer_size=50_000,
        learning_starts=learning_starts,
        batch_size=32,
        train_freq=1,
        gradient_steps=1,
        target_update_interval=1_000,
        exploration_initial_eps=1.0,
        exploration_final_eps=0.1,
        exploration_fraction=0.0833333,
        policy_kwargs=minatar_policy_kwargs("dqn"),
        device="cpu",
        seed=SEED,
        verbose=0,
    )


def plastic(fast: bool, double_q: bool) -> Factory:
    """A factory of PlasticDQN on one path, without interventions."""
    return lambda env, ls: PlasticDQN(
        "MlpPolicy", env, interventions=[], double_q=double_q, fast=fast, **dqn_kwargs(ls)
    )


FACTORIES: dict[str, Factory] = {
    "stock": lambda env, ls: DQN("MlpPolicy", env, **dqn_kwargs(ls)),
    "plain": plastic(fast=False, double_q=False),
    "fast": plastic(fast=True, double_q=False),
    "fast-ddqn": plastic(fast=True, double_q=True),
}


def build_env(switch_every: int) -> DummyVecEnv:
    """The sequence wrapped as ``rl_plasticity.runner.build_env`` does it (one copy)."""
    env = make_vec_env(
        make_sequence,
        n_envs=1,
        env_kwargs=dict(name=SEQUENCE, switch_every=switch_every, seed=SEED),
        vec_env_cls=DummyVecEnv,
    )
    assert isinstance(env, DummyVecEnv)
    return env


def timed_learn(model: DQN, steps: int, **kwargs: Any) -> tuple[float, float]:
    """(wall, CPU) seconds of ``steps`` more env steps of ``model.learn``."""
    gc.collect()
    wall, cpu = time.perf_counter(), time.process_time()
    model.learn(total_timesteps=steps, reset_num_timesteps=False, progress_bar=False, **kwargs)
    return time.perf_counter() - wall, time.process_time() - cpu


def side_by_side(rounds: int, chunk: int, learning_starts: int, warmup: int) -> dict[str, list[tuple[float, float]]]:
    """Per agent, the (wall, CPU) seconds of each of its ``rounds`` turns of ``chunk`` steps."""
    switch_every = learning_starts + warmup + rounds * chunk // 2
    models = {}
    for name, factory in FACTORIES.items():
        models[name] = factory(build_env(switch_every), learning_starts)
        models[name].learn(total_timesteps=learning_starts + warmup, progress_bar=False)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in models}
    names = list(models)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            times[name].append(timed_learn(models[name], chunk))
        print(f"round {r + 1}: " + "  ".join(f"{n} {chunk / times[n][-1][1]:6.1f}" for n in names) + "  steps/s (CPU)")
    for name, model in models.items():
        if model.get_env().get_attr("current_task_id")[0] == 0:  # type: ignore[union-attr]
            raise RuntimeError(f"{name}: no task switch happened inside the timed steps")
        model.get_env().close()  # type: ignore[union-attr]
    return times


def paired_ratio(times: dict[str, list[tuple[float, float]]], name: str, clock: int) -> float:
    """Median over rounds of (stock's time / ``name``'s time) in that round; ``clock`` 0 = wall, 1 = CPU."""
    return statistics.median(s[clock] / a[clock] for s, a in zip(times["stock"], times[name]))


def monitor_run(steps: int, learning_starts: int) -> dict[str, float]:
    """The fast path with Double DQN and the monitor at its defaults, one ``learn`` of ``steps`` steps with the
    task switch in the middle.

    :return: ``wall`` and ``cpu`` seconds in all, ``heavy_wall`` and ``heavy_cpu`` seconds inside the heavy
        probe rounds, and their number ``heavy_rounds``.
    """
    env = build_env(switch_every=steps // 2)
    model = plastic(fast=True, double_q=True)(env, learning_starts)
    out = dict(heavy_wall=0.0, heavy_cpu=0.0, heavy_rounds=0)
    with tempfile.TemporaryDirectory() as run_dir:
        monitor = MonitorCallback(
            settings_from(MonitorConfig(), MonitorSettings), Path(run_dir), TaskEnvs(SEQUENCE, {}, SEED, SEED)
        )
        probe_round = monitor._probe_round

        def timed_round(heavy: bool) -> dict[str, float]:
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                return probe_round(heavy)
            finally:
                if heavy:
                    out["heavy_wall"] += time.perf_counter() - wall
                    out["heavy_cpu"] += time.process_time() - cpu
                    out["heavy_rounds"] += 1

        monitor._probe_round = timed_round  # type: ignore[method-assign]
        out["wall"], out["cpu"] = timed_learn(model, steps, callback=monitor)
    env.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="turns per agent (default 5)")
    parser.add_argument("--chunk", type=int, default=1_000, help="env steps per turn (default 1000)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--learning-starts", type=int, default=1_000, help="default 1000")
    parser.add_argument(
        "--monitor-steps", type=int, default=6_000, help="steps of the run with the monitor (0: skip it; default 6000)"
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 rounds of 300 steps, short monitor run")
    args = parser.parse_args()
    rounds, chunk, learning_starts, warmup, monitor_steps = (
        args.rounds,
        args.chunk,
        args.learning_starts,
        500,
        args.monitor_steps,
    )
    if args.quick:
        rounds, chunk, learning_starts, warmup, monitor_steps = 2, 300, 200, 0, min(monitor_steps, 1_000)

    th.set_num_threads(args.threads)
    print(
        f"{SEQUENCE}: {rounds} rounds x {chunk} steps per agent after {learning_starts + warmup} untimed, "
        f"train_freq 1, batch 32, torch threads={th.get_num_threads()}, device=cpu"
    )
    times = side_by_side(rounds, chunk, learning_starts, warmup)
    for name, values in times.items():
        wall, cpu = (sum(v[i] for v in values) for i in (0, 1))
        print(f"{name:10s} {rounds * chunk / cpu:7.1f} steps/s CPU  {rounds * chunk / wall:7.1f} steps/s wall")
    for name in FACTORIES:
        if name != "stock":
            target = f" (target >= {TARGETS[name]})" if name in TARGETS else " (information)"
            print(
                f"{name}/stock: CPU {paired_ratio(times, name, 1):.3f}  wall {paired_ratio(times, name, 0):.3f}"
                + target
            )

    if monitor_steps:
        run = monitor_run(monitor_steps, learning_starts)
        for clock in ("cpu", "wall"):
            steady = monitor_steps / (run[clock] - run[f"heavy_{clock}"])
            per_heavy = run[f"heavy_{clock}"] / max(run["heavy_rounds"], 1)
            hours = (PROTOCOL_STEPS / steady + PROTOCOL_HEAVY_ROUNDS * per_heavy) / 3600
            print(
                f"fast-ddqn + monitor (defaults), {clock}: {steady:.1f} steps/s outside the "
                f"{run['heavy_rounds']:.0f} heavy probe rounds, {per_heavy:.1f} s per heavy round; full protocol "
                f"({PROTOCOL_STEPS:,} steps) projected {hours:.2f} h (target <= 3 h, >= 556 steps/s)"
            )
    print(f"ratios: plain/stock={paired_ratio(times, 'plain', 1):.2f} fast/stock={paired_ratio(times, 'fast', 1):.2f}")


if __name__ == "__main__":
    main()
