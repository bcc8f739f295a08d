"""Cost of each intervention against none, on PlasticDQN on continual MinAtar.

What it measures: the wall and CPU time of training with one intervention (registry defaults) against the
same training with none, with the protocol's update schedule (one update of batch 32 per env step, MinAtar
network, Double DQN, CPU, one torch thread). Every arm is an agent of its own, built up front; after an
untimed ``learning_starts`` that fills each replay buffer, the arms take turns, ``--chunk`` env steps each
(``learn(chunk, reset_num_timesteps=False)``, the order rotating), until each has trained ``--steps`` steps.
Interleaving at this grain (about a second per turn) exposes every arm to the same drift in machine speed,
which on this shared virtual machine moves the time of identical runs by 10-30% from minute to minute: a
ratio of separate runs measures the machine as much as the intervention. The task switch falls in the
middle of the timed steps, so task-switch interventions fire once.

How to read it: one ratio per intervention, its total time over that of "none", in wall time and in CPU
time of this process (with one torch thread they agree unless other processes compete for the cores). It
also prints each arm's episodes and CPU time inside ``train()``: arms that play differently spend different
time in the environment, which is not the intervention's cost.
Targets from the issue: ``kfac_rank`` under 1.5, the parameter-only ones (``l2``, ``l2_init``) under 1.05.

    .venv/bin/python benchmarks/intervention_cost.py                    # every registered intervention
    .venv/bin/python benchmarks/intervention_cost.py --only l2 kfac_rank
    .venv/bin/python benchmarks/intervention_cost.py --quick            # smoke run
"""

from __future__ import annotations

import argparse
import gc
import os
import time

import torch as th
from _timing import clock_cpu  # benchmarks/ is on sys.path when a script here runs
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import DummyVecEnv

from agents import POLICIES, PlasticDQN, minatar_policy_kwargs
from envs import make_sequence
from rl_plasticity.interventions import INTERVENTIONS, build_interventions

TARGETS = {"kfac_rank": 1.5, "l2": 1.05, "l2_init": 1.05}


def build(names: list[str], switch_every: int, learning_starts: int) -> PlasticDQN:
    """A fresh env and agent with the named interventions (seed 0, as every arm)."""
    env = make_vec_env(
        make_sequence,
        n_envs=1,
        vec_env_cls=DummyVecEnv,
        env_kwargs=dict(name="continual_minatar", switch_every=switch_every, seed=0),
    )
    return PlasticDQN(
        POLICIES["dqn"],
        env,
        interventions=build_interventions(names, {}),
        double_q=True,
        learning_rate=3e-4,
        buffer_size=50_000,
        learning_starts=learning_starts,
        batch_size=32,
        train_freq=1,
        target_update_interval=1_000,
        exploration_final_eps=0.1,
        policy_kwargs=minatar_policy_kwargs("dqn"),
        device="cpu",
        seed=0,
    )


def timed_chunk(agent: PlasticDQN, steps: int) -> tuple[float, float]:
    """(wall, CPU) seconds of ``steps`` more env steps of training."""
    wall, cpu = time.perf_counter(), time.process_time()
    agent.learn(total_timesteps=steps, reset_num_timesteps=False, progress_bar=False)
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6_000, help="timed env steps per arm (default 6000)")
    parser.add_argument("--chunk", type=int, default=250, help="env steps per turn (default 250)")
    parser.add_argument("--learning-starts", type=int, default=500, help="default 500")
    parser.add_argument("--only", nargs="*", default=None, help="interventions to time (default: all)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1000 steps")
    args = parser.parse_args()
    steps, chunk, learning_starts = args.steps, args.chunk, args.learning_starts
    if args.quick:
        steps, learning_starts = 1_000, 200
    th.set_num_threads(1)
    th.set_flush_denormal(True)  # as rlp train does: weight decay otherwise slows down on denormal floats
    names = args.only if args.only is not None else sorted(INTERVENTIONS)
    unknown = [n for n in names if n not in INTERVENTIONS]
    if unknown:
        parser.error(f"unknown interventions {unknown}; valid: {', '.join(sorted(INTERVENTIONS))}")
    arms = ["none", *names]
    switch = learning_starts + steps // 2
    print(
        f"continual_minatar DDQN: {steps} timed steps per arm in turns of {chunk}, after learning_starts="
        f"{learning_starts}; task switch at step {switch}; torch threads=1, device=cpu"
    )

    agents = {arm: build([] if arm == "none" else [arm], switch, learning_starts) for arm in arms}
    for agent in agents.values():  # untimed: fill the buffer up to the first update
        agent.learn(total_timesteps=learning_starts, progress_bar=False)
    in_train = {arm: clock_cpu([(agent, ("train",))]) for arm, agent in agents.items()}
    episodes_before = {arm: agent._episode_num for arm, agent in agents.items()}
    gc.collect()
    wall = dict.fromkeys(arms, 0.0)
    cpu = dict.fromkeys(arms, 0.0)
    loads = [os.getloadavg()[0]]
    turns = steps // chunk
    for turn in range(turns):
        shift = turn % len(arms)
        for arm in arms[shift:] + arms[:shift]:
            w, c = timed_chunk(agents[arm], chunk)
            wall[arm] += w
            cpu[arm] += c
        if (turn + 1) % max(1, turns // 4) == 0:
            loads.append(os.getloadavg()[0])
            print(f"after {(turn + 1) * chunk} steps: " + "  ".join(f"{a} {cpu[a]:.1f}s" for a in arms))
    for agent in agents.values():
        agent.get_env().close()
    cores = os.cpu_count() or 1
    print(
        f"load average (1 min): {min(loads):.1f}-{max(loads):.1f} on {cores} cores"
        + (
            "; other processes shared the cores (the turns still share the slowdown)"
            if max(loads) > cores - 0.5
            else ""
        )
    )

    print(f"none: {wall['none']:.2f} s wall, {cpu['none']:.2f} s cpu ({turns * chunk / wall['none']:.0f} steps/s)")
    episodes = {arm: agents[arm]._episode_num - episodes_before[arm] for arm in arms}
    print(
        "episodes in the timed steps (the env's share of the time depends on them): "
        + "  ".join(f"{arm} {n}" for arm, n in episodes.items())
    )
    print(
        "cpu in train() (the updates, interventions included): "
        + "  ".join(f"{arm} {in_train[arm][0]:.1f}s" for arm in arms)
        + "; the rest of learn(): "
        + "  ".join(f"{arm} {cpu[arm] - in_train[arm][0]:.1f}s" for arm in arms)
    )
    for arm in names:
        ratios = wall[arm] / wall["none"], cpu[arm] / cpu["none"]
        target = TARGETS.get(arm)
        verdicts = ["" if target is None else (" OK" if r < target else " ABOVE") for r in ratios]
        print(
            f"{arm:<22} ratio wall {ratios[0]:.3f}{verdicts[0]}, cpu {ratios[1]:.3f}{verdicts[1]}"
            + ("" if target is None else f" (target < {target})")
        )


if __name__ == "__main__":
    main()
