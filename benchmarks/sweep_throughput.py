"""Sweep throughput: 4 tiny trials on Ray with 2 workers against the same 4 run one after another.

What it measures: the wall time of ``rlp sweep``'s driver (:func:`rl_plasticity.sweep.run_sweep`) over
4 trials (``interventions=[[],[l2]]`` x seeds 0-1 on ``configs/dqn_cartpole_shift.yaml``, monitor on,
``env.switch_every`` steps per task, one torch thread each), once with ``--sequential`` and once on a
local Ray with 2 CPUs and 1 CPU per trial. Both run the very same trial code (``rlp train`` in a
subprocess), in fresh sweep directories, so the ratio is what Ray's parallelism buys net of its own
costs. The Ray time includes starting and stopping the local Ray (a few seconds), as a user sees it.

How to read it: throughput = trials per second; the verdict is Ray's throughput over the sequential
one, which should be >= 1.7 on 2 cores (the ideal is 2; start-up, Ray's own processes and two trials
sharing caches and memory bandwidth take the rest). The per-trial times show the sharing: a trial
next to another one is slower than alone. Another process busy on the machine lowers the figure (the
load average is printed at the start).

Measured here (2 cores, quiet machine): one after another 178.7 s, Ray with 2 workers 92.4 s: 1.93x.

    .venv/bin/python benchmarks/sweep_throughput.py                      # ~45 s trials: ~5 minutes
    .venv/bin/python benchmarks/sweep_throughput.py --switch-every 1000  # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from rl_plasticity.sweep import build_plan, parse_seeds, run_sweep
from rl_plasticity.sweep.plan import SweepPlan

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "dqn_cartpole_shift.yaml"
ARMS = Path(__file__).resolve().parents[1] / "configs" / "arms.yaml"
TARGET = 1.7


def plan(sweep_dir: Path, switch_every: int) -> SweepPlan:
    """The 4 trials, in ``sweep_dir``."""
    overrides = [
        f"env.switch_every={switch_every}",
        "monitor.probe_every=500",
        "monitor.switch_probes=[]",
        "checkpoint.replay_buffer=false",
    ]
    return build_plan(
        CONFIG, overrides, ["interventions=[[],[l2]]"], [], ARMS, False, parse_seeds("0-1"), sweep_dir, cpus_per_trial=1
    )


def timed(label: str, sweep_dir: Path, switch_every: int, **kwargs: object) -> tuple[float, list[float]]:
    """Wall time of one run of the sweep, and each trial's own time."""
    lines: list[str] = []
    p = plan(sweep_dir, switch_every)
    start = time.perf_counter()
    summary = run_sweep(p, ["benchmark"], echo=lines.append, **kwargs)  # type: ignore[arg-type]
    wall = time.perf_counter() - start
    if summary.failed or len(summary.finished) != len(p.trials):
        raise SystemExit(f"{label}: not every trial finished:\n" + "\n".join(lines))
    trials = json.loads((sweep_dir / "sweep.json").read_text())["trials"].values()
    seconds = [float(t["seconds"]) for t in trials]
    print(
        f"{label:<22} wall {wall:6.1f} s   {len(seconds) / wall:.4f} trials/s   per trial "
        + " ".join(f"{s:.1f}" for s in seconds)
        + " s"
    )
    return wall, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--switch-every",
        type=int,
        default=6_000,
        help="env steps per task (3 tasks per trial); 6000 gives ~45 s trials here",
    )
    args = parser.parse_args()

    print(
        f"{os.cpu_count()} CPUs, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
        f"4 trials of {3 * args.switch_every} env steps ({CONFIG.name}, monitor on, 1 thread each)"
    )
    with tempfile.TemporaryDirectory(prefix="sweep_bench_") as tmp:
        seq_wall, seq_trials = timed("one after another", Path(tmp) / "sequential", args.switch_every, sequential=True)
        ray_wall, ray_trials = timed("Ray, 2 workers", Path(tmp) / "ray", args.switch_every, num_cpus=2)
    ratio = seq_wall / ray_wall
    print(
        f"median trial: alone {statistics.median(seq_trials):.1f} s, side by side {statistics.median(ray_trials):.1f} s"
    )
    print(
        f"throughput ratio (Ray, 2 workers / one after another): {ratio:.2f}x "
        f"(target >= {TARGET}x: {'met' if ratio >= TARGET else 'NOT met'})"
    )


if __name__ == "__main__":
    main()
