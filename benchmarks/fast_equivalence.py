"""Whole runs on the stock and the fast DQN path learn the same: final greedy evaluation returns with 95% CIs.

What it runs: a study preset (default ``configs/study/permuted_breakout.yaml``: permuted Breakout, Double DQN,
one update every 4 env steps) for ``--steps`` env steps with ``agent.fast=false`` and ``agent.fast=true``,
``--seeds`` seeds each, the monitor and checkpoints off (they do not change what is learned), the preset's
``eval:`` section on (the project's greedy evaluation, :class:`rl_plasticity.evaluation.EvalCallback`: seeded
evaluation episodes on separate env copies, every ``eval.every`` steps and at the end of training). Agents and
environments are built by the runner from the config (``rl_plasticity.runner.build_env`` / ``build_agent``).

What it reports: each run's *final evaluation return*, the mean return of the ``eval.episodes`` greedy
evaluation episodes (``eval.epsilon``) of the last evaluation round, the one at the end of training, on the
task trained last (for information also the mean over every task that round evaluated, with ``eval.tasks:
all``); then for each path the mean over seeds with a 95% Student-t interval (with two seeds or more), and
whether each path's mean lies inside the other's interval. The same seed draws the same batches and epsilon
decisions on both paths, and the evaluation plays the same seeded episodes; the paths' float rounding
differs, so the runs drift apart after a while and the comparison is statistical. ``--csv`` writes the
per-run values.

    .venv/bin/python benchmarks/fast_equivalence.py                          # 3 seeds x 100k steps x 2 paths
    .venv/bin/python benchmarks/fast_equivalence.py --steps 4000 --seeds 0   # a smoke run (no interval)
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch as th
from scipy import stats
from stable_baselines3.common.callbacks import BaseCallback

from rl_plasticity.catalog import registries
from rl_plasticity.config import CONFIGS_DIR, load_config
from rl_plasticity.evaluation import EvalCallback, EvalSettings
from rl_plasticity.runner import build_agent, build_env, settings_from
from rl_plasticity.task_envs import TaskEnvs


class LastTask(BaseCallback):
    """Keeps the task id of the latest env step (``info["task_id"]`` of the task sequence)."""

    def __init__(self) -> None:
        super().__init__()
        self.task_id: int | None = None

    def _on_step(self) -> bool:
        self.task_id = int(self.locals["infos"][0]["task_id"])
        return True


@dataclass(frozen=True)
class RunResult:
    """One run: the final evaluation return on the last task, its mean over every evaluated task, wall seconds."""

    final: float
    all_tasks: float
    seconds: float


def run(preset: Path, seed: int, steps: int, fast: bool) -> RunResult:
    """One run of ``preset`` on one path, with the preset's evaluation."""
    cfg = load_config(
        preset,
        [
            f"seed={seed}",
            f"total_steps={steps}",
            f"agent.fast={str(fast).lower()}",
            "monitor.enabled=false",
            "checkpoint.every=null",
            "eval.enabled=true",
        ],
        registries=registries(),
    )
    env = build_env(cfg)
    agent = build_agent(cfg, env)
    evaluation = EvalCallback(settings_from(cfg.eval, EvalSettings), TaskEnvs.from_config(cfg), cfg.env.switch_every)
    last_task = LastTask()
    start = time.perf_counter()
    agent.learn(total_timesteps=steps, callback=[last_task, evaluation], progress_bar=False)
    elapsed = time.perf_counter() - start
    env.close()
    # The last round is the one at the end of training (at the final step's switch, if it ends a visit).
    assert evaluation.last_step == steps and last_task.task_id is not None, "no evaluation at the end of training"
    final = evaluation.latest[last_task.task_id].mean
    return RunResult(final, statistics.fmean(r.mean for r in evaluation.latest.values()), elapsed)


def interval(values: list[float]) -> tuple[float, float, float]:
    """Mean and 95% Student-t interval (``nan`` bounds for fewer than two values)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, float("nan"), float("nan")
    half = stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / len(values) ** 0.5
    return mean, mean - half, mean + half


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--preset", type=Path, default=CONFIGS_DIR / "study" / "permuted_breakout.yaml")
    parser.add_argument("--steps", type=int, default=100_000, help="env steps per run (default 100000)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="default 0 1 2")
    parser.add_argument("--csv", type=Path, help="write seed, path, final evaluation return and seconds per run here")
    args = parser.parse_args()

    th.set_num_threads(1)
    rows: list[tuple[int, str, RunResult]] = []
    for seed in args.seeds:
        for fast in (False, True):  # the two paths of one seed back to back: machine drift hits both
            result = run(args.preset, seed, args.steps, fast)
            rows.append((seed, "fast" if fast else "stock", result))
            print(
                f"seed {seed} {rows[-1][1]:5s}: final evaluation return {result.final:7.3f} (all tasks "
                f"{result.all_tasks:7.3f})  ({result.seconds:.0f} s)",
                flush=True,
            )
    if args.csv:
        with args.csv.open("w", newline="") as f:
            csv.writer(f).writerows(
                [("seed", "path", "final_eval_return", "final_eval_return_all_tasks", "seconds")]
                + [(seed, path, r.final, r.all_tasks, round(r.seconds, 1)) for seed, path, r in rows]
            )

    summary = {path: interval([r.final for _, p, r in rows if p == path]) for path in ("stock", "fast")}
    print(
        f"\n{args.preset.name}, {args.steps} steps, seeds {args.seeds}; final evaluation return = mean greedy return "
        "of the last evaluation round (end of training) on the task trained last"
    )
    print("| path | final evaluation return (mean) | 95% CI | mean wall s/run |\n|---|---|---|---|")
    for path, (mean, low, high) in summary.items():
        seconds = statistics.fmean([r.seconds for _, p, r in rows if p == path])
        print(f"| {path} | {mean:.3f} | [{low:.3f}, {high:.3f}] | {seconds:.0f} |")
    if len(args.seeds) < 2:
        print("each mean inside the other's 95% CI: n/a (one seed)")
        return
    (ms, ls, hs), (mf, lf, hf) = summary["stock"], summary["fast"]
    inside = ls <= mf <= hs and lf <= ms <= hf
    print(f"each mean inside the other's 95% CI: {'yes' if inside else 'NO'}")


if __name__ == "__main__":
    main()
