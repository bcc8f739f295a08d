"""``rlp report``: read every run under a directory and write ``report.md``, PNG plots and CSV files."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rl_plasticity.report.aggregate import (
    RETURN_METRICS,
    VisitKey,
    arm_order,
    curve_bands,
    fresh_offsets,
    main_return,
    sequence_stats,
    step_grid,
    visit_keys,
    visit_rows,
    visit_stats,
    whole_run_stats,
)
from rl_plasticity.report.correlation import RETURN_NAMES, nc1_return_correlations
from rl_plasticity.report.lead import RETURN_AT_SWITCH, probe_lead_correlations
from rl_plasticity.report.provenance import ProvenanceSummary, summarize_provenance
from rl_plasticity.report.runs import (
    EVAL_RETURN,
    EVAL_TASK,
    MAIN_PROBES,
    TRAIN_RETURN,
    RunData,
    load_run,
    reused_runs,
)
from rl_plasticity.rundirs import find_run_dirs

TITLES = {
    "eval_mean": "eval return over the visit",
    "eval_return": "eval return at its end",
    "mean_return": "training return",
    "final_return": "final training return",
    **MAIN_PROBES,
}
PLOTS = {
    EVAL_RETURN: ("return.png", "Evaluation return of the current task", "mean evaluation return"),
    TRAIN_RETURN: ("train_return.png", "Training return of the current task", "episode return"),
    EVAL_TASK: (
        "eval_tasks.png",
        "Evaluation return of every task (forgetting, forward transfer)",
        "mean evaluation return",
    ),
    **{p: (f"{p}.png", title, title) for p, title in MAIN_PROBES.items()},
}
RETURNS_EVAL = (
    "**Returns.** The main return is the evaluation return over the visit (`eval_mean`): each evaluation round "
    "plays `eval.episodes` episodes of the agent's own greedy policy (`eval.epsilon`) on separate env copies "
    "whose episodes are seeded the same in every arm and round; `eval_mean` is the mean of the visit's rounds "
    "of its task, the round at the switch that starts it included (the area under its evaluation curve: it "
    "rewards learning fast as well as ending high). The evaluation return at the visit's end (`eval_return`, "
    "the last round alone) comes next. Training returns (over the visit's episodes at the training "
    "exploration, which differs between arms of different lengths) are secondary columns."
)
RETURNS_PARTIAL = (
    "{n} of {total} runs logged no evaluation return (made before evaluation existed, or "
    "with `eval.enabled=false`): they are missing from the evaluation columns: {runs}."
)
RETURNS_TRAINING = (
    "**Returns.** No run logged an evaluation return (made before evaluation existed, or with "
    "`eval.enabled=false`), so this report falls back to the **training returns** everywhere: the return "
    "over each visit's episodes at the training exploration, which may differ between arms."
)


VISITS_NOTE = (
    "Each cell: mean over seeds [95% percentile-bootstrap confidence interval]; IQM: interquartile mean "
    "(rliable's, `scipy.stats.trim_mean(x, 0.25)`); n: runs with this visit complete (a visit cut short "
    "is left out). The eval return is the evaluation at the end of the visit, the training returns are over "
    "the visit's episodes (final: its last 10); probes are on the task's fixed probe set at the end of the "
    "visit, averaged over layers where a probe has several (each layer: `visits.csv`). The `fresh` arm is a "
    "network trained on this task alone for one visit's steps: the same row stands beside every visit of the "
    "task."
)
SEQUENCE_NOTE = (
    "Per arm, over the visits after the first ({tasks} in the common order; a run with its own order drops its "
    "own first visit), where a network has trained on another task before: each run's mean of its per-visit "
    "returns (raw: a game with larger returns weighs more), and its mean of each visit's return divided "
    "by the fresh network's on that task (1: as good as a new network; below 1: lost plasticity, or "
    "interference); for the main return first, then for the others. Mean over runs [95% "
    "bootstrap CI; for the relative returns the runs and the fresh seeds are resampled independently] and "
    "IQM; n: runs with every visit complete (for `fresh`: seeds with every task)."
)
WHOLE_NOTE = (
    "Per arm, each run's main return averaged over all its task visits, the first included ({visits} visits; "
    "each task weighs the same when visits are equally long). For continual MinAtar with evaluation this is "
    "the summary of C-CHAIN's Table 4 (the evaluation return over the whole run, averaged over the games). "
    "Mean over runs +- standard error (the paper's form), [95% bootstrap CI], IQM; relative to none: the "
    "arm's mean over none's. n: runs with every visit complete; `fresh`: per seed, the fresh networks' "
    "returns on the visits' tasks, averaged the same way (seeds with every task). With evaluation, the "
    "evaluation return at each visit's end is averaged the same way beside it: C-CHAIN's code keeps no per-run "
    "summary, so Table 4 may also be read as this final-return form."
)
CURVES_NOTE = (
    "Mean over seeds with a shaded 95% bootstrap band; dashed vertical lines are task switches. Each run "
    "is interpolated linearly onto a common step grid (no extrapolation past its last log). The evaluation "
    "return is the current task's (`eval/mean_return`), the training return too (`task/<task>/episode_return`); "
    "the evaluation return of every task (`eval/<task>/mean_return`, with `eval.tasks: all`) shows forgetting "
    "(a finished task's return falls) and forward transfer (a task's return before its visit). The fresh arm's "
    "runs are drawn where the continual runs meet their task (of every task's evaluation, its own task only)."
)
FILES_NOTE = """\
- `runs.csv`: one row per run (arm, seed, directory, complete or how far it got);
- `visits_by_run.csv`: every run's task visits (`task_summary.csv` rows, or rebuilt from the events for a run
  without the monitor; column `source`);
- `visits.csv`: the tables above, per visit, arm and metric (each layer too): n, mean, ci_low, ci_high, iqm;
- `whole_run.csv`: the whole-run table: arm, metric, visits, n, mean, sem, ci_low, ci_high, iqm, vs_none;
- `sequence.csv`: the table across the sequence: arm, metric (`eval_mean`, `eval_mean/fresh`, `eval_return`,
  `eval_return/fresh`, `mean_return`, `mean_return/fresh`, `final_return`, `final_return/fresh`; those some run
  has), visits, n, mean, ci_low, ci_high, iqm;
- `curves.csv`: the plotted curves: metric, arm, step, n, mean, ci_low, ci_high;
- `correlation.csv`: the NC1-return correlations above;
- `lead.csv`: each probe at a switch against the next visit's return (the table above): probe, return, n, arms,
  pearson_r, ci_low, ci_high, p_value, spearman_rho, then r, ci_low, ci_high, p within arms (`within_`) and
  within arm and switch (`switch_`);
- `provenance.csv`: every session of every run (its `provenance.json`): commit, machine, kernels, host."""
CORRELATION_NOTE = (
    "Each point is one complete task visit of one continual run (every arm but `fresh`): NC1 of the value-head "
    "features on the task's fixed probe set at the end of the visit, against the visit's main return. "
    "Pearson's r with its 95% interval (Fisher z) and p-value, and Spearman's rank correlation. Returns of "
    "different games differ in scale, so the pooled value mixes tasks; the per-task rows and the pooled "
    "return relative to the fresh network's on the same task do not. Visits of one run are not independent, "
    "so the intervals are optimistic."
)

LEAD_NOTE = (
    "Does a probe warn before the return falls? Each point is one switch of one continual run: the probe at the "
    "end of the earlier visit (the network that meets the next task, on the earlier task's probe set) against the "
    "next visit's main return relative to the fresh network's on that task (raw without a fresh arm). Pooled: over "
    "every arm's switches, so it is large when arms differ in both, and then it ranks interventions. Within arms: "
    "the partial correlation given the arm (both values centred on their arm's mean); what is left mixes seeds, "
    "tasks and the trend over the sequence. Within arm and switch: given the arm and the switch's place in the "
    "run, so only the seeds of one arm at one switch are compared: does the probe tell which run of a method will "
    "learn the next task better? The first row puts the return at the switch (the earlier visit's, relative to "
    "fresh) in the probe's place: a probe that predicts no better moves with the return, not before it. Pearson's "
    "r with its 95% interval (Fisher z) and p-value, Spearman's rho of the pooled pairs; strongest pooled "
    "correlation first. Switches of one run are not independent, so the intervals are optimistic, and every probe "
    "column is tested, so some pass p < 0.05 by chance. Where the tasks are different games, the switches into "
    "each game differ in both for the game's sake: the table is clearest on a family of like tasks (permuted "
    "observations, shuffled actions)."
)


def _lead_lines(leads: pd.DataFrame) -> list[str]:
    """The report's section on probes at a switch against the next visit's return (``lead.csv``)."""
    lines = ["## Probes at a switch and the next task's return", "", LEAD_NOTE, ""]
    usable = leads[leads["n"] > 0]
    if usable.empty:
        return [*lines, "No run has two consecutive complete visits with probes yet.", ""]
    if usable["pearson_r"].isna().all():
        n = int(usable["n"].max())
        return [*lines, f"Too few switches for a correlation yet ({n}; at least 3 with some spread).", ""]
    lines += [
        f"Return: {usable['return'].iloc[0]}.",
        "",
        "| at the switch | n | arms | pooled r [95% CI] | p | Spearman rho | within arms r [95% CI] | p "
        "| within arm and switch r [95% CI] | p |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def interval(r: pd.Series, prefix: str) -> str:
        return f"{_fmt(r[prefix + 'r'])} [{_fmt(r[prefix + 'ci_low'])}, {_fmt(r[prefix + 'ci_high'])}]"

    for _, r in usable.iterrows():
        name = r["probe"] if r["probe"] == RETURN_AT_SWITCH else f"`{r['probe']}`"
        lines.append(
            f"| {name} | {r['n']} | {r['arms']} | {_fmt(r['pearson_r'])} [{_fmt(r['ci_low'])}, "
            f"{_fmt(r['ci_high'])}] | {_pvalue(r['p_value'])} | {_fmt(r['spearman_rho'])} | "
            f"{interval(r, 'within_')} | {_pvalue(r['within_p'])} | {interval(r, 'switch_')} | "
            f"{_pvalue(r['switch_p'])} |"
        )
    return [*lines, ""]


class ReportError(ValueError):
    """Bad input to ``rlp report``: one line."""


@dataclass
class Report:
    """What :func:`make_report` read and wrote."""

    out: Path
    runs: list[RunData]
    incomplete: list[RunData]
    files: list[Path] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    not_started: list[str] = field(default_factory=list)
    provenance: ProvenanceSummary | None = None


def make_report(
    runs_dir: Path, out: Path | None = None, points: int = 200, n_resamples: int = 10_000, seed: int = 0
) -> Report:
    """Read the runs under ``runs_dir`` and write the report to ``out`` (default ``runs_dir/report``).

    :param points: steps of the common grid the curves are interpolated onto.
    :param n_resamples: bootstrap resamples of each table cell (the curves use at most 2000 per point).
    :param seed: seed of the bootstrap.
    :raises ReportError: ``runs_dir`` is missing or holds no run; nothing is written then.
    """
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise ReportError(f"RUNS_DIR: {runs_dir} is not a directory")
    run_dirs = find_run_dirs(runs_dir)
    if not run_dirs:
        raise ReportError(f"RUNS_DIR: no run directory (a folder with config.yaml) under {runs_dir}")
    manifests: dict[Path, dict[str, Any] | None] = {}
    runs = [load_run(path, manifests) for path in run_dirs]
    runs += reused_runs(runs, manifests)  # the fresh trials a sweep took from a continual trial's first visit
    preferred = [a for m in manifests.values() if m for a in m.get("arms_order", [])]
    arms = arm_order(runs, preferred)
    keys = visit_keys(runs)
    rows = visit_rows(runs)
    stats = visit_stats(rows, keys, arms, n_resamples, seed)
    sequence = sequence_stats(rows, keys, arms, n_resamples, seed)
    main = main_return(rows)
    # Beside the main return, the evaluation return at the visits' ends: C-CHAIN's code keeps no per-run summary,
    # so its Table 4 may be read as either.
    whole_metrics = [main, *(["eval_return"] if main == "eval_mean" and "eval_return" in rows else [])]
    whole = pd.concat(
        [whole_run_stats(rows, keys, arms, m, n_resamples, seed) for m in whole_metrics], ignore_index=True
    )
    offsets = fresh_offsets(runs, keys)
    grid = step_grid(runs, offsets, points)
    curves = curve_bands(runs, arms, grid, offsets, min(n_resamples, 2_000), seed)

    report = Report(
        Path(out) if out is not None else runs_dir / "report",
        runs,
        [r for r in runs if not r.progress.complete and r.reused_from is None],  # a source run is listed itself
    )
    # The manifest names a trial's run directory once it ends; a running one is found by its label and seed.
    seen = {(r.path.parent.resolve(), r.seed) for r in runs}
    reused = {(r.reused_from, r.seed) for r in runs if r.reused_from is not None}
    for sweep_dir, manifest in manifests.items():
        for trial_id, entry in (manifest or {}).get("trials", {}).items():
            if entry.get("status") == "failed":
                report.failed[trial_id] = str(entry.get("error"))
            elif entry.get("status") == "reused":
                if (entry.get("reused_from"), entry.get("seed")) not in reused:  # its source has no run yet
                    report.not_started.append(trial_id)
            elif ((sweep_dir / str(entry.get("label"))).resolve(), entry.get("seed")) not in seen:
                report.not_started.append(trial_id)

    correlations = nc1_return_correlations(rows, main)
    leads = probe_lead_correlations(rows, main)
    report.provenance = summarize_provenance([r for r in runs if r.reused_from is None], runs_dir)

    report.out.mkdir(parents=True, exist_ok=True)
    report.files += _write_csvs(report.out, runs, runs_dir, rows, stats, curves)
    tables = {"whole_run.csv": whole, "sequence.csv": sequence, "correlation.csv": correlations, "lead.csv": leads}
    for name, frame in tables.items():
        frame.to_csv(report.out / name, index=False)
        report.files.append(report.out / name)
    report.files.append(report.provenance.write_csv(report.out))
    report.files += _write_plots(report.out, curves, arms, keys)
    if correlations["n"].gt(0).any():
        from rl_plasticity.report.plots import plot_nc1_vs_return

        plot_nc1_vs_return(
            rows,
            arms,
            report.out / "nc1_vs_return.png",
            main,
            RETURN_NAMES.get(main, main),
        )
        report.files.append(report.out / "nc1_vs_return.png")
    md = report.out / "report.md"
    md.write_text(_markdown(report, runs_dir, arms, keys, stats, whole, sequence, correlations, leads, main))
    report.files.insert(0, md)
    return report


def _rel(path: Path, root: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path(root).resolve()))
    except ValueError:
        return str(path)


def _write_csvs(
    out: Path, runs: list[RunData], runs_dir: Path, rows: pd.DataFrame, stats: pd.DataFrame, curves: pd.DataFrame
) -> list[Path]:
    table = pd.DataFrame(
        [
            {
                "arm": r.arm,
                "seed": r.seed,
                "kind": r.kind,
                "task": r.task,
                "run": _rel(r.path, runs_dir),
                "complete": r.progress.complete,
                "status": r.progress.describe(),
                "checkpoint_step": r.progress.checkpoint_step,
                "total_steps": r.progress.total_steps,
                "last_logged_step": r.last_step,
                "visits": len(r.visits),
                "visit_source": r.visit_source,
            }
            for r in runs
        ]
    )
    if any(r.reused_from is not None for r in runs):  # only then: a sweep without reuse keeps its columns
        table["reused_from"] = [r.reused_from for r in runs]
    rows = rows.assign(run=[_rel(Path(p), runs_dir) for p in rows["run"]]) if len(rows) else rows
    files = {"runs.csv": table, "visits_by_run.csv": rows, "visits.csv": stats, "curves.csv": curves}
    for name, frame in files.items():
        frame.to_csv(out / name, index=False)
    return [out / name for name in files]


def _write_plots(out: Path, curves: pd.DataFrame, arms: list[str], keys: list[VisitKey]) -> list[Path]:
    from rl_plasticity.report.plots import plot_metric  # matplotlib: only when there is something to draw

    written = []
    for name, (filename, title, ylabel) in PLOTS.items():
        metrics = sorted(m for m in curves["metric"].unique() if m == name or m.startswith(f"{name}/"))
        if metrics:
            plot_metric(curves, metrics, title, ylabel, arms, keys, out / filename)
            written.append(out / filename)
    return written


def _fmt(x: float) -> str:
    if x is None or not np.isfinite(x):
        return "–"
    if abs(x) >= 100:
        return f"{x:.1f}"
    if abs(x) >= 1:
        return f"{x:.2f}"
    return f"{x:.3f}"


def _pvalue(p: float) -> str:
    if p is None or not np.isfinite(p):
        return "–"
    return f"{p:.2g}" if p >= 1e-4 else "<1e-4"


def _cell(s: pd.Series | None) -> str:
    if s is None:
        return "–"
    if not np.isfinite(s["ci_low"]):
        return _fmt(s["mean"])
    return f"{_fmt(s['mean'])} [{_fmt(s['ci_low'])}, {_fmt(s['ci_high'])}]"


def _seeds(seeds: list[int]) -> str:
    return ", ".join(str(s) for s in sorted(set(seeds)))


def _reused_note(runs: list[RunData]) -> list[str]:
    """One line per task and source arm of the reused fresh runs: where they come from."""
    by_source: dict[tuple[str, str], list[int]] = {}
    sources = {str(r.path): r.arm for r in runs if r.reused_from is None}
    for r in runs:
        if r.reused_from is not None:
            by_source.setdefault((str(r.task), sources.get(str(r.path), r.reused_from)), []).append(r.seed)
    lines = [
        f"The `fresh` run on {task} (seeds {_seeds(seeds)}) is the {arm} arm's first visit of it: the same run "
        "(the same config but for the fresh-network keys), so the sweep did not run it again (sweep.json: reused)."
        for (task, arm), seeds in by_source.items()
    ]
    return [*lines, ""] if lines else []


def _returns_note(runs: list[RunData], runs_dir: Path, main: str) -> list[str]:
    """Which return the report leads with, and the runs without evaluation returns."""
    if main not in ("eval_mean", "eval_return"):
        return [RETURNS_TRAINING, ""]
    lacking = [r for r in runs if main not in r.visits or r.visits[main].isna().all()]
    lines = [RETURNS_EVAL, ""]
    if lacking:
        listed = ", ".join(f"`{_rel(r.path, runs_dir)}`" for r in lacking)
        lines += [RETURNS_PARTIAL.format(n=len(lacking), total=len(runs), runs=listed), ""]
    return lines


def _markdown(
    report: Report,
    runs_dir: Path,
    arms: list[str],
    keys: list[VisitKey],
    stats: pd.DataFrame,
    whole: pd.DataFrame,
    sequence: pd.DataFrame,
    correlations: pd.DataFrame,
    leads: pd.DataFrame,
    main: str,
) -> str:
    runs = report.runs
    when = dt.datetime.now().isoformat(timespec="seconds")
    lines = [
        "# Plasticity report",
        "",
        f"`rlp report {runs_dir}`, {when}: {len(runs)} runs in {len(arms)} arms ({', '.join(arms)}).",
        "",
        "## Runs",
        "",
        "| arm | runs | seeds | complete |",
        "|---|---|---|---|",
    ]
    for arm in arms:
        mine = [r for r in runs if r.arm == arm]
        done = sum(r.progress.complete for r in mine)
        lines.append(f"| {arm} | {len(mine)} | {_seeds([r.seed for r in mine])} | {done} of {len(mine)} |")
    lines.append("")
    lines += _reused_note(runs)
    if report.incomplete:
        lines += ["**Incomplete runs** (their complete visits are used; their curves stop at their last log):", ""]
        lines += [
            f"- `{_rel(r.path, runs_dir)}` ({r.arm}, seed {r.seed}): {r.progress.describe()}, "
            f"last log at step {r.last_step}"
            for r in report.incomplete
        ]
        lines.append("")
    else:
        lines += ["Every run is complete.", ""]
    if report.failed:
        lines += ["**Failed trials** (sweep.json):", ""]
        lines += [f"- `{t}`: {err}" for t, err in sorted(report.failed.items())] + [""]
    if report.not_started:
        lines += [
            f"**Trials not started yet** (sweep.json): {', '.join(f'`{t}`' for t in sorted(report.not_started))}",
            "",
        ]
    lines += _returns_note(runs, runs_dir, main)

    if len(whole):
        ends = {r["arm"]: r for _, r in whole[whole["metric"] != main].iterrows()}  # eval_return beside eval_mean
        lines += [
            "## Whole run",
            "",
            WHOLE_NOTE.format(visits=len(keys)),
            "",
            f"| arm | n | {TITLES[main]}, mean +- s.e. | 95% CI | IQM | relative to none |"
            + (" n | eval return at the visits' ends, mean +- s.e. | 95% CI | relative to none |" if ends else ""),
            "|---|---|---|---|---|---|" + ("---|---|---|---|" if ends else ""),
        ]
        for _, r in whole[whole["metric"] == main].iterrows():
            line = (
                f"| {r['arm']} | {int(r['n'])} | {_fmt(r['mean'])} +- {_fmt(r['sem'])} | "
                f"[{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}] | {_fmt(r['iqm'])} | {_fmt(r['vs_none'])} |"
            )
            end = ends.get(r["arm"])
            if ends and end is None:
                line += " 0 | | | |"
            elif end is not None:
                line += (
                    f" {int(end['n'])} | {_fmt(end['mean'])} +- {_fmt(end['sem'])} | "
                    f"[{_fmt(end['ci_low'])}, {_fmt(end['ci_high'])}] | {_fmt(end['vs_none'])} |"
                )
            lines.append(line)
        lines.append("")

    if len(sequence):
        tasks = ", ".join(dict.fromkeys(k.task for k in keys[1:]))
        metrics = [m for m in RETURN_METRICS if m in set(sequence["metric"])]
        metrics.sort(key=lambda m: m != main)
        header = ["arm", "n", TITLES[metrics[0]], "IQM", "relative to fresh", "IQM"]
        for metric in metrics[1:]:
            header += [TITLES[metric], "relative to fresh"]
        lines += [
            "## Across the sequence",
            "",
            SEQUENCE_NOTE.format(tasks=tasks),
            "",
            "| " + " | ".join(header) + " |",
            "|" + "---|" * len(header),
        ]
        for arm in arms:
            cells = {r["metric"]: r for _, r in sequence[sequence["arm"] == arm].iterrows()}
            if not cells:
                continue
            ret, rel = cells[metrics[0]], cells[f"{metrics[0]}/fresh"]
            row = [arm, str(int(ret["n"])), _cell(ret), _fmt(ret["iqm"]), _cell(rel), _fmt(rel["iqm"])]
            for metric in metrics[1:]:
                row += [_cell(cells.get(metric)), _cell(cells.get(f"{metric}/fresh"))]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")

    lines += ["## Task visits", "", VISITS_NOTE, ""]
    present = set(stats["metric"]) if len(stats) else set()
    probes = [p for p in MAIN_PROBES if p in present and stats[stats["metric"] == p]["n"].max() > 0]
    returns = [m for m in RETURN_METRICS if m in present and stats[stats["metric"] == m]["n"].max() > 0]
    returns.sort(key=lambda m: m != main)
    header = ["arm", "n", *(t for m in returns for t in (TITLES[m], "IQM")), *(MAIN_PROBES[p] for p in probes)]
    for key in keys:
        span = f"steps {key.start}–{key.end}" if key.end > key.start else "one visit"
        lines += [f"### {key.index}. {key.task}, visit {key.visit} ({span})", ""]
        mine = stats[stats["index"] == key.index]
        if mine.empty:
            lines += ["No run has completed this visit yet.", ""]
            continue
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for arm in arms:
            cells = {m: row for _, row in mine[mine["arm"] == arm].iterrows() for m in [row["metric"]]}
            if not cells:
                continue
            n = int(max(cells[m]["n"] for m in returns if m in cells)) if any(m in cells for m in returns) else 0
            row = [arm, str(n)]
            for metric in returns:
                cell = cells.get(metric)
                row += [_cell(cell), _fmt(cell["iqm"]) if cell is not None else "–"]
            row += [_cell(cells.get(p)) for p in probes]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    if not keys:
        lines += ["No task visit has been logged yet.", ""]

    lines += ["## NC1 and return across task visits", "", CORRELATION_NOTE, ""]
    usable = correlations[correlations["n"] > 0]
    if usable.empty:
        lines += [f"No complete visit has both NC1 and a {RETURN_NAMES.get(main, main)} yet.", ""]
    else:
        lines += [
            "| visits | return | n | Pearson r [95% CI] | p | Spearman rho | p |",
            "|---|---|---|---|---|---|---|",
        ]
        for _, r in usable.iterrows():
            lines.append(
                f"| {r['scope']} | {r['return']} | {r['n']} | {_fmt(r['pearson_r'])} [{_fmt(r['ci_low'])}, "
                f"{_fmt(r['ci_high'])}] | {_pvalue(r['p_value'])} | {_fmt(r['spearman_rho'])} | "
                f"{_pvalue(r['spearman_p'])} |"
            )
        lines.append("")
        if (report.out / "nc1_vs_return.png").is_file():
            lines += ["![NC1 against return per task visit](nc1_vs_return.png)", ""]

    lines += _lead_lines(leads)
    lines += ["## Curves", "", CURVES_NOTE, ""]
    for filename, title, _ in PLOTS.values():
        if (report.out / filename).is_file():
            lines += [f"![{title}]({filename})", ""]
    lines += report.provenance.markdown() if report.provenance is not None else []
    lines += ["## Files", "", FILES_NOTE, ""]
    return "\n".join(lines)
