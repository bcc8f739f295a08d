"""Wall-time cost of each intervention against none, on PlasticDQN on continual MinAtar.

What it measures: the wall time of ``learn(steps)`` with one intervention (registry defaults) against the
same run with no intervention, in rounds that alternate the order (so drift on a noisy machine hits all
arms alike), with the protocol's update schedule (one update of batch 32 per env step, MinAtar network,
CPU, one torch thread). Task-switch interventions fire once, at the switch in the middle of the window.

How to read it: one ratio per intervention, median time / median time of "none", in wall time and in CPU
time of this process (with one torch thread, CPU time is what the wall time would be on an idle machine;
trust it when the script warns that other processes shared the cores). Targets from the issue:
``kfac_rank`` under 1.5, the parameter-only ones (``l2``, ``l2_init``) under 1.05.

    .venv/bin/python benchmarks/intervention_cost.py                    # every registered intervention
    .venv/bin/python benchmarks/intervention_cost.py --only l2 kfac_rank
    .venv/bin/python benchmarks/intervention_cost.py --quick            # smoke run
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time

import torch as th
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import DummyVecEnv

from agents import POLICIES, PlasticDQN, minatar_policy_kwargs
from envs import make_sequence
from rl_plasticity.interventions import INTERVENTIONS, build_interventions

TARGETS = {"kfac_rank": 1.5, "l2": 1.05, "l2_init": 1.05}


def timed_run(names: list[str], steps: int, learning_starts: int) -> tuple[float, float]:
    """(wall, CPU) seconds of ``learn(steps)`` with the named interventions, on a fresh env and agent."""
    env = make_vec_env(make_sequence, n_envs=1, vec_env_cls=DummyVecEnv,
                       env_kwargs=dict(name="continual_minatar", switch_every=steps // 2, seed=0))
    agent = PlasticDQN(
        POLICIES["dqn"], env, interventions=build_interventions(names, {}), double_q=True, learning_rate=3e-4,
        buffer_size=50_000, learning_starts=learning_starts, batch_size=32, train_freq=1,
        target_update_interval=1_000, exploration_final_eps=0.1, policy_kwargs=minatar_policy_kwargs("dqn"),
        device="cpu", seed=0,
    )
    gc.collect()
    wall, cpu = time.perf_counter(), time.process_time()
    agent.learn(total_timesteps=steps, progress_bar=False)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    env.close()
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3_000, help="env steps per timed run (default 3000)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of one run per arm (default 3)")
    parser.add_argument("--learning-starts", type=int, default=500, help="default 500")
    parser.add_argument("--only", nargs="*", default=None, help="interventions to time (default: all)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 round of 800 steps")
    args = parser.parse_args()
    steps, rounds, learning_starts = args.steps, args.rounds, args.learning_starts
    if args.quick:
        steps, rounds, learning_starts = 800, 1, 200
    th.set_num_threads(1)
    th.set_flush_denormal(True)  # as rlp train does: weight decay otherwise slows down on denormal floats
    names = args.only if args.only is not None else sorted(INTERVENTIONS)
    unknown = [n for n in names if n not in INTERVENTIONS]
    if unknown:
        parser.error(f"unknown interventions {unknown}; valid: {', '.join(sorted(INTERVENTIONS))}")
    arms = ["none", *names]
    print(f"continual_minatar DDQN: {rounds} rounds x {steps} steps per arm, learning_starts={learning_starts}, "
          f"switch at step {steps // 2}, torch threads=1, device=cpu")

    wall: dict[str, list[float]] = {arm: [] for arm in arms}
    cpu: dict[str, list[float]] = {arm: [] for arm in arms}
    loads = [os.getloadavg()[0]]
    for r in range(rounds):
        for arm in arms if r % 2 == 0 else arms[::-1]:
            w, c = timed_run([] if arm == "none" else [arm], steps, learning_starts)
            wall[arm].append(w)
            cpu[arm].append(c)
        loads.append(os.getloadavg()[0])
        print(f"round {r + 1}: " + "  ".join(f"{arm} {wall[arm][-1]:.1f}s (cpu {cpu[arm][-1]:.1f})" for arm in arms))
    cores = os.cpu_count() or 1
    print(f"load average (1 min) during the rounds: {min(loads):.1f}-{max(loads):.1f} on {cores} cores"
          + ("; WARNING: other processes shared the cores, trust the cpu ratios" if max(loads) > cores - 0.5 else ""))

    base_wall, base_cpu = statistics.median(wall["none"]), statistics.median(cpu["none"])
    print(f"none: {base_wall:.2f} s wall, {base_cpu:.2f} s cpu ({steps / base_wall:.0f} steps/s)")
    for arm in names:
        ratios = statistics.median(wall[arm]) / base_wall, statistics.median(cpu[arm]) / base_cpu
        target = TARGETS.get(arm)
        verdicts = ["" if target is None else (" OK" if r < target else " ABOVE") for r in ratios]
        print(f"{arm:<22} ratio wall {ratios[0]:.3f}{verdicts[0]}, cpu {ratios[1]:.3f}{verdicts[1]}"
              + ("" if target is None else f" (target < {target})"))


if __name__ == "__main__":
    main()
