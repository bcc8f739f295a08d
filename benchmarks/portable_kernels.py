"""Which CPU kernel choices change a run's numbers, and what pinning them to portable kernels costs.

A run is bit-reproducible on one machine but not across machines: torch picks its kernels by what the CPU
supports, in three places, each with an environment variable that pins it (read when the library first
runs, so it must be set before the process starts):

- ATen's own kernels (element-wise ops, reductions such as the loss's mean, Adam's ``_foreach`` ops) are
  compiled for several instruction sets and picked at run time: ``ATEN_CPU_CAPABILITY=default|avx2|avx512``
  (``torch.backends.cpu.get_cpu_capability()`` reports the choice);
- matrix products (``nn.Linear``) go to MKL's sgemm, which has a code path per CPU: ``MKL_CBWR`` (MKL's
  Conditional Numerical Reproducibility: ``COMPATIBLE``, ``AVX2``, ``AVX512``, ...);
- convolutions go to oneDNN, which generates code for the CPU it runs on: ``ONEDNN_MAX_CPU_ISA``
  (``SSE41``, ``AVX2``, ``AVX512_CORE``, ...), or ``torch.backends.mkldnn.enabled = False`` (then torch's own
  im2col + MKL gemm).

This machine can stand in for an older one by capping each library below what it has. The script runs the
same short DQN on permuted MinAtar Breakout (the protocol-2 network and update schedule, threads=1, monitor
off) once per setting, each in a fresh process, and prints env steps per CPU second (CPU time of ``learn()``:
on a shared machine the wall clock mostly measures the neighbours) and a digest of the final parameters: two
settings with equal digests ran bit-identical training.

- ``native`` against ``avx2-machine`` (each library capped at AVX2, as on a CPU without AVX-512) shows
  whether kernel choice alone changes the numbers;
- the one-variable rows show which library's choice matters for this network;
- ``portable`` (``cpu_kernels: portable``: ``ATEN_CPU_CAPABILITY=avx2``, ``MKL_CBWR=COMPATIBLE``, oneDNN off)
  takes the choice away from the CPU on any x86-64 CPU with AVX2; ``portable@avx2-machine`` adds the oneDNN cap
  that changed ``native``: with oneDNN off it must not change the digest;
- the speed ratio against ``native`` is the cost.

    .venv/bin/python benchmarks/portable_kernels.py               # 3 rounds x 4000 env steps (about 35 min on a busy
    2-core VM)
    .venv/bin/python benchmarks/portable_kernels.py --quick       # smoke run
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from rl_plasticity.kernels import PORTABLE_ENV

#: Not an environment variable of any library: tells the child to run with ``torch.backends.mkldnn.enabled = False``.
MKLDNN_OFF = "_BENCH_MKLDNN_OFF"
#: An AVX2-only CPU, as far as each library can be capped (MKL ignores any branch but COMPATIBLE on non-Intel CPUs).
AVX2_MACHINE = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
#: ``cpu_kernels: portable`` (:mod:`rl_plasticity.kernels`), as environment variables and the oneDNN switch.
PORTABLE = {**PORTABLE_ENV, MKLDNN_OFF: "1"}
#: Setting name -> environment variables of its process (on top of OMP_NUM_THREADS=1).
SETTINGS: dict[str, dict[str, str]] = {
    "native": {},
    "avx2-machine": AVX2_MACHINE,
    "aten=avx2": {"ATEN_CPU_CAPABILITY": "avx2"},
    "aten=default": {"ATEN_CPU_CAPABILITY": "default"},
    "mkl=COMPATIBLE": {"MKL_CBWR": "COMPATIBLE"},
    "onednn=AVX2": {"ONEDNN_MAX_CPU_ISA": "AVX2"},
    "onednn=SSE41": {"ONEDNN_MAX_CPU_ISA": "SSE41"},
    "mkldnn-off": {MKLDNN_OFF: "1"},
    "portable": PORTABLE,
    "portable@avx2-machine": {**PORTABLE, "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "portable+aten=default": {**PORTABLE, "ATEN_CPU_CAPABILITY": "default"},
}
KNOBS = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA", MKLDNN_OFF)


def child(steps: int) -> None:
    """In the child process: build the run as ``rlp train`` does, time ``learn()``, print JSON."""
    import time

    import torch as th

    from rl_plasticity.catalog import registries
    from rl_plasticity.config import load_config
    from rl_plasticity.runner import build_agent, build_env

    th.set_num_threads(1)
    if os.environ.get(MKLDNN_OFF):
        th.backends.mkldnn.enabled = False
    root = Path(__file__).resolve().parents[1]
    cfg = load_config(
        root / "configs" / "study" / "permuted_breakout.yaml",
        [
            "seed=0",
            "interventions=[]",
            "threads=1",
            "monitor.enabled=false",
            f"total_steps={steps}",
            f"env.switch_every={steps // 2}",
            "agent.learning_starts=500",
        ],
        registries=registries(),
    )
    env = build_env(cfg)
    agent = build_agent(cfg, env)
    start = time.process_time()  # CPU time: other processes on a shared machine slow the wall clock, not this
    agent.learn(total_timesteps=steps)
    seconds = time.process_time() - start
    digest = hashlib.sha256()
    for name, tensor in sorted(agent.policy.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    env.close()
    print(
        json.dumps(
            {
                "steps_per_s": steps / seconds,
                "digest": digest.hexdigest()[:16],
                "capability": th.backends.cpu.get_cpu_capability(),
            }
        )
    )


def run(setting: str, steps: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **SETTINGS[setting])
    for key in KNOBS:
        if key not in SETTINGS[setting]:
            env.pop(key, None)
    out = subprocess.run(
        [sys.executable, __file__, "--child", str(steps)], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated subset of the settings")
    parser.add_argument("--quick", action="store_true", help="1 round x 1000 steps")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child)
        return
    steps, rounds = (1000, 1) if args.quick else (args.steps, args.rounds)
    names = [s for s in args.settings.split(",") if s]
    speeds: dict[str, list[float]] = {name: [] for name in names}
    digests: dict[str, set[str]] = {name: set() for name in names}
    capability: dict[str, str] = {}
    for i in range(rounds):
        for name in names if i % 2 == 0 else names[::-1]:  # alternate the order against drift
            result = run(name, steps)
            speeds[name].append(result["steps_per_s"])
            digests[name].add(result["digest"])
            capability[name] = result["capability"]
            print(f"round {i + 1} {name:<24} {result['steps_per_s']:7.1f} steps/s  {result['digest']}", flush=True)
    base = statistics.median(speeds["native"]) if "native" in speeds else None
    print(f"\n{steps} env steps of DQN on permuted MinAtar Breakout, threads=1, median of {rounds} rounds")
    print(f"{'setting':<24} {'ATen':<8} {'steps/s':>8} {'vs native':>10}  params digest   (steps per CPU second)")
    for name in names:
        median = statistics.median(speeds[name])
        ratio = f"{median / base:.2f}" if base else "-"
        shown = ",".join(sorted(digests[name]))  # more than one: not reproducible even in one setting
        print(f"{name:<24} {capability[name]:<8} {median:8.1f} {ratio:>10}  {shown}")


if __name__ == "__main__":
    main()
