"""The report's provenance listing: which commits and machines produced the runs it aggregates.

Runs are bit-identical on one machine but not across machines (CPU-dependent kernels) nor, in general,
across commits. A report that mixes them is still valid, as a statistical comparison, but a reader should
know: this module lists the distinct commits, machines and kernel choices over the runs' sessions
(``provenance.json``, :mod:`rl_plasticity.provenance`), warns when there is more than one of any, and writes
``provenance.csv`` (one row per session). A run from before provenance was recorded counts as ``unknown``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from rl_plasticity.provenance import UNKNOWN, read_sessions

PROVENANCE_CSV = "provenance.csv"
#: The report's three provenance columns: column -> heading.
ASPECTS = {"commit": "commits", "machine": "machines", "kernels": "kernel choices"}
#: Environment variables that pin kernel choice (shown with the kernels when set).
KERNEL_PINS = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")
NOTE = (
    "Where the runs come from (each run's `provenance.json`: one entry per `rlp train` or `--resume` process). "
    "Commit: the project's git commit (`+dirty`: with uncommitted changes); machine: the CPU model and torch "
    "version; kernels: the instruction set torch's CPU kernels were chosen for, and any pins (environment "
    "variables; oneDNN off: `cpu_kernels: portable`). Runs are bit-identical only with the same commit, libraries "
    "and kernels; otherwise they agree only statistically, so compare such runs through the confidence intervals. "
    "`unknown`: a run from before provenance was recorded. One row per session: `provenance.csv`."
)


def session_row(session: dict[str, Any] | None) -> dict[str, Any]:
    """One session of ``provenance.json`` as the report's columns (all ``unknown`` for ``None``)."""
    if not session:
        return {
            "commit": UNKNOWN,
            "machine": UNKNOWN,
            "kernels": UNKNOWN,
            "host": UNKNOWN,
            "kind": UNKNOWN,
            "started": UNKNOWN,
        }
    code, versions = session.get("code") or {}, session.get("versions") or {}
    machine, torch_info, env = session.get("machine") or {}, session.get("torch") or {}, session.get("env") or {}
    commit = str(code.get("commit", UNKNOWN))
    if commit != UNKNOWN and code.get("dirty") is True:
        commit += "+dirty"
    pins = [f"{key}={env[key]}" for key in KERNEL_PINS if key in env]
    pins += ["oneDNN off"] if torch_info.get("mkldnn_enabled") is False else []
    kernels = str(torch_info.get("cpu_capability", UNKNOWN)) + (f" ({', '.join(pins)})" if pins else "")
    return {
        "commit": commit,
        "machine": f"{machine.get('cpu', UNKNOWN)}, torch {versions.get('torch', UNKNOWN)}",
        "kernels": kernels,
        "host": machine.get("hostname", UNKNOWN),
        "kind": session.get("kind", UNKNOWN),
        "started": session.get("started", UNKNOWN),
    }


def provenance_frame(runs: Sequence[Any], runs_dir: Path) -> pd.DataFrame:
    """One row per session of every run: ``run, arm, seed, session, kind, started, commit, machine, kernels,
    host``; a run without ``provenance.json`` gets one row of ``unknown``.

    :param runs: the report's runs (anything with ``path``, ``arm`` and ``seed``).
    :param runs_dir: run paths are given relative to it.
    """
    from rl_plasticity.report.build import _rel  # build imports this module

    rows = []
    for run in runs:
        sessions: list[dict[str, Any] | None] = list(read_sessions(run.path)) or [None]
        for i, session in enumerate(sessions):
            rows.append(
                {
                    "run": _rel(run.path, runs_dir),
                    "arm": run.arm,
                    "seed": run.seed,
                    "session": i,
                    **session_row(session),
                }
            )
    columns = ["run", "arm", "seed", "session", "kind", "started", "commit", "machine", "kernels", "host"]
    return pd.DataFrame(rows, columns=columns)


@dataclass
class ProvenanceSummary:
    """What the report says about provenance.

    :param frame: :func:`provenance_frame`.
    :param counts: per aspect (``commit``, ``machine``, ``kernels``): value -> number of runs with a session of it.
    :param mixed_runs: runs whose sessions differ in an aspect (resumed elsewhere or on other code).
    """

    frame: pd.DataFrame
    counts: dict[str, dict[str, int]]
    mixed_runs: list[str]

    @property
    def differing(self) -> list[str]:
        """The aspects with more than one value over the runs (``unknown`` counts as a value)."""
        return [aspect for aspect, values in self.counts.items() if len(values) > 1]

    def _differ(self) -> str:
        return " and ".join(f"{len(self.counts[a])} {ASPECTS[a]}" for a in self.differing)

    def warning(self) -> str | None:
        """One line for the terminal when the runs' commits, machines or kernels differ, else ``None``."""
        if not self.differing:
            return None
        return (
            f"warning: the runs come from {self._differ()} (see Provenance in report.md): they agree "
            "statistically, not bit for bit"
        )

    def markdown(self) -> list[str]:
        """The report's ``## Provenance`` section, as lines."""
        lines = ["## Provenance", "", NOTE, ""]
        if self.differing:
            lines += [
                f"**Warning**: the runs come from {self._differ()}; runs that differ in these are not "
                "bit-identical, only statistically comparable.",
                "",
            ]
        if self.mixed_runs:
            lines += [
                "Runs whose sessions differ (resumed on another machine or commit): "
                + ", ".join(f"`{r}`" for r in self.mixed_runs),
                "",
            ]
        for aspect in ASPECTS:
            lines += [f"| {aspect} | runs |", "|---|---|"]
            lines += [f"| `{value}` | {n} |" for value, n in self.counts[aspect].items()]
            lines.append("")
        return lines

    def write_csv(self, out: Path) -> Path:
        """Write ``provenance.csv`` to ``out`` and return its path."""
        path = Path(out) / PROVENANCE_CSV
        self.frame.to_csv(path, index=False)
        return path


def summarize_provenance(runs: Sequence[Any], runs_dir: Path) -> ProvenanceSummary:
    """The distinct commits, machines and kernel choices of ``runs`` (see :class:`ProvenanceSummary`)."""
    frame = provenance_frame(runs, runs_dir)
    counts = {
        aspect: {
            str(value): int(n)
            for value, n in frame.drop_duplicates(["run", aspect]).groupby(aspect, sort=False).size().items()
        }
        for aspect in ASPECTS
    }
    per_run = frame.groupby("run", sort=False)[list(ASPECTS)].nunique()
    mixed = per_run[(per_run > 1).any(axis=1)].index.tolist()
    return ProvenanceSummary(frame, counts, mixed)
