"""CPU kernel choice: ``cpu_kernels: native`` (the libraries pick for this CPU) or ``portable`` (pinned).

torch computes on the CPU through three libraries, each of which picks its kernels by the CPU it runs on,
and kernels for different instruction sets add in a different order, so the same run on two machines drifts
apart from the first update (``benchmarks/portable_kernels.py`` shows it on one machine by capping each
library's instruction set):

- ATen's own kernels (element-wise ops, reductions, Adam's ``_foreach`` ops) are built for several
  instruction sets; ``ATEN_CPU_CAPABILITY`` picks one (``torch.backends.cpu.get_cpu_capability()``);
- matrix products (``nn.Linear``) go to MKL, whose code path depends on the CPU's vendor and instruction set;
  ``MKL_CBWR=COMPATIBLE`` (MKL's Conditional Numerical Reproducibility) forces one SSE2 path on every Intel and
  compatible CPU (the other branch names are Intel-only, ignored elsewhere);
- convolutions go to oneDNN, which generates code for the CPU (and its caches) it runs on; with
  ``torch.backends.mkldnn.enabled = False`` torch computes them itself.

``portable`` pins all three: ATen's AVX2 kernels, MKL's COMPATIBLE branch, no oneDNN. So any x86-64 CPU with
AVX2 runs the same kernels, given the same torch build and thread count (``threads`` must be set). That this
gives bit-identical runs on two different CPUs follows from the libraries' documentation; it was measured
on one machine only. ``native`` changes nothing: SB3's and torch's defaults.

The environment variables are read when each library first runs, so they must be set before torch computes
anything: ``rlp train`` sets them (:func:`export_env`) before it imports torch, and the runner checks
(:func:`check`) that they took effect.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


class KernelError(ValueError):
    """A ``portable`` run whose pins did not take effect: one line naming ``cpu_kernels`` and what is valid
    (``rlp train`` exits 2 with it, as for a bad config key)."""


#: Environment variables of ``portable`` (read by ATen and MKL when they first run).
PORTABLE_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "COMPATIBLE"}
#: What ``torch.backends.cpu.get_cpu_capability()`` reports when the ATen pin took effect.
PORTABLE_CAPABILITY = "AVX2"


def export_env(choice: str) -> None:
    """Set the environment variables of ``choice`` (``portable``) in this process, before torch is imported."""
    if choice == "portable":
        os.environ.update(PORTABLE_ENV)


def check(choice: str) -> None:
    """Refuse a ``portable`` run whose pins did not take effect (before anything is written).

    :raises KernelError: an environment variable is missing or different (torch was imported before
        :func:`export_env`, e.g. training from Python), or this CPU cannot run ATen's AVX2 kernels.
    """
    if choice != "portable":
        return
    import torch as th

    wrong = {key: os.environ.get(key) for key, value in PORTABLE_ENV.items() if os.environ.get(key) != value}
    if wrong:
        needed = " ".join(f"{key}={value}" for key, value in PORTABLE_ENV.items())
        raise KernelError(
            f"cpu_kernels: 'portable' needs {needed} in the environment before torch starts (rlp train "
            f"sets them; from Python, export them before importing torch); got {wrong}"
        )
    capability = th.backends.cpu.get_cpu_capability()
    if capability != PORTABLE_CAPABILITY:
        raise KernelError(
            f"cpu_kernels: 'portable' runs ATen's AVX2 kernels, but torch runs {capability} kernels here "
            "(a CPU without AVX2, or torch computed before the pin was set); valid here: native"
        )


@contextlib.contextmanager
def kernels(choice: str) -> Iterator[None]:
    """Within the block, convolutions skip oneDNN for ``portable`` (restored afterwards; ``native``: nothing)."""
    if choice != "portable":
        yield
        return
    import torch as th

    before = th.backends.mkldnn.enabled  # only this flag: mkldnn.flags() would reset its other settings too
    th.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        th.backends.mkldnn.enabled = before
