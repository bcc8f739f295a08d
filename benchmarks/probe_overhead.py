"""Cost of the plasticity monitor: DQN time with the default monitor on and off, and each probe's cost.

Part 1, overhead. What it measures: wall time, and CPU time of this process, of ``agent.learn(steps)`` only
(building the env, the agent and the logger is outside the timed region) for DQN on continual MinAtar, built
as ``rlp train`` builds it: ``configs/dqn_minatar_cycle.yaml`` (Double DQN, one update of batch 32 per env
step, the MinAtar network of width 128, sticky actions) through ``validate_config``, ``runner.build_env`` and
``runner.build_agent``, on the CPU, with a 50k buffer, ``learning_starts`` 500 (and no random steps per task, so
updates run from there), and ``env.switch_every = steps``
so that every timed window ends on exactly one task switch (and the end-of-training round, which runs only for
a visit cut short, does not run). Every arm gets the same SB3 TensorBoard logger and the ``TaskLogCallback`` of
``rlp train``; the arms differ only in the monitor:

- ``off``: no monitor;
- ``on``: the default ``monitor:`` section (a probe round every ``monitor.probe_every`` gradient steps on the fixed
probe
  set and on the training batch; at the switch the heavy probes, Hessian order 100, Gram of 256 and
  trainability of 200 steps, on the finished task's 1024-sample random-policy probe set, built when the task
  is first probed);
- ``on-noswitch``: the default monitor with ``monitor.switch_probes=[]``.

The monitor draws no training random numbers, so all arms do the same work (same episodes, same updates).
One short untimed warm-up of each arm, then ``--rounds`` rounds of one run per arm, the order reversed every
round. In a real run the switch comes every ``env.switch_every`` steps (100k by default, 2M in the preset),
so the heavy probes are amortised over far more steps than in this window.

Part 2, per-probe cost. For each feature width (128, 512, 2048) and batch size (32, 256, 1024) it builds a PlasticDQN
with that width, fills an SB3 ``ReplayBufferSamples`` with random MinAtar-shaped
data, and times each probe called exactly as ``rl_plasticity.probing.probe_batch`` calls it, plus
``probe_batch`` itself for a light and a heavy round, in CPU time (median of a few calls after a warm-up; a
call over 1 s is timed once, cold). With the default single torch thread CPU time is what the wall time
would be on an idle machine, and it barely moves when other processes share the cores.

How to read it: in part 1 the per-round lines show the noise; the verdict is the ratio of the medians,
target < 1.05. ``on-noswitch / off`` is the steady-state cost of the probe rounds; ``on / off`` adds one heavy
switch round per window (a switch every ``steps`` steps, far more often than the default ``env.switch_every``);
the estimate at ``env.switch_every=100000`` spreads the measured switch cost over a default-length task. Wall
and CPU ratios agree on an idle machine; when they do not (the script warns if the load average exceeds the
cores), other processes were competing for the cores and the CPU ratios are the fair comparison. The last
line accounts for the monitor directly: the CPU time spent inside its own code (callback hooks and the
in-``train()`` observer) over the rest of ``learn()``. The monitor changes nothing in training, so that is its
whole cost, and it is far less sensitive to other load than a difference of two separate runs. In part 2 a
probe round in training costs about the probe-set column (1024) plus the batch column (32) of the light round,
plus the heavy probes at 1024 at a switch.

    .venv/bin/python benchmarks/probe_overhead.py            # defaults: 5 rounds x 3000 steps, then the table
    .venv/bin/python benchmarks/probe_overhead.py --quick    # smoke run, under a minute
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch as th
import yaml
from _timing import clock_cpu  # benchmarks/ is on sys.path when a script here runs
from stable_baselines3.common.buffers import ReplayBufferSamples
from stable_baselines3.common.logger import configure

from rl_plasticity.catalog import registries
from rl_plasticity.config import CONFIGS_DIR, RunConfig, validate_config
from rl_plasticity.monitor import MonitorCallback, MonitorSettings
from rl_plasticity.probes import (
    active_fraction,
    approx_rank,
    dormant_fraction,
    effective_rank,
    epsilon_rank,
    grad_stats,
    gram_spectrum,
    hessian_spectrum,
    kfac_factors,
    kfac_spectrum,
    lyle_feature_rank,
    mean_active_fraction,
    neural_collapse,
    singular_values,
    snapshot,
    srank,
    trainability,
    update_stats,
    weight_stats,
)
from rl_plasticity.probing import _gram_inputs, greedy_labels, probe_batch
from rl_plasticity.recording import activation_outputs
from rl_plasticity.runner import build_agent, build_env, flat_hparams, settings_from
from rl_plasticity.task_envs import TaskEnvs
from rl_plasticity.task_logging import TaskLogCallback

PRESET = CONFIGS_DIR / "dqn_minatar_cycle.yaml"
TARGET_RATIO = 1.05
DEFAULT_SWITCH_EVERY = 100_000  # env.switch_every's default (EnvConfig)
ARMS = ("off", "on", "on-noswitch")
SLOW_S = 1.0  # a probe call slower than this is timed once (cold), not repeated


# -- part 1: monitor on/off ---------------------------------------------------------------------------


def run_config(arm: str, switch_every: int, learning_starts: int, threads: int, width: int = 128) -> RunConfig:
    """The preset with a 50k buffer, an early start, the given switch period and width, and the arm's monitor."""
    data: dict[str, Any] = yaml.safe_load(PRESET.read_text())
    data.update(device="cpu", threads=threads, total_steps=None)
    data["agent"].update(buffer_size=50_000, learning_starts=learning_starts, random_steps_per_task=0)
    data["env"]["switch_every"] = switch_every
    data["net"]["width"] = width
    data["logging"] = dict(progress_bar=False, save_model=False)
    data["monitor"] = {"off": dict(enabled=False), "on": {}, "on-noswitch": dict(switch_probes=[])}[arm]
    return validate_config(data, registries=registries())


def _clock_monitor(monitor: MonitorCallback) -> list[float]:
    """CPU seconds spent inside every entry point of ``monitor`` (its callback hooks and its in-``train()``
    observer), adding up in the returned one-element list."""
    return clock_cpu(
        [
            (monitor, ("_init_callback", "_on_step", "_on_rollout_end", "_on_training_end")),
            (monitor._observer, ("loss_terms", "on_update")),
        ]
    )


def timed_run(arm: str, steps: int, learning_starts: int, threads: int) -> tuple[float, float, float]:
    """(wall, CPU, monitor CPU) seconds of ``learn(steps)`` on a fresh env and agent, the last one spent inside
    the monitor's own code; checks the window ended on a switch."""
    cfg = run_config(arm, switch_every=steps, learning_starts=learning_starts, threads=threads)
    env = build_env(cfg)
    task_names = env.get_attr("task_names")[0]
    agent = build_agent(cfg, env)
    with tempfile.TemporaryDirectory() as tmp:
        agent.set_logger(configure(tmp, ["tensorboard"]))
        callbacks: list[Any] = [TaskLogCallback(flat_hparams(cfg), task_names)]
        spent = [0.0]
        if cfg.monitor.enabled:
            monitor = MonitorCallback(settings_from(cfg.monitor, MonitorSettings), Path(tmp), TaskEnvs.from_config(cfg))
            spent = _clock_monitor(monitor)
            callbacks.append(monitor)
        gc.collect()
        wall, cpu = time.perf_counter(), time.process_time()
        agent.learn(total_timesteps=steps, callback=callbacks, progress_bar=False)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        agent.logger.close()
    task = env.get_attr("current_task_id")[0]
    env.close()
    if task == 0:
        raise RuntimeError("no task switch happened inside the timed window")
    return wall, cpu, spent[0]


def load_note(loads: list[float]) -> str:
    """The 1-minute load averages seen, and a warning when other processes competed for the cores."""
    cores = os.cpu_count() or 1
    note = f"load average (1 min) during the rounds: {min(loads):.1f}-{max(loads):.1f} on {cores} cores"
    if max(loads) > cores - 0.5:  # our own run accounts for ~1
        note += "; WARNING: other processes shared the cores: wall times are inflated and noisy, trust the cpu ratios"
    return note


def overhead(steps: int, rounds: int, learning_starts: int, threads: int, warm_up: bool) -> None:
    print(
        f"== part 1: DQN on continual_minatar ({PRESET.name}, width 128, batch 32, train_freq 1, buffer 50k), "
        f"{rounds} rounds x {steps} steps per arm, learning_starts={learning_starts}, env.switch_every={steps} "
        f"(one switch, at the last step of each window), torch threads={th.get_num_threads()}, device=cpu"
    )
    every = run_config("on", steps, learning_starts, threads).monitor.probe_every
    print(
        f"monitor on: {(steps - learning_starts) // every} probe rounds (every {every} gradient steps) + 1 round at "
        "the switch (with the heavy probes in arm 'on', without them in 'on-noswitch'); times are seconds of "
        "learn(): wall, and cpu = CPU time of this process (the fair measure when the machine is shared)"
    )
    if warm_up:  # first-use costs (imports, allocator, MinAtar init, probe code paths) land outside the rounds
        for arm in ARMS:
            timed_run(arm, learning_starts + 300, learning_starts, threads)
    wall: dict[str, list[float]] = {arm: [] for arm in ARMS}
    cpu: dict[str, list[float]] = {arm: [] for arm in ARMS}
    inside: dict[str, list[float]] = {arm: [] for arm in ARMS}
    loads = [os.getloadavg()[0]]
    for r in range(rounds):
        order = ARMS if r % 2 == 0 else ARMS[::-1]
        for arm in order:
            w, c, m = timed_run(arm, steps, learning_starts, threads)
            wall[arm].append(w)
            cpu[arm].append(c)
            inside[arm].append(m)
        loads.append(os.getloadavg()[0])
        print(f"round {r + 1}: " + "  ".join(f"{arm} {wall[arm][-1]:6.2f} (cpu {cpu[arm][-1]:6.2f})" for arm in order))
    print(load_note(loads))

    def verdict(ratio: float) -> str:
        return "OK" if ratio < TARGET_RATIO else "ABOVE"

    results = {}
    for kind, times in (("wall", wall), ("cpu", cpu)):
        med = {arm: statistics.median(values) for arm, values in times.items()}
        # Paired within each round (the two runs are adjacent in time): less noisy than a difference of medians.
        switch_s = statistics.median(on - no for on, no in zip(times["on"], times["on-noswitch"]))
        light = med["on-noswitch"] / med["off"]
        # A default-length task: the per-step cost of the rounds carries over, the switch is paid once per task.
        task_s = med["off"] / steps * DEFAULT_SWITCH_EVERY
        results[kind] = dict(
            light=light, window=med["on"] / med["off"], switch=switch_s, task=task_s, estimate=light + switch_s / task_s
        )
        print(
            f"median {kind} s: "
            + "  ".join(f"{arm} {value:.2f}" for arm, value in med.items())
            + f"  (off: {steps / med['off']:.0f} steps/s)"
        )
    w, c = results["wall"], results["cpu"]
    print(f"target: ratio < {TARGET_RATIO}")
    print(
        f"ratio on-noswitch/off (probe rounds only, monitor.switch_probes=[]): wall {w['light']:.3f} "
        f"{verdict(w['light'])}, cpu {c['light']:.3f} {verdict(c['light'])}"
    )
    print(
        f"ratio on/off (this window: 1 switch per {steps} steps, {DEFAULT_SWITCH_EVERY // steps}x the default rate; "
        f"information): wall {w['window']:.3f}, cpu {c['window']:.3f}"
    )
    print(
        f"switch probes: wall {w['switch']:.2f} s, cpu {c['switch']:.2f} s per switch "
        "(median over rounds of on - on-noswitch)"
    )
    print(
        f"estimated ratio on/off at env.switch_every={DEFAULT_SWITCH_EVERY} (the default; one switch per "
        f"{w['task']:.0f} s wall, {c['task']:.0f} s cpu of training): wall {w['estimate']:.3f} "
        f"{verdict(w['estimate'])}, cpu {c['estimate']:.3f} {verdict(c['estimate'])}"
    )
    # The monitor changes nothing in training, so its whole cost is the time spent inside its own code: a
    # measure that other processes on the machine barely disturb, unlike a difference of two noisy runs.
    own = {arm: statistics.median(m / (t - m) for m, t in zip(inside[arm], cpu[arm])) for arm in ("on", "on-noswitch")}
    switch_cpu = statistics.median(a - b for a, b in zip(inside["on"], inside["on-noswitch"]))
    accounted = 1 + own["on-noswitch"] + switch_cpu / c["task"]
    print(
        f"cpu inside the monitor's code: {statistics.median(inside['on-noswitch']):.2f} s per window without "
        f"switch probes, {switch_cpu:.2f} s per switch; ratio (learn cpu) / (learn cpu - monitor cpu): "
        f"on-noswitch {1 + own['on-noswitch']:.3f} {verdict(1 + own['on-noswitch'])}, "
        f"estimate at env.switch_every={DEFAULT_SWITCH_EVERY} {accounted:.3f} {verdict(accounted)}"
    )


# -- part 2: per-probe cost ---------------------------------------------------------------------------------


def random_batch(n: int, seed: int = 0) -> ReplayBufferSamples:
    """``n`` random MinAtar-shaped transitions as the replay buffer returns them (binary uint8 planes)."""
    g = th.Generator().manual_seed(seed)
    obs = th.randint(0, 2, (2, n, 10, 10, 10), generator=g, dtype=th.uint8)
    return ReplayBufferSamples(
        observations=obs[0],
        actions=th.randint(0, 6, (n, 1), generator=g),
        next_observations=obs[1],
        dones=(th.rand(n, 1, generator=g) < 0.05).float(),
        rewards=th.randint(0, 2, (n, 1), generator=g).float(),
    )


def probe_calls(
    agent: Any, batch: ReplayBufferSamples, cfg: RunConfig, init: dict[str, th.Tensor]
) -> dict[str, Callable[[], Any]]:
    """Each probe as ``probe_batch`` calls it, as zero-argument callables (the shared forward pass done once)."""
    module, obs, mon = agent.q_net, batch.observations, cfg.monitor

    def forward() -> tuple[th.Tensor, dict[str, th.Tensor], th.Tensor, th.Tensor | None]:
        with th.no_grad(), activation_outputs(module) as acts:
            features = agent.value_features(obs)
            labels, classifier = greedy_labels(agent, obs, features)
        return features, acts, labels, classifier

    features, acts, labels, classifier = forward()
    loss = lambda _m, b: agent.training_loss(b)[0]  # noqa: E731
    settings = mon.model_dump()
    no_kfac = [p for p in mon.probes if p != "kfac"]

    def rank() -> None:
        for fn in (effective_rank, srank, approx_rank, epsilon_rank, lyle_feature_rank, singular_values):
            fn(features)

    def dormant() -> None:
        for h in acts.values():
            dormant_fraction(h, tau=mon.dormant_tau)
            active_fraction(h)
            mean_active_fraction(h)

    def kfac() -> None:
        for a, g in kfac_factors(module, batch, loss).values():
            kfac_spectrum(a, g)

    def updates() -> None:  # the monitor's observer around the step before a round
        update_stats(snapshot(module), snapshot(module))
        grad_stats(module)

    def gram() -> None:
        n = min(mon.gram_size, len(obs))
        small = type(batch)(*(x[:n] if isinstance(x, th.Tensor) else x for x in batch))
        inputs, output_fn, curvature = _gram_inputs(agent, small)
        gram_spectrum(module, inputs, output_fn, loss_curvature=curvature)

    return {
        "forward+labels": forward,
        "rank (5 ranks+hist)": rank,
        "  one svdvals": lambda: singular_values(features),
        "dormant": dormant,
        "neural_collapse": lambda: neural_collapse(features, labels, classifier),
        "kfac": kfac,
        "weight_stats": lambda: weight_stats(module, init),
        "update+grad stats": updates,
        "probe_batch light": lambda: probe_batch(agent, batch, mon.probes, settings),
        "  light w/o kfac": lambda: probe_batch(agent, batch, no_kfac, settings),
        "hessian (100 x 4 vec)": lambda: hessian_spectrum(
            module, lambda: agent.training_loss(batch)[0], order=mon.hessian_order, num_vectors=mon.hessian_vectors
        ),
        "gram (n<=256)": gram,
        "trainability (200)": lambda: trainability(module, obs, steps=mon.trainability_steps, lr=mon.trainability_lr),
        "probe_batch heavy": lambda: probe_batch(agent, batch, [*mon.probes, *mon.switch_probes], settings),
    }


HEAVY = ("hessian (100 x 4 vec)", "gram (n<=256)", "trainability (200)", "probe_batch heavy")


def time_ms(fn: Callable[[], Any], repeats: int) -> tuple[float, bool]:
    """Median CPU ms over ``repeats`` calls after a warm-up call; a first call over ``SLOW_S`` is the only one."""
    start = time.process_time()
    fn()
    first = time.process_time() - start
    if first > SLOW_S or repeats <= 0:
        return first * 1e3, True
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return statistics.median(times) * 1e3, False


def probe_costs(
    widths: tuple[int, ...], batches: tuple[int, ...], light_batches: tuple[int, ...], repeats: int, threads: int
) -> None:
    print(
        f"\n== part 2: cost of each probe in ms of process CPU time (median of {repeats} calls after a warm-up; "
        f"* = one cold call, over {SLOW_S:.0f} s), PlasticDQN MinAtar net, random batches, torch threads="
        f"{th.get_num_threads()} (with one thread, CPU time = wall time on an idle machine)"
    )
    columns = [(w, b) for w in widths for b in sorted(set(batches) | set(light_batches))]
    table: dict[str, dict[tuple[int, int], str]] = {}
    params: dict[int, int] = {}
    for w in widths:
        cfg = run_config("on", switch_every=10_000, learning_starts=0, threads=threads, width=w)
        cfg.agent.buffer_size = 1_000
        env = build_env(cfg)
        agent = build_agent(cfg, env)
        module = agent.q_net
        params[w] = sum(p.numel() for p in module.parameters())
        init = snapshot(module)
        for b in sorted(set(batches) | set(light_batches)):
            batch = random_batch(b)
            module.zero_grad()
            agent.training_loss(batch)[0].backward()  # grads exist, as after a training step
            for name, fn in probe_calls(agent, batch, cfg, init).items():
                if (b not in batches and name in HEAVY) or (b not in light_batches and name not in HEAVY):
                    continue
                # The monitor runs the heavy round on the 1024-sample probe set only: time it there (the largest batch).
                if name == "probe_batch heavy" and b != max(batches):
                    continue
                ms, cold = time_ms(fn, repeats)
                table.setdefault(name, {})[(w, b)] = f"{ms:.1f}{'*' if cold else ' '}"
        env.close()

    head = f"{'probe':<21}" + "".join(f"{f'w{w}/b{b}':>12}" for w, b in columns)
    print(head)
    print("-" * len(head))
    for name, row in table.items():
        print(f"{name:<21}" + "".join(f"{row.get(c, '-'):>12}" for c in columns))
    print("parameters of the Q-network: " + ", ".join(f"w{w}: {n:,}" for w, n in params.items()))
    print(
        "weight_stats and update+grad stats do not depend on the batch; gram uses at most monitor.gram_size=256 "
        "samples; a training probe round = probe_batch light at b1024 (probe set) + at b32 (training batch), "
        "plus weights; a switch adds the heavy probes at b1024"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3_000, help="env steps per timed run (default 3000)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of one run per arm (default 5)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--learning-starts", type=int, default=500, help="default 500")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per probe in part 2 (default 3)")
    parser.add_argument("--widths", type=int, nargs="+", default=[128, 512, 2048], help="part 2 feature widths")
    parser.add_argument("--skip-overhead", action="store_true", help="only the per-probe table")
    parser.add_argument("--skip-table", action="store_true", help="only the on/off overhead")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 2 rounds of 1100 steps, no warm-up; table at width 128, batch 32, 1 call each",
    )
    args = parser.parse_args()
    steps, rounds, learning_starts, repeats = args.steps, args.rounds, args.learning_starts, args.repeats
    widths, batches, light_batches = tuple(args.widths), (32, 256, 1024), (32, 256, 1024)
    if args.quick:
        steps, rounds, learning_starts, repeats = 1_100, 2, 50, 1
        widths, batches, light_batches = (128,), (32,), (32,)
    if steps <= learning_starts:
        parser.error(f"--steps ({steps}) must exceed --learning-starts ({learning_starts})")

    th.set_num_threads(args.threads)
    # Probe rounds dump TensorBoard-only keys; SB3 warns when a dump has nothing for a text format.
    warnings.filterwarnings("ignore", message="Tried to write empty key-value dict")
    start = time.perf_counter()
    if not args.skip_overhead:
        overhead(steps, rounds, learning_starts, args.threads, warm_up=not args.quick)
    if not args.skip_table:
        probe_costs(widths, batches, light_batches, repeats, args.threads)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
