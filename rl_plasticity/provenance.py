"""Provenance of a run: which code, libraries, CPU and command produced it (``provenance.json``).

A run is bit-reproducible on one machine, but not across machines: torch, MKL and oneDNN pick their
kernels by what the CPU supports, and kernels for different instruction sets round differently. So each
process that trains a run (the first ``rlp train`` and every ``--resume``) appends one *session* to the run
directory's ``provenance.json``::

    {"format": 1, "sessions": [{"kind": "train", ...}, {"kind": "resume", "resumed_at": 40000, ...}]}

Each session holds the project's git commit and whether its tree was dirty (``"unknown"`` outside a git
checkout, e.g. an installed copy), the versions of Python and the numerical libraries, torch's threads,
kernel choice (``torch.backends.cpu.get_cpu_capability()``, the run's ``cpu_kernels``) and build
(``torch.__config__``), numpy's BLAS and SIMD, the CPU model, platform and host, the environment variables
that steer kernel choice and threads, and the exact command line.

The file is written next to ``config.yaml`` and read by ``rlp report``, which lists the commits and
machines of the runs it aggregates (:mod:`rl_plasticity.report.provenance`). Reading it
(:func:`read_sessions`) imports no torch.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib.metadata
import json
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from rl_plasticity.layout import PROVENANCE_FILE

FORMAT = 1
UNKNOWN = "unknown"
#: Distributions (as ``importlib.metadata`` names them) whose versions decide a run's numbers.
PACKAGES = ("torch", "stable-baselines3", "gymnasium", "MinAtar", "numpy", "rl-plasticity")
#: Environment variables that change kernel choice or threading, recorded when set.
KERNEL_ENV_VARS = (
    "ATEN_CPU_CAPABILITY",
    "MKL_CBWR",
    "ONEDNN_MAX_CPU_ISA",
    "DNNL_MAX_CPU_ISA",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "NPY_DISABLE_CPU_FEATURES",
    "CUBLAS_WORKSPACE_CONFIG",
    "PYTHONHASHSEED",
)
#: ``/proc/cpuinfo`` flags of the instruction sets ATen, MKL and oneDNN choose kernels by.
ISA_FLAGS = (
    "sse4_1",
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512dq",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
    "asimd",
    "sve",
)
#: The project's source root (the folder holding ``rl_plasticity/``; a git checkout when run from one).
PROJECT_ROOT = Path(__file__).resolve().parents[1]
_GIT_TIMEOUT_S = 10.0


def git_state(root: Path = PROJECT_ROOT) -> dict[str, Any]:
    """The commit of the git checkout at ``root`` and whether its tracked files differ from it.

    :return: ``{"commit": sha or "unknown", "dirty": bool or "unknown", "diff_sha256": ...}``: ``diff_sha256``
        (dirty trees only) is the SHA-256 of ``git diff HEAD``, so two runs of the same uncommitted change can be
        told apart from two different ones. ``"unknown"`` when git is missing, ``root`` is no checkout, or
        ``root`` is only a folder inside another repository's tree (an installed copy in a virtualenv kept in
        some repository is not that repository's code). Untracked files do not count as dirty.
    """
    unknown = {"commit": UNKNOWN, "dirty": UNKNOWN}

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", "-C", str(root), *args], capture_output=True, timeout=_GIT_TIMEOUT_S, check=False
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.decode(errors="replace") if out.returncode == 0 else None

    top = git("rev-parse", "--show-toplevel")
    if top is None or Path(top.strip()).resolve() != Path(root).resolve():
        return unknown
    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    if commit is None:
        return unknown
    state: dict[str, Any] = {"commit": commit.strip(), "dirty": UNKNOWN if status is None else bool(status.strip())}
    if state["dirty"] is True:
        diff = git("diff", "HEAD")
        if diff is not None:
            state["diff_sha256"] = hashlib.sha256(diff.encode()).hexdigest()
    return state


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    """``{"python": ..., distribution: version}`` from ``importlib.metadata`` (``"unknown"`` if not installed)."""
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = UNKNOWN
    return versions


def cpu_info(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, Any]:
    """The first CPU's ``model name``, ``vendor_id`` and kernel-deciding instruction-set flags.

    From ``/proc/cpuinfo`` (Linux); elsewhere the model is ``platform.processor()`` and the rest unknown. A
    virtual machine may report a vague model (``AMD EPYC``); the flags say which kernels its libraries can pick.
    """
    fields: dict[str, str] = {}
    try:
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if not line.strip():
                break  # the first processor's block is enough
            key, sep, value = line.partition(":")
            if sep:
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    flags = fields["flags"].split() if "flags" in fields else None
    return {
        "cpu": fields.get("model name") or platform.processor() or UNKNOWN,
        "cpu_vendor": fields.get("vendor_id", UNKNOWN),
        "cpu_flags": UNKNOWN if flags is None else [f for f in ISA_FLAGS if f in flags],
    }


def machine_info() -> dict[str, Any]:
    """CPU (:func:`cpu_info`), logical CPU count, OS and architecture, host name."""
    return {
        **cpu_info(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "hostname": socket.gethostname(),
    }


def torch_info() -> dict[str, Any]:
    """torch's threads, CPU kernel choice, backends and build (``torch.__config__``)."""
    import torch as th

    return {
        "num_threads": th.get_num_threads(),
        "num_interop_threads": th.get_num_interop_threads(),
        # The instruction set ATen's kernels were picked for (DEFAULT, AVX2, AVX512, ...): kernels differ in rounding.
        "cpu_capability": th.backends.cpu.get_cpu_capability(),
        "mkl_available": th.backends.mkl.is_available(),
        "mkldnn_available": th.backends.mkldnn.is_available(),
        "mkldnn_enabled": bool(th.backends.mkldnn.enabled),
        "openmp_available": th.backends.openmp.is_available(),
        "deterministic_algorithms": th.are_deterministic_algorithms_enabled(),
        "cuda": [th.cuda.get_device_name(i) for i in range(th.cuda.device_count())] if th.cuda.is_available() else [],
        "parallel_info": th.__config__.parallel_info(),
        "build": th.__config__.show(),
    }


def numpy_info() -> dict[str, Any]:
    """numpy's BLAS/LAPACK and SIMD extensions, from ``numpy.show_config(mode="dicts")`` (numpy >= 1.26)."""
    import numpy as np

    try:
        config = np.show_config(mode="dicts")
    except TypeError:  # an older numpy: no dict mode
        return {}
    deps = config.get("Build Dependencies", {})
    libs = {
        name: f"{deps[name].get('name', UNKNOWN)} {deps[name].get('version', '')}".strip()
        for name in ("blas", "lapack")
        if isinstance(deps.get(name), dict)
    }
    simd = config.get("SIMD Extensions", {})
    return {**libs, "simd_baseline": simd.get("baseline"), "simd_found": simd.get("found")}


def collect_session(
    kind: str, resumed_at: int | None = None, argv: list[str] | None = None, cpu_kernels: str = "native"
) -> dict[str, Any]:
    """One session's provenance (see the module docstring).

    :param kind: ``"train"`` (a new run) or ``"resume"``.
    :param resumed_at: a resume's checkpoint step.
    :param argv: the command line (default ``sys.argv``).
    :param cpu_kernels: the run's ``cpu_kernels``: torch's settings are read as training will have them.
    """
    from rl_plasticity.kernels import kernels

    with kernels(cpu_kernels):
        torch_settings = torch_info()
    session: dict[str, Any] = {"kind": kind}
    if resumed_at is not None:
        session["resumed_at"] = int(resumed_at)
    session.update(
        started=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        command=list(sys.argv if argv is None else argv),
        cwd=os.getcwd(),
        code=git_state(),
        versions=package_versions(),
        machine=machine_info(),
        env={key: os.environ[key] for key in KERNEL_ENV_VARS if key in os.environ},
        cpu_kernels=cpu_kernels,
        torch=torch_settings,
        numpy=numpy_info(),
    )
    return session


def read_sessions(run_dir: Path) -> list[dict[str, Any]]:
    """The sessions of ``run_dir/provenance.json``, oldest first (empty: no file, or unreadable)."""
    try:
        data = json.loads((Path(run_dir) / PROVENANCE_FILE).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return []
    sessions = data.get("sessions") if isinstance(data, dict) else None
    return [s for s in sessions if isinstance(s, dict)] if isinstance(sessions, list) else []


def record_session(run_dir: Path, resumed_at: int | None = None, cpu_kernels: str = "native") -> dict[str, Any]:
    """Append this process's session to ``run_dir/provenance.json`` (atomically: a temporary file, then a rename).

    :param resumed_at: the checkpoint step of a resume; ``None`` for a new run.
    :param cpu_kernels: the run's ``cpu_kernels`` (:mod:`rl_plasticity.kernels`).
    :return: the session written.
    """
    session = collect_session("train" if resumed_at is None else "resume", resumed_at, cpu_kernels=cpu_kernels)
    path = Path(run_dir) / PROVENANCE_FILE
    data = {"format": FORMAT, "sessions": [*read_sessions(run_dir), session]}
    tmp = path.with_name(f".{PROVENANCE_FILE}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)
    return session
