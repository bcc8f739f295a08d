"""Training throughput of PlasticDQN (no interventions) against stock SB3 DQN on continual MinAtar.

What it measures: environment steps per second of ``model.learn(steps)`` (wall time of that call
only; building the env and the model is outside the timed region) with the protocol's update
schedule: one gradient step of batch 32 per env step, 50k buffer, target update every 1000 steps,
CPU, the MinAtar network, ``learning_starts`` small so most of the window is training. The env is the
``continual_minatar`` sequence (SpaceInvaders -> Asterix -> Seaquest) wrapped as the runner wraps it
(``make_vec_env``, ``DummyVecEnv``, ``Monitor``), with ``switch_every = steps // 2`` so each timed run
crosses one task switch.

How it runs: one short untimed warm-up of each, then ``--rounds`` rounds of one run of each
agent, the order alternating (ours/stock, stock/ours, ...) so slow drift on a noisy machine hits
both alike. Both use the same seed, and with ``double_q=False`` and no interventions PlasticDQN is
bit-for-bit stock DQN, so both do exactly the same work (same episodes, same updates).

How to read it: the per-round lines show the noise; the verdict is the ratio of the medians,
ours / stock, which should be >= 0.97 (PlasticDQN's hook plumbing costs at most ~3%). With
``--double-q`` it also reports PlasticDQN with ``double_q=True`` against the same stock runs, for
information only: Double DQN does one extra forward pass per update, so it is expected to be slower.

    .venv/bin/python benchmarks/throughput.py                 # defaults: 5 rounds x 5000 steps
    .venv/bin/python benchmarks/throughput.py --quick         # smoke run, a few seconds
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch as th
from stable_baselines3 import DQN
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import DummyVecEnv

from agents import PlasticDQN, minatar_policy_kwargs
from envs import make_sequence

SEQUENCE = "continual_minatar"
SEED = 0
TARGET_RATIO = 0.97

#: Agent label -> factory(env, learning_starts) returning an unlearned model.
Factory = Callable[[DummyVecEnv, int], DQN]


def dqn_kwargs(learning_starts: int) -> dict[str, Any]:
    """The settings both agents share (the protocol's, with a 50k buffer and an early start)."""
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


def factories(double_q: bool) -> dict[str, Factory]:
    """The agents to time: ours (``double_q=False``), stock, and optionally ours with Double DQN."""
    agents: dict[str, Factory] = {
        "ours": lambda env, ls: PlasticDQN("MlpPolicy", env, interventions=[], double_q=False, **dqn_kwargs(ls)),
        "stock": lambda env, ls: DQN("MlpPolicy", env, **dqn_kwargs(ls)),
    }
    if double_q:
        agents["ours-ddqn"] = lambda env, ls: PlasticDQN(
            "MlpPolicy", env, interventions=[], double_q=True, **dqn_kwargs(ls)
        )
    return agents


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


def timed_run(factory: Factory, steps: int, learning_starts: int) -> float:
    """Steps per second of ``learn(steps)`` on a fresh env and model; checks a task switch happened."""
    env = build_env(switch_every=max(steps // 2, 1))
    model = factory(env, learning_starts)
    gc.collect()
    start = time.perf_counter()
    model.learn(total_timesteps=steps, progress_bar=False)
    elapsed = time.perf_counter() - start
    task = env.get_attr("current_task_id")[0]
    env.close()
    if task == 0:
        raise RuntimeError("no task switch happened inside the timed window")
    return steps / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5_000, help="env steps per timed run (default 5000)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of one run per agent (default 5)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--learning-starts", type=int, default=500, help="default 500")
    parser.add_argument("--double-q", action="store_true", help="also time PlasticDQN with double_q=True")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 rounds of 800 steps, no warm-up")
    args = parser.parse_args()
    steps, rounds, learning_starts = args.steps, args.rounds, args.learning_starts
    if args.quick:
        steps, rounds, learning_starts = 800, 2, 200
    if steps <= learning_starts:
        parser.error(f"--steps ({steps}) must exceed --learning-starts ({learning_starts})")

    th.set_num_threads(args.threads)
    agents = factories(args.double_q)
    print(
        f"{SEQUENCE}: {rounds} rounds x {steps} steps per agent, learning_starts={learning_starts}, "
        f"switch at step {max(steps // 2, 1)}, torch threads={th.get_num_threads()}, device=cpu"
    )

    if not args.quick:  # first-use costs (imports, allocator, MinAtar init) land outside the rounds
        for factory in agents.values():
            timed_run(factory, learning_starts + 300, learning_starts)

    results: dict[str, list[float]] = {name: [] for name in agents}
    names = list(agents)
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            results[name].append(timed_run(agents[name], steps, learning_starts))
        print(f"round {r + 1}: " + "  ".join(f"{name} {results[name][-1]:7.1f}" for name in order) + "  steps/s")

    medians = {name: statistics.median(values) for name, values in results.items()}
    print("median steps/s: " + "  ".join(f"{name} {value:.1f}" for name, value in medians.items()))
    ratio = medians["ours"] / medians["stock"]
    print(f"ratio ours/stock: {ratio:.3f} (target >= {TARGET_RATIO}) -> {'OK' if ratio >= TARGET_RATIO else 'BELOW'}")
    if "ours-ddqn" in medians:
        print(f"ratio ours-ddqn/stock: {medians['ours-ddqn'] / medians['stock']:.3f} (information only)")


if __name__ == "__main__":
    main()
