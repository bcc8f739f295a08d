"""Whole runs on the stock and the fast DQN path learn the same: final returns of each path with 95% CIs.

What it runs: a study preset (default ``configs/study/permuted_breakout.yaml``: permuted Breakout, Double DQN,
one update every 4 env steps) for ``--steps`` env steps with ``agent.fast=false`` and ``agent.fast=true``,
``--seeds`` seeds each, the monitor and checkpoints off (they do not change what is learned). Agents and
environments are built by the runner from the config (``rl_plasticity.runner.build_env`` / ``build_agent``).

What it reports: each run's *final return*, the mean training return of the episodes that end in the last
``--tail`` fraction of the steps (10% by default; no greedy evaluation is used), then for each path the mean
over seeds with a 95% Student-t interval, and whether each path's mean lies inside the other's interval. The
same seed draws the same batches and epsilon decisions on both paths; their float rounding differs, so the
runs drift apart after a while and the comparison is statistical. ``--csv`` writes the per-run values.

    .venv/bin/python benchmarks/fast_equivalence.py                           # 3 seeds x 100k steps x 2 paths
    .venv/bin/python benchmarks/fast_equivalence.py --steps 20000 --seeds 0 1  # shorter
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from pathlib import Path

import torch as th
from scipy import stats
from stable_baselines3.common.callbacks import BaseCallback

from rl_plasticity.config import CONFIGS_DIR, load_config
from rl_plasticity.runner import build_agent, build_env


class EpisodeReturns(BaseCallback):
    """Keeps ``(num_timesteps, return)`` of every finished episode (from SB3's ``Monitor`` wrapper infos)."""

    def __init__(self) -> None:
        super().__init__()
        self.episodes: list[tuple[int, float]] = []

    def _on_step(self) -> bool:
        for info in self.locals["infos"]:
            if "episode" in info:
                self.episodes.append((self.num_timesteps, float(info["episode"]["r"])))
        return True


def final_return(episodes: list[tuple[int, float]], steps: int, tail: float) -> float:
    """Mean return of the episodes that end after step ``(1 - tail) * steps``."""
    start = (1 - tail) * steps
    returns = [r for step, r in episodes if step > start]
    if not returns:
        raise RuntimeError(f"no episode ended in the last {tail:.0%} of {steps} steps")
    return statistics.fmean(returns)


def run(preset: Path, seed: int, steps: int, fast: bool, tail: float) -> tuple[float, float]:
    """(final return, wall seconds) of one run of ``preset`` on one path."""
    cfg = load_config(
        preset,
        [
            f"seed={seed}",
            f"total_steps={steps}",
            f"agent.fast={str(fast).lower()}",
            "monitor.enabled=false",
            "checkpoint.every=null",
        ],
    )
    env = build_env(cfg)
    agent = build_agent(cfg, env)
    returns = EpisodeReturns()
    start = time.perf_counter()
    agent.learn(total_timesteps=steps, callback=returns, progress_bar=False)
    elapsed = time.perf_counter() - start
    env.close()
    return final_return(returns.episodes, steps, tail), elapsed


def interval(values: list[float]) -> tuple[float, float, float]:
    """Mean and 95% Student-t interval (needs two values or more)."""
    mean = statistics.fmean(values)
    half = stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / len(values) ** 0.5
    return mean, mean - half, mean + half


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--preset", type=Path, default=CONFIGS_DIR / "study" / "permuted_breakout.yaml")
    parser.add_argument("--steps", type=int, default=100_000, help="env steps per run (default 100000)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="default 0 1 2")
    parser.add_argument("--tail", type=float, default=0.1, help="fraction of steps for the final return (0.1)")
    parser.add_argument("--csv", type=Path, help="write seed, path, final return and seconds per run here")
    args = parser.parse_args()
    if len(args.seeds) < 2:
        parser.error("--seeds needs two seeds or more for a confidence interval")

    th.set_num_threads(1)
    rows: list[tuple[int, str, float, float]] = []
    for seed in args.seeds:
        for fast in (False, True):  # the two paths of one seed back to back: machine drift hits both
            value, seconds = run(args.preset, seed, args.steps, fast, args.tail)
            rows.append((seed, "fast" if fast else "stock", value, seconds))
            print(f"seed {seed} {rows[-1][1]:5s}: final return {value:7.3f}  ({seconds:.0f} s)", flush=True)
    if args.csv:
        with args.csv.open("w", newline="") as f:
            csv.writer(f).writerows([("seed", "path", "final_return", "seconds"), *rows])

    summary = {path: interval([v for _, p, v, _ in rows if p == path]) for path in ("stock", "fast")}
    print(
        f"\n{args.preset.name}, {args.steps} steps, seeds {args.seeds}, final return = mean training return "
        f"of the last {args.tail:.0%} of steps"
    )
    print("| path | final return (mean) | 95% CI | mean wall s/run |\n|---|---|---|---|")
    for path, (mean, low, high) in summary.items():
        seconds = statistics.fmean([s for _, p, _, s in rows if p == path])
        print(f"| {path} | {mean:.3f} | [{low:.3f}, {high:.3f}] | {seconds:.0f} |")
    (ms, ls, hs), (mf, lf, hf) = summary["stock"], summary["fast"]
    inside = ls <= mf <= hs and lf <= ms <= hf
    print(f"each mean inside the other's 95% CI: {'yes' if inside else 'NO'}")


if __name__ == "__main__":
    main()
