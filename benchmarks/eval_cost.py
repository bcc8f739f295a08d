"""Cost of the fair-comparison machinery: the random-policy probe sets and the greedy evaluation.

Part 1, probe sets. For each task of the study presets' sequences (permuted Breakout, 6 tasks; continual
MinAtar, SpaceInvaders -> Asterix -> Seaquest), the wall and CPU seconds to build its ``@probe_set`` as the
monitor does (:class:`~rl_plasticity.probe_sets.RandomProbeSets` with the default ``monitor:`` section: 1024
samples from at least 10 episodes and 4096 transitions of a uniform-random policy, episodes cut at 1000 steps).
A run builds each task's set once.

Part 2, evaluation as a share of training. ``rlp train configs/study/permuted_breakout.yaml`` (its ``eval:``
section: every task, 10 greedy episodes, every 10000 steps and at each switch), shortened by ``--steps``
(``total_steps``), with the monitor and checkpoints off so that the rest is training alone, one torch thread.
It accounts the evaluation directly: the CPU time spent inside :meth:`Evaluator.evaluate` against the CPU time
of the rest of ``train()`` (evaluation changes nothing in training, so that is its whole cost, and it is robust
to other load on the machine). The share depends on how long the greedy episodes last: an untrained Breakout
policy loses the ball within a few dozen steps, a good one plays far longer, so a short run measures the
early part of training.

    .venv/bin/python benchmarks/eval_cost.py                 # defaults: 20k steps
    .venv/bin/python benchmarks/eval_cost.py --steps 5000    # quicker
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch as th
from _timing import clock_cpu

from rl_plasticity.catalog import registries
from rl_plasticity.config import MonitorConfig, load_config
from rl_plasticity.evaluation import Evaluator
from rl_plasticity.probe_sets import RandomProbeSets
from rl_plasticity.runner import train
from rl_plasticity.task_envs import TaskEnvs

ROOT = Path(__file__).resolve().parents[1]


def probe_set_costs() -> None:
    monitor = MonitorConfig()
    print(
        f"Part 1: one @probe_set per task ({monitor.probe_set_size} samples, >= {monitor.probe_set_episodes} "
        f"episodes, episodes cut at {monitor.probe_set_max_episode_steps} steps)"
    )
    for preset in ("configs/study/permuted_breakout.yaml", "configs/study/continual_minatar.yaml"):
        cfg = load_config(ROOT / preset, registries=registries())
        sets = RandomProbeSets(
            TaskEnvs.from_config(cfg),
            monitor.probe_set_size,
            monitor.probe_set_episodes,
            monitor.probe_set_max_episode_steps,
        )
        walls, cpus = [], []
        for task, name in enumerate(sets.task_envs.task_names):
            wall, cpu = time.perf_counter(), time.process_time()
            sets.arrays(task)
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
            print(
                f"  {preset:40s} {name:22s} wall {walls[-1]:6.2f} s  CPU {cpus[-1]:6.2f} s  "
                f"({sets.episodes[task]} episodes)"
            )
        wall, cpu = statistics.median(walls), statistics.median(cpus)
        print(f"  {preset:40s} median per task: wall {wall:.2f} s, CPU {cpu:.2f} s")


def eval_share(steps: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(
            ROOT / "configs/study/permuted_breakout.yaml",
            [
                f"total_steps={steps}",
                "monitor.enabled=false",
                "checkpoint.every=null",
                "logging.save_model=false",
                f"logging.root_dir={tmp}",
                "threads=1",
            ],
            registries=registries(),
        )
        every = cfg.eval.every or cfg.env.switch_every // 10
        print(
            f"\nPart 2: evaluation in {steps} steps of configs/study/permuted_breakout.yaml (eval.tasks="
            f"{cfg.eval.tasks}, {cfg.eval.episodes} episodes, every {every} steps and at switches)"
        )
        results = []
        original = Evaluator.evaluate

        def recorded(self: Evaluator, *args, **kwargs):
            results.append(original(self, *args, **kwargs))
            return results[-1]

        Evaluator.evaluate = recorded  # type: ignore[method-assign]
        spent = clock_cpu([(Evaluator, ["evaluate"])])
        wall, cpu = time.perf_counter(), time.process_time()
        with contextlib.redirect_stdout(io.StringIO()):  # SB3's stdout table
            train(cfg, progress_bar=False)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        rest = cpu - spent[0]
        played = sum(sum(r.lengths) for r in results)
        print(f"  train(): wall {wall:.1f} s, CPU {cpu:.1f} s (steps/s of CPU: {steps / rest:.0f} without evaluation)")
        print(
            f"  inside evaluation: CPU {spent[0]:.2f} s over {len(results)} task evaluations, {played} env steps "
            f"(mean episode {played / max(1, sum(len(r.lengths) for r in results)):.0f} steps; "
            f"{spent[0] / max(played, 1) * 1e6:.0f} us of CPU per evaluation step)"
        )
        print(f"  evaluation / rest of training (CPU): {spent[0] / rest:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20_000, help="total_steps of the part-2 run")
    args = parser.parse_args()
    th.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    probe_set_costs()
    eval_share(args.steps)


if __name__ == "__main__":
    main()
