"""The report's PNG plots: mean curve per arm with its 95% bootstrap band, task switches as vertical lines."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display needed (and none on a cluster node)
import matplotlib.pyplot as plt
import pandas as pd

from rl_plasticity.report.aggregate import VisitKey


def arm_colors(arms: list[str]) -> dict[str, str]:
    """One colour per arm, stable in the arm order; ``fresh`` is black."""
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colors, i = {}, 0
    for arm in arms:
        if arm == "fresh":
            colors[arm] = "black"
        else:
            colors[arm] = cycle[i % len(cycle)]
            i += 1
    return colors


def _switches(ax: plt.Axes, keys: list[VisitKey]) -> None:
    """Dashed vertical lines at every task switch, and each visit's task named above the plot."""
    for key in keys:
        if key.start > 0:
            ax.axvline(key.start, color="grey", linestyle="--", linewidth=0.8, zorder=0)
        if key.end > key.start:
            ax.text(
                (key.start + key.end) / 2,
                1.01,
                key.task,
                transform=ax.get_xaxis_transform(),
                ha="center",
                va="bottom",
                fontsize=7,
                color="dimgrey",
                clip_on=False,
            )


def _draw(ax: plt.Axes, curves: pd.DataFrame, arms: list[str], colors: dict[str, str]) -> None:
    for arm in arms:
        c = curves[curves["arm"] == arm]
        if c.empty:
            continue
        n = int(c["n"].max())
        ax.plot(
            c["step"],
            c["mean"],
            color=colors[arm],
            linestyle="--" if arm == "fresh" else "-",
            linewidth=1.3,
            label=f"{arm} (n={n})",
        )
        ax.fill_between(c["step"], c["ci_low"], c["ci_high"], color=colors[arm], alpha=0.2, linewidth=0)


def plot_metric(
    curves: pd.DataFrame, metrics: list[str], title: str, ylabel: str, arms: list[str], keys: list[VisitKey], path: Path
) -> None:
    """One panel per metric (a probe's layers), each with every arm, saved as ``path``."""
    colors = arm_colors(arms)
    cols = min(len(metrics), 2)
    rows = (len(metrics) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(7.5 * cols, 3.8 * rows), squeeze=False)
    for ax, metric in zip(axes.flat, metrics):
        _draw(ax, curves[curves["metric"] == metric], arms, colors)
        _switches(ax, keys)
        ax.set_xlabel("environment steps")
        ax.set_ylabel(ylabel)
        ax.set_title(metric if len(metrics) > 1 else title, fontsize=9, pad=14)
        ax.grid(alpha=0.3)
    if len(metrics) > 1:
        fig.suptitle(title)
    _finish(fig, axes, len(metrics), rows, path, legend_columns=5, legend_space=0.08)


def plot_nc1_vs_return(
    rows: pd.DataFrame,
    arms: list[str],
    path: Path,
    column: str = "mean_return",
    ylabel: str = "mean return over the visit",
) -> None:
    """NC1 at the end of each complete continual task visit against its return (``column``), one panel per task
    (returns of different games do not share a scale), coloured by arm."""
    done = rows[rows["complete"].astype(bool) & (rows["kind"] != "fresh")]
    tasks = list(done["task"].unique())
    colors = arm_colors(arms)
    cols = min(len(tasks), 3)
    fig_rows = (len(tasks) + cols - 1) // cols
    fig, axes = plt.subplots(fig_rows, cols, figsize=(4.2 * cols, 3.4 * fig_rows), squeeze=False)
    for ax, task in zip(axes.flat, tasks):
        mine = done[done["task"] == task]
        for arm in arms:
            sel = mine[mine["arm"] == arm]
            if len(sel):
                ax.scatter(
                    pd.to_numeric(sel["nc1"], errors="coerce"),
                    pd.to_numeric(sel[column], errors="coerce"),
                    s=18,
                    color=colors[arm],
                    label=arm,
                    alpha=0.8,
                )
        ax.set_title(task, fontsize=9)
        ax.set_xlabel("NC1 at the end of the visit")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    _finish(fig, axes, len(tasks), fig_rows, path, legend_columns=6, legend_space=0.1)


def _finish(
    fig: plt.Figure, axes: Any, used: int, rows: int, path: Path, legend_columns: int, legend_space: float
) -> None:
    """Blank the unused panels, put the first panel's legend under the figure, lay out, save and close."""
    for ax in list(axes.flat)[used:]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(
            handles, labels, loc="lower center", ncol=min(len(labels), legend_columns), fontsize=8, frameon=False
        )
    with warnings.catch_warnings():  # a curve of one point leaves tight_layout nothing to fit: harmless
        warnings.simplefilter("ignore", UserWarning)
        fig.tight_layout(rect=(0, legend_space if rows == 1 else 0.05, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
