"""`rlp report` on hand-made run directories: every number checked against an independent computation.

The runs are synthetic (a config.yaml, a hand-written task_summary.csv, a small TensorBoard events file
written with SummaryWriter, a checkpoint meta.json), so the expected tables and curves are known exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from click.testing import CliRunner
from scipy import stats as sps
from torch.utils.tensorboard import SummaryWriter

from rl_plasticity.cli import cli
from rl_plasticity.report import band, interpolate, iqm, make_report, relative_summary, summarize
from rl_plasticity.report.build import _lead_lines
from rl_plasticity.report.correlation import correlation_row
from rl_plasticity.report.lead import probe_lead_correlations
from rl_plasticity.rundirs import trial_state

A, B = "cartpole/length=0.5", "cartpole/length=1.5"
SWITCH = 100


def write_run(
    run_dir: Path,
    *,
    seed: int,
    interventions: list[str],
    total: int,
    checkpoint: int | None,
    rows: list[dict] | None,
    scalars: dict[str, list[tuple[int, float]]],
    task_order: list[int] | None = None,
    layer_norm: bool = False,
) -> Path:
    """A run directory as `rlp train` leaves it, with only what the report reads."""
    run_dir.mkdir(parents=True)
    env = {
        "sequence": "cartpole_shift",
        "switch_every": SWITCH,
        "order": "explicit" if task_order else "cyclic",
        "task_order": task_order,
        "n_envs": 1,
        "sequence_seed": None,
        "options": {"values": [0.5, 1.5]},
    }
    config = {
        "name": "synthetic",
        "seed": seed,
        "total_steps": total,
        "env": env,
        "interventions": interventions,
        "net": {"kind": "mlp", "layer_norm": layer_norm, "activation": "relu"},
    }
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    if rows is not None:
        pd.DataFrame(rows).to_csv(run_dir / "task_summary.csv", index=False)
    writer = SummaryWriter(log_dir=str(run_dir))
    for tag, points in scalars.items():
        for step, value in points:
            writer.add_scalar(tag, value, step)
    writer.close()
    if checkpoint is not None:
        name = f"step_{checkpoint:012d}"
        (run_dir / "checkpoints" / name).mkdir(parents=True)
        (run_dir / "checkpoints" / name / "meta.json").write_text(json.dumps({"step": checkpoint}))
        (run_dir / "checkpoints" / "latest").write_text(name + "\n")
    return run_dir


def row(
    task: str,
    visit: int,
    start: int,
    mean: float,
    final: float,
    erank: float,
    dormant: tuple[float, float],
    nc1: float,
    complete: bool = True,
) -> dict:
    return {
        "task_id": 0 if task == A else 1,
        "task": task,
        "visit": visit,
        "start_step": start,
        "end_step": start + SWITCH,
        "episodes": 5,
        "mean_return": mean,
        "final_return": final,
        "complete": complete,
        "dormant/q_net.1": dormant[0],
        "dormant/q_net.3": dormant[1],
        "erank/value_head": erank,
        "nc1/value_head": nc1,
        "kfac_eps_rank/q_net.0": 0.5,
    }


# Per arm and seed: mean returns of visit 1 (task A) and visit 2 (task B), and the return curve points.
NONE = {0: (10.0, 4.0), 1: (12.0, 6.0), 2: (20.0, 8.0)}
RESET = {0: (11.0, 9.0), 1: (13.0, 11.0), 2: (15.0, 13.0)}
FRESH_B = {0: 30.0, 1: 34.0, 2: 38.0}


def curve(seed: int, base: float) -> list[tuple[int, float]]:
    return [(50, base + seed), (100, base + 2 * seed)]


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    for arm, table, ivs in (("none", NONE, []), ("reset", RESET, ["reset"])):
        for seed, (ra, rb) in table.items():
            nc1 = float("nan") if (arm, seed) == ("none", 2) else 1.0 + seed  # NC1 undefined in one run
            rows = [
                row(A, 1, 0, ra, ra + 1, 2.0 + seed, (0.1, 0.3), nc1),
                row(B, 1, SWITCH, rb, rb + 1, 3.0 + seed, (0.2, 0.4), 2.0),
            ]
            scalars = {
                f"task/{A}/episode_return": curve(seed, 0.0 if arm == "none" else 100.0),
                f"task/{B}/episode_return": [(150, 10.0 * seed), (200, 10.0 * seed + 1)],
                "task/id": [(10, 0), (100, 1), (150, 1), (200, 0)],
                "plasticity/erank/value_head@probe_set": [(100, 2.0 + seed), (200, 3.0 + seed)],
            }
            write_run(
                root / arm / f"20260101-00000{seed}_seed{seed}",
                seed=seed,
                interventions=ivs,
                total=200,
                checkpoint=200,
                rows=rows,
                scalars=scalars,
            )
    # An incomplete reset run: stopped at step 100, after its first visit.
    write_run(
        root / "reset" / "20260101-000003_seed3",
        seed=3,
        interventions=["reset"],
        total=200,
        checkpoint=100,
        rows=[
            row(A, 1, 0, 17.0, 18.0, 5.0, (0.0, 0.2), 4.0),
            row(B, 1, SWITCH, 99.0, 99.0, 5.0, (0.0, 0.2), 4.0, complete=False),
        ],  # cut short: left out
        scalars={f"task/{A}/episode_return": curve(3, 100.0), "task/id": [(10, 0), (100, 0)]},
    )
    # The fresh arm: task B alone (explicit order [1]) for one switch period.
    for seed, value in FRESH_B.items():
        write_run(
            root / "fresh" / f"20260101-00000{seed}_seed{seed}",
            seed=seed,
            interventions=[],
            total=SWITCH,
            checkpoint=SWITCH,
            task_order=[1],
            rows=[row(B, 1, 0, value, value + 1, 9.0, (0.0, 0.0), 3.0)],
            scalars={f"task/{B}/episode_return": [(50, value), (100, value + 2)], "task/id": [(10, 1)]},
        )
    return root


def stat(frame: pd.DataFrame, index: int, arm: str, metric: str) -> pd.Series:
    (found,) = [r for _, r in frame.iterrows() if (r["index"], r["arm"], r["metric"]) == (index, arm, metric)]
    return found


# -- statistics -----------------------------------------------------------------------------------


def test_iqm_is_the_mean_of_the_middle_half():
    assert iqm(np.arange(1, 9)) == pytest.approx(4.5)  # mean of 3, 4, 5, 6
    assert iqm(np.array([1.0, 2.0, 3.0, 100.0])) == pytest.approx(2.5)
    assert iqm(np.array([5.0, np.nan, 7.0])) == pytest.approx(6.0)  # NaN left out; n=2 trims nothing


def test_bootstrap_interval_matches_an_independent_percentile_bootstrap():
    x = np.array([3.0, 7.0, 1.0, 9.0, 4.0, 6.0])
    s = summarize(x, n_resamples=20_000, seed=0)
    assert s.n == 6 and s.mean == pytest.approx(x.mean()) and s.iqm == pytest.approx(sps.trim_mean(x, 0.25))
    assert x.min() <= s.ci_low < s.mean < s.ci_high <= x.max()
    rng = np.random.default_rng(123)
    means = x[rng.integers(0, len(x), (50_000, len(x)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    assert s.ci_low == pytest.approx(low, abs=0.15) and s.ci_high == pytest.approx(high, abs=0.15)
    assert summarize(np.array([1.0, np.nan, 3.0])).n == 2
    one = summarize(np.array([4.0]))
    assert one.mean == 4.0 and np.isnan(one.ci_low) and np.isnan(one.ci_high)


def test_band_per_point_uses_the_runs_that_reach_it():
    m = np.array([[1.0, 2.0, np.nan], [3.0, 4.0, 5.0], [5.0, 9.0, np.nan]])
    b = band(m, n_resamples=5_000)
    assert b["n"].tolist() == [3, 3, 1]
    np.testing.assert_allclose(b["mean"], [3.0, 5.0, 5.0])
    assert b["ci_low"][0] <= 3.0 <= b["ci_high"][0] and np.isnan(b["ci_low"][2])
    # The same interval as summarize() on that column alone.
    col = summarize(m[:, 1], n_resamples=5_000)
    assert (b["ci_low"][1], b["ci_high"][1]) == pytest.approx((col.ci_low, col.ci_high))


def test_interpolation_is_linear_and_never_extrapolates():
    out = interpolate(np.array([10, 20, 40]), np.array([1.0, 3.0, 7.0]), np.array([0.0, 10, 15, 30, 40, 50]))
    np.testing.assert_allclose(out, [np.nan, 1.0, 2.0, 5.0, 7.0, np.nan])


# -- the report -------------------------------------------------------------------------------------


def test_report_tables_match_hand_computed_statistics(runs: Path, tmp_path: Path):
    report = make_report(runs, tmp_path / "out", points=5, n_resamples=4_000)
    stats = pd.read_csv(tmp_path / "out" / "visits.csv")

    # Visit 1 (task A): none's mean return over seeds 0-2; reset's also has the incomplete run's visit 1.
    s = stat(stats, 1, "none", "mean_return")
    assert (s["n"], s["task"], s["visit"]) == (3, A, 1)
    assert s["mean"] == pytest.approx(np.mean([10, 12, 20]))
    assert s["iqm"] == pytest.approx(sps.trim_mean([10, 12, 20], 0.25))
    assert 10 <= s["ci_low"] <= s["mean"] <= s["ci_high"] <= 20
    r = stat(stats, 1, "reset", "final_return")
    assert r["n"] == 4 and r["mean"] == pytest.approx(np.mean([12, 14, 16, 18]))
    assert r["iqm"] == pytest.approx(np.mean([14, 16]))
    assert stat(stats, 2, "reset", "mean_return")["n"] == 3  # the incomplete run never reached visit 2

    # Probes at the end of the visit: a multi-layer probe is averaged over layers; NaN NC1 is left out.
    assert stat(stats, 1, "none", "dormant")["mean"] == pytest.approx(0.2)
    assert stat(stats, 1, "none", "dormant/q_net.3")["mean"] == pytest.approx(0.3)
    assert stat(stats, 1, "none", "erank")["mean"] == pytest.approx(3.0)
    nc1 = stat(stats, 1, "none", "nc1")
    assert nc1["n"] == 2 and nc1["mean"] == pytest.approx(1.5)

    # The fresh arm stands beside the visit of its task (B is visit 2), not beside task A's.
    fresh = stat(stats, 2, "fresh", "mean_return")
    assert fresh["n"] == 3 and fresh["mean"] == pytest.approx(np.mean(list(FRESH_B.values())))
    assert not ((stats["index"] == 1) & (stats["arm"] == "fresh")).any()

    md = (tmp_path / "out" / "report.md").read_text()
    assert "### 1. cartpole/length=0.5, visit 1 (steps 0–100)" in md
    assert "### 2. cartpole/length=1.5, visit 1 (steps 100–200)" in md
    none_row = next(line for line in md.splitlines() if line.startswith("| none | 3 | 14.00 ["))
    assert "| 14.00 |" in none_row  # the IQM of 10, 12, 20 (nothing trimmed with three) is their mean
    section2 = md.split("### 2.")[1]
    assert "| fresh | 3 | 34.00 [" in section2
    # The incomplete run is named, with how far it got.
    assert "**Incomplete runs**" in md and "reset/20260101-000003_seed3" in md and "at step 100 of 200" in md
    assert [r.path.name for r in report.incomplete] == ["20260101-000003_seed3"]
    runs_csv = pd.read_csv(tmp_path / "out" / "runs.csv")
    assert runs_csv["complete"].sum() == 9 and len(runs_csv) == 10


def test_report_across_the_sequence_raw_and_relative_to_fresh(runs: Path, tmp_path: Path):
    make_report(runs, tmp_path / "out", points=5, n_resamples=4_000)
    seq = pd.read_csv(tmp_path / "out" / "sequence.csv").set_index(["arm", "metric"])
    fresh_b = np.mean(list(FRESH_B.values()))
    # Visit 2 (task B) is the only one after the first; the incomplete reset run never completed it.
    for arm, table in (("none", NONE), ("reset", RESET)):
        later = np.array([rb for _, rb in table.values()])
        raw, rel = seq.loc[(arm, "mean_return")], seq.loc[(arm, "mean_return/fresh")]
        assert (raw["n"], raw["visits"]) == (3, 1)
        assert raw["mean"] == pytest.approx(later.mean()) and raw["iqm"] == pytest.approx(sps.trim_mean(later, 0.25))
        assert rel["mean"] == pytest.approx((later / fresh_b).mean())
        # The interval resamples the runs and the fresh seeds independently: an independent bootstrap.
        rng = np.random.default_rng(7)
        fresh = np.array(list(FRESH_B.values()))
        ratios = later[rng.integers(0, 3, (100_000, 3))].mean(axis=1) / fresh[rng.integers(0, 3, (100_000, 3))].mean(
            axis=1
        )
        low, high = np.percentile(ratios, [2.5, 97.5])
        assert rel["ci_low"] == pytest.approx(low, abs=0.01) and rel["ci_high"] == pytest.approx(high, abs=0.01)
    # The final return (each visit's last episodes; the fixture's is the mean return + 1) likewise.
    assert seq.loc[("none", "final_return")]["mean"] == pytest.approx(7.0)
    assert seq.loc[("none", "final_return/fresh")]["mean"] == pytest.approx(np.mean(np.array([5, 7, 9]) / 35))
    fresh = seq.loc[("fresh", "mean_return/fresh")]
    assert fresh["n"] == 3 and fresh["mean"] == pytest.approx(1.0)
    assert seq.loc[("fresh", "mean_return")]["mean"] == pytest.approx(fresh_b)
    md = (tmp_path / "out" / "report.md").read_text()
    section = md.split("## Across the sequence")[1].split("## Task visits")[0]
    assert "over the visits after the first (cartpole/length=1.5 in the common order" in section
    assert "| none | 3 | 6.00 [" in section and f"| {0.176:.3f} [" in section.split("| none |")[1]


def test_relative_summary_resamples_runs_and_fresh_seeds():
    returns = np.array([[2.0, 6.0], [4.0, 3.0], [3.0, 9.0]])  # 3 runs x 2 visits
    tasks = np.array([[0, 1], [1, 0], [0, 1]])  # run 1 met the tasks the other way round
    fresh = np.array([[4.0, 6.0], [6.0, 9.0], [2.0, 12.0]])  # 3 fresh seeds x 2 tasks
    base = np.array([4.0, 9.0])  # their mean per task
    per_run = [(2 / base[0] + 6 / base[1]) / 2, (4 / base[1] + 3 / base[0]) / 2, (3 / base[0] + 9 / base[1]) / 2]
    s = relative_summary(returns, tasks, fresh, n_resamples=4_000, seed=1)
    assert (s.n, s.mean, s.iqm) == (3, pytest.approx(np.mean(per_run)), pytest.approx(np.mean(per_run)))
    rng = np.random.default_rng(11)
    draws = []
    for _ in range(20_000):
        runs, seeds = rng.integers(0, 3, 3), rng.integers(0, 3, 3)
        b = fresh[seeds].mean(axis=0)
        draws.append(np.mean(returns[runs] / b[tasks[runs]]))
    low, high = np.percentile(draws, [2.5, 97.5])
    assert s.ci_low == pytest.approx(low, abs=0.03) and s.ci_high == pytest.approx(high, abs=0.03)
    one = relative_summary(returns[:1], tasks[:1], fresh)
    assert one.n == 1 and one.mean == pytest.approx(per_run[0]) and np.isnan(one.ci_low)
    # One fresh seed: its values are the baseline, taken as exact; only the runs are resampled.
    exact = relative_summary(returns, tasks, fresh[:1], n_resamples=4_000, seed=1)
    assert exact.mean == pytest.approx(np.mean(returns / fresh[0][tasks]))
    assert exact.ci_low < exact.mean < exact.ci_high


def test_sequence_table_drops_each_runs_own_first_visit(tmp_path: Path):
    # Two seeds meet the tasks in opposite orders (a random order per seed): each drops its own first visit.
    root = tmp_path / "runs"
    for seed, order in ((0, (A, B)), (1, (B, A))):
        rows = [
            row(task, 1, i * SWITCH, 10.0 * (i + 1) + seed, 0.0, 2.0, (0.1, 0.1), 1.0) for i, task in enumerate(order)
        ]
        write_run(
            root / "none" / f"20260101-00000{seed}_seed{seed}",
            seed=seed,
            interventions=[],
            total=200,
            checkpoint=200,
            rows=rows,
            scalars={"task/id": [(10, 0)]},
        )
    for seed in (0, 1):
        for k, (task, value) in enumerate(((A, 10.0), (B, 40.0))):
            write_run(
                root / "fresh" / f"2026010{k}-00000{seed}_seed{seed}",
                seed=seed,
                interventions=[],
                total=SWITCH,
                checkpoint=SWITCH,
                task_order=[k],
                rows=[row(task, 1, 0, value + seed, 0.0, 2.0, (0.1, 0.1), 1.0)],
                scalars={"task/id": [(10, k)]},
            )
    make_report(root, tmp_path / "out", points=5, n_resamples=1_000)
    seq = pd.read_csv(tmp_path / "out" / "sequence.csv").set_index(["arm", "metric"])
    # Seed 0's later visit is B with return 20; seed 1's is A with 21. Fresh means: A 10.5, B 40.5.
    assert seq.loc[("none", "mean_return")]["mean"] == pytest.approx(20.5)
    assert seq.loc[("none", "mean_return/fresh")]["mean"] == pytest.approx((20 / 40.5 + 21 / 10.5) / 2)


def test_report_curves_interpolated_averaged_and_fresh_aligned(runs: Path, tmp_path: Path):
    make_report(runs, tmp_path / "out", points=5, n_resamples=2_000)  # grid: 0, 50, 100, 150, 200
    curves = pd.read_csv(tmp_path / "out" / "curves.csv")

    def point(metric: str, arm: str, step: float) -> pd.Series:
        (found,) = [r for _, r in curves.iterrows() if (r["metric"], r["arm"], r["step"]) == (metric, arm, step)]
        return found

    # The current task's return: task A's points up to 100, task B's after.
    assert point("train_return", "none", 50.0)["mean"] == pytest.approx(np.mean([0, 1, 2]))
    assert point("train_return", "none", 100.0)["mean"] == pytest.approx(np.mean([0, 2, 4]))
    assert point("train_return", "none", 150.0)["mean"] == pytest.approx(np.mean([0, 10, 20]))
    # reset: the incomplete run (seed 3) counts until its last log (step 100), not after.
    assert point("train_return", "reset", 100.0)["n"] == 4 and point("train_return", "reset", 150.0)["n"] == 3
    assert point("train_return", "reset", 100.0)["mean"] == pytest.approx(np.mean([100, 102, 104, 106]))
    # The fresh runs on task B are placed where the continual runs meet B (step 100): their step 50 -> 150.
    assert point("train_return", "fresh", 150.0)["mean"] == pytest.approx(np.mean(list(FRESH_B.values())))
    assert point("train_return", "fresh", 200.0)["mean"] == pytest.approx(np.mean(list(FRESH_B.values())) + 2)
    assert not ((curves["arm"] == "fresh") & (curves["step"] < 100)).any()
    band_point = point("train_return", "none", 150.0)
    assert band_point["ci_low"] <= band_point["mean"] <= band_point["ci_high"]
    # A probe curve, per layer: erank/value_head at step 150 is halfway between its logs at 100 and 200.
    assert point("erank/value_head", "none", 150.0)["mean"] == pytest.approx(np.mean([2.5, 3.5, 4.5]))

    for name in ("train_return.png", "erank.png"):
        data = (tmp_path / "out" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000
    assert not (tmp_path / "out" / "dormant.png").exists()  # no dormant curve was logged
    assert not (tmp_path / "out" / "return.png").exists()  # nor an evaluation return


def test_report_rebuilds_visits_from_events_without_task_summary(tmp_path: Path):
    root = tmp_path / "runs"
    write_run(
        root / "run" / "20260101-000000_seed0",
        seed=0,
        interventions=["l2"],
        total=200,
        checkpoint=200,
        rows=None,
        scalars={
            "task/id": [(20, 0), (60, 0), (100, 1), (140, 1), (200, 0)],
            f"task/{A}/episode_return": [(20, 1.0), (60, 3.0), (100, 8.0)],
            f"task/{B}/episode_return": [(140, 5.0), (200, 7.0)],
            "plasticity/dormant/q_net.1@probe_set": [(50, 0.1), (100, 0.2), (200, 0.6)],
        },
    )
    make_report(root, tmp_path / "out", points=5, n_resamples=1_000)
    visits = pd.read_csv(tmp_path / "out" / "visits_by_run.csv")
    assert visits["arm"].tolist() == ["l2", "l2"] and visits["source"].tolist() == ["events", "events"]
    assert visits["task"].tolist() == [A, B] and visits["start_step"].tolist() == [0, 100]
    assert visits["end_step"].tolist() == [100, 200] and visits["complete"].tolist() == [True, True]
    assert visits["mean_return"].tolist() == pytest.approx([4.0, 6.0])
    assert visits["final_return"].tolist() == pytest.approx([8.0, 7.0])
    assert visits["dormant/q_net.1"].tolist() == pytest.approx([0.2, 0.6])


def test_report_takes_arms_failures_and_pending_trials_from_the_sweep_manifest(tmp_path: Path):
    sweep = tmp_path / "sweep"
    scalars = {"task/id": [(10, 0), (100, 1)], f"task/{A}/episode_return": [(50, 1.0)]}
    write_run(
        sweep / "layer_norm" / "20260101-000000_seed0",
        seed=0,
        interventions=[],
        total=200,
        checkpoint=200,
        rows=None,
        scalars=scalars,
        layer_norm=True,
    )
    write_run(
        sweep / "plain" / "20260101-000000_seed0",
        seed=0,
        interventions=[],
        total=200,
        checkpoint=200,
        rows=None,
        scalars=scalars,
    )
    # A running trial has its run directory but no run_dir in the manifest yet (it is set when the trial ends).
    write_run(
        sweep / "plain" / "20260101-000000_seed3",
        seed=3,
        interventions=[],
        total=200,
        checkpoint=100,
        rows=None,
        scalars=scalars,
    )
    trials = {
        "layer_norm/seed0": {
            "label": "layer_norm",
            "seed": 0,
            "arm": "layer_norm",
            "task": None,
            "status": "finished",
            "run_dir": "layer_norm/20260101-000000_seed0",
        },
        "plain/seed0": {
            "label": "plain",
            "seed": 0,
            "arm": "baseline",
            "task": None,
            "status": "finished",
            "run_dir": "plain/20260101-000000_seed0",
        },
        "plain/seed1": {
            "label": "plain",
            "seed": 1,
            "arm": "baseline",
            "task": None,
            "status": "failed",
            "run_dir": None,
            "error": "rlp: error: something broke (exit 3)",
        },
        "plain/seed2": {
            "label": "plain",
            "seed": 2,
            "arm": "baseline",
            "task": None,
            "status": "pending",
            "run_dir": None,
        },
        "plain/seed3": {
            "label": "plain",
            "seed": 3,
            "arm": "baseline",
            "task": None,
            "status": "pending",
            "run_dir": None,
        },
    }
    (sweep / "sweep.json").write_text(json.dumps({"trials": trials, "arms_order": ["baseline", "layer_norm"]}))
    make_report(sweep, None, points=5, n_resamples=1_000)
    md = (sweep / "report" / "report.md").read_text()
    runs_csv = pd.read_csv(sweep / "report" / "runs.csv")
    assert sorted(runs_csv["arm"]) == ["baseline", "baseline", "layer_norm"]  # not "none", as the configs alone say
    assert md.index("| baseline |") < md.index("| layer_norm |")  # the sweep's arm order
    assert "`plain/seed1`: rlp: error: something broke (exit 3)" in md
    assert "**Trials not started yet** (sweep.json): `plain/seed2`\n" in md  # not the running seed3
    assert "`plain/20260101-000000_seed3` (baseline, seed 3): at step 100 of 200" in md


def test_report_on_runs_that_completed_no_visit_yet(tmp_path: Path):
    # A sweep stopped early: each run is inside its first visit, so no visit is complete yet.
    root = tmp_path / "runs"
    for seed in (0, 1):
        write_run(
            root / "none" / f"20260101-00000{seed}_seed{seed}",
            seed=seed,
            interventions=[],
            total=200,
            checkpoint=60 if seed == 0 else None,
            rows=None,
            scalars={"task/id": [(20, 0), (60, 0)], f"task/{A}/episode_return": [(20, 5.0 + seed), (60, 7.0 + seed)]},
        )
    result = CliRunner().invoke(cli, ["report", str(root), "--points", "5", "--resamples", "200"])
    assert result.exit_code == 0, result.output
    assert "report: 2 runs, 2 incomplete" in result.output
    md = (root / "report" / "report.md").read_text()
    assert "at step 60 of 200" in md and "no checkpoint yet (of 200 steps)" in md
    assert "No run has completed this visit yet." in md
    # Their curves so far: at step 50 (grid 0, 50, ..., 200), 3/4 of the way from their step-20 to step-60 logs.
    curves = pd.read_csv(root / "report" / "curves.csv")
    assert curves["step"].tolist() == [50.0] and curves["n"].tolist() == [2]
    assert curves["mean"].tolist() == pytest.approx([np.mean([6.5, 7.5])])


def test_visit_span_comes_from_the_runs_that_completed_it(tmp_path: Path):
    # One run complete, two stopped inside visit 1 (rebuilt from their events, ending at their last log):
    # the median over all three would put visit 1's end at step 60.
    root = tmp_path / "runs"
    rows = [row(A, 1, 0, 5.0, 6.0, 2.0, (0.1, 0.3), 1.0), row(B, 1, SWITCH, 4.0, 5.0, 2.0, (0.1, 0.3), 1.0)]
    scalars = {"task/id": [(20, 0), (100, 1), (200, 1)], f"task/{A}/episode_return": [(20, 5.0)]}
    write_run(root / "none" / "20260101-000000_seed0", seed=0, interventions=[], total=200, checkpoint=200,
              rows=rows, scalars=scalars)  # fmt: skip
    for seed, last in ((1, 40), (2, 60)):
        write_run(
            root / "none" / f"20260101-00000{seed}_seed{seed}",
            seed=seed,
            interventions=[],
            total=200,
            checkpoint=None,
            rows=None,
            scalars={"task/id": [(20, 0), (last, 0)], f"task/{A}/episode_return": [(20, 5.0), (last, 6.0)]},
        )
    result = CliRunner().invoke(cli, ["report", str(root), "--points", "5", "--resamples", "200"])
    assert result.exit_code == 0, result.output
    md = (root / "report" / "report.md").read_text()
    assert f"### 1. {A}, visit 1 (steps 0–{SWITCH})" in md
    assert f"### 2. {B}, visit 1 (steps {SWITCH}–{2 * SWITCH})" in md


def test_config_arm_without_manifest(tmp_path: Path):
    from rl_plasticity.report.runs import config_arm

    assert config_arm({"interventions": []}) == ("none", "continual")
    assert config_arm({"interventions": ["l2", "reset"], "net": {"layer_norm": True}}) == (
        "l2+reset+layer_norm",
        "continual",
    )
    assert config_arm({"env": {"order": "explicit", "task_order": [2]}}) == ("fresh", "fresh")
    assert config_arm({"env": {"order": "explicit", "task_order": [0, 1]}})[1] == "continual"


@pytest.mark.parametrize("make", ["missing", "empty"])
def test_report_bad_input_one_line_exit_2_nothing_written(tmp_path: Path, make: str):
    target = tmp_path / "runs"
    if make == "empty":
        (target / "nothing_here").mkdir(parents=True)
    result = CliRunner().invoke(cli, ["report", str(target), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rlp: error: RUNS_DIR: "), result.stderr
    assert not (tmp_path / "out").exists()


def test_report_cli_names_incomplete_runs(runs: Path, tmp_path: Path):
    result = CliRunner().invoke(
        cli, ["report", str(runs), "--out", str(tmp_path / "out"), "--points", "5", "--resamples", "1000"]
    )
    assert result.exit_code == 0, result.output
    assert "report: 10 runs, 1 incomplete: " in result.output and "20260101-000003_seed3" in result.output
    assert str(tmp_path / "out" / "report.md") in result.output


# -- NC1 and return ----------------------------------------------------------------------------------
def test_correlation_row_against_hand_formulas():
    rng = np.random.default_rng(0)
    x = rng.normal(size=30)
    y = -0.8 * x + rng.normal(scale=0.5, size=30)
    got = correlation_row("s", "mean return", np.append(x, np.nan), np.append(y, 1.0))  # the NaN pair is dropped
    r = np.corrcoef(x, y)[0, 1]
    z, se = np.arctanh(r), 1 / np.sqrt(len(x) - 3)  # Fisher's z interval
    assert got["n"] == 30 and got["pearson_r"] == pytest.approx(r)
    assert (got["ci_low"], got["ci_high"]) == pytest.approx((np.tanh(z - 1.959964 * se), np.tanh(z + 1.959964 * se)))
    ranks = lambda v: np.argsort(np.argsort(v))  # noqa: E731  (no ties here)
    assert got["spearman_rho"] == pytest.approx(np.corrcoef(ranks(x), ranks(y))[0, 1])
    assert correlation_row("s", "r", [1, 2, 3], [3, 2, 1])["pearson_r"] == pytest.approx(-1.0)
    assert np.isnan(correlation_row("s", "r", [2, 2, 2], [1, 2, 3])["pearson_r"])  # no spread in NC1
    assert np.isnan(correlation_row("s", "r", [1, 2], [1, 2])["pearson_r"])  # too few visits


def test_report_nc1_return_correlation_over_complete_continual_visits(runs: Path, tmp_path: Path):
    make_report(runs, tmp_path / "out", points=5, n_resamples=500)
    table = pd.read_csv(tmp_path / "out" / "correlation.csv")
    # By hand from the fixture: complete continual visits with a finite NC1 (none seed 2's visit A has none,
    # the incomplete reset run's visit B was cut short, the fresh arm is not continual).
    a_pairs = [(1.0 + s, NONE[s][0]) for s in (0, 1)] + [(1.0 + s, RESET[s][0]) for s in RESET] + [(4.0, 17.0)]
    pairs = a_pairs + [(2.0, NONE[s][1]) for s in NONE] + [(2.0, RESET[s][1]) for s in RESET]
    x, y = np.array(pairs).T
    pooled = table[(table["scope"] == "all visits") & (table["return"] == "mean return")].iloc[0]
    assert pooled["n"] == len(pairs) == 12
    assert pooled["pearson_r"] == pytest.approx(np.corrcoef(x, y)[0, 1])
    assert pooled["spearman_rho"] == pytest.approx(sps.spearmanr(x, y).statistic)
    task_a = table[table["scope"] == f"task {A}"].iloc[0]
    assert task_a["n"] == 6 and task_a["pearson_r"] == pytest.approx(np.corrcoef(*np.array(a_pairs).T)[0, 1])
    assert np.isnan(table[table["scope"] == f"task {B}"].iloc[0]["pearson_r"])  # NC1 is 2.0 in every B visit
    # Relative to the fresh arm: only task B has one, and its NC1 has no spread.
    relative = table[table["return"] == "mean return / fresh mean return"].iloc[0]
    assert relative["n"] == 6 and np.isnan(relative["pearson_r"])
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## NC1 and return across task visits" in md and "| all visits | mean return | 12 |" in md
    assert "falls back to the **training returns**" in md  # these runs logged no evaluation
    assert (tmp_path / "out" / "nc1_vs_return.png").stat().st_size > 0


# -- probes at a switch against the next visit's return ----------------------------------------------------
def visits_frame() -> pd.DataFrame:
    """Visit rows as the report builds them: two arms of three runs over tasks X -> Y -> Z, and fresh runs."""
    rng = np.random.default_rng(1)
    out = []
    for arm, shift in (("none", 0.0), ("cchain", 5.0)):
        for seed in range(3):
            run = f"{arm}/seed{seed}"
            for visit, task in enumerate("XYZ"):
                out.append(
                    {
                        "run": run,
                        "kind": "continual",
                        "arm": arm,
                        "seed": seed,
                        "task": task,
                        "start_step": 100 * visit,
                        "end_step": 100 * (visit + 1),
                        "complete": not (run == "cchain/seed2" and task == "Y"),  # cut short: no pair
                        "eval_mean": shift + rng.normal(),
                        "erank/value_head": shift + rng.normal(),
                        "eval_return/X": 123.0,  # a return, not a probe
                    }
                )
    for task, value in (("Y", 2.0), ("Y", 6.0), ("Z", 10.0), ("X", 1.0), ("X", 3.0)):  # fresh means: X 2, Y 4, Z 10
        out.append(
            {
                "run": f"fresh/{task}{value}" if value != 3.0 else "fresh/X1.0",  # two visits: still no pair
                "kind": "fresh",
                "arm": "fresh",
                "task": task,
                "start_step": 0 if value != 3.0 else 100,
                "end_step": 100 if value != 3.0 else 200,
                "complete": True,
                "eval_mean": value,
                "erank/value_head": 50.0,
                "num_classes/value_head": 3.0,  # NC's class count, not a probe
            }
        )
    return pd.DataFrame(out).sample(frac=1.0, random_state=0)  # the report's rows need not be in order


def test_probe_lead_pairs_each_switch_and_separates_arms_from_within_arm():
    rows = visits_frame()
    table = probe_lead_correlations(rows, "eval_mean")
    assert list(table["probe"]) == ["(return at the switch)", "erank/value_head"]  # eval_return/X is a return
    got = table.iloc[1]
    # By hand: each complete continual run's switches X->Y and Y->Z; the probe from the earlier visit, the
    # later visit's return over the fresh networks' mean on its task; cchain seed 2 (Y cut short) has none.
    x, y, arm, switch, before = [], [], [], [], []
    fresh = {"X": 2.0, "Y": 4.0, "Z": 10.0}
    for name, visits in rows[rows["kind"] == "continual"].groupby("run"):
        if name == "cchain/seed2":
            continue
        v = visits.sort_values("start_step")
        for i in (0, 1):
            x.append(v["erank/value_head"].iloc[i])
            y.append(v["eval_mean"].iloc[i + 1] / fresh[v["task"].iloc[i + 1]])
            before.append(v["eval_mean"].iloc[i] / fresh[v["task"].iloc[i]])
            arm.append(v["arm"].iloc[0])
            switch.append(i + 1)
    x, y, arm, switch = np.array(x), np.array(y), np.array(arm), np.array(switch)
    assert got["n"] == len(x) == 10 and got["arms"] == 2
    assert got["return"] == "next visit's eval return over the visit / fresh"
    assert got["pearson_r"] == pytest.approx(np.corrcoef(x, y)[0, 1])
    assert got["pearson_r"] > 0.5  # the arms' shift moves both
    # Within arms, independently: least squares of y on x with one intercept per arm (n - 3 dof).
    design = np.column_stack([x, arm == "none", arm == "cchain"]).astype(float)
    beta, res, *_ = np.linalg.lstsq(design, y, rcond=None)
    dof = len(y) - 3
    cov = res[0] / dof * np.linalg.inv(design.T @ design)
    t = beta[0] / np.sqrt(cov[0, 0])
    assert got["within_p"] == pytest.approx(2 * sps.t.sf(abs(t), dof))
    r = t / np.sqrt(t * t + dof)  # the partial correlation from the slope's t
    assert got["within_r"] == pytest.approx(r)
    half = 1.959964 / np.sqrt(len(y) - 2 - 2)  # Fisher's z, one covariate per arm beyond the first
    assert (got["within_ci_low"], got["within_ci_high"]) == pytest.approx(
        (np.tanh(np.arctanh(r) - half), np.tanh(np.arctanh(r) + half))
    )
    assert abs(got["within_r"]) < got["pearson_r"]  # noise inside an arm: no warning there
    # Within arm and switch: one intercept per (arm, switch) cell, 4 cells.
    cells = [(a, k) for a in ("none", "cchain") for k in (1, 2)]
    design = np.column_stack([x] + [(arm == a) & (switch == k) for a, k in cells]).astype(float)
    beta, res, *_ = np.linalg.lstsq(design, y, rcond=None)
    dof = len(y) - 5
    t = beta[0] / np.sqrt(res[0] / dof * np.linalg.inv(design.T @ design)[0, 0])
    assert got["switch_p"] == pytest.approx(2 * sps.t.sf(abs(t), dof))
    assert got["switch_r"] == pytest.approx(t / np.sqrt(t * t + dof))
    # The reference row: the earlier visit's return relative to fresh in the probe's place.
    reference = table.iloc[0]
    assert reference["n"] == 10 and reference["pearson_r"] == pytest.approx(np.corrcoef(before, y)[0, 1])


def test_probe_lead_without_fresh_uses_the_raw_return_and_needs_a_switch():
    rows = visits_frame()
    table = probe_lead_correlations(rows[rows["kind"] != "fresh"], "eval_mean")
    assert table.iloc[0]["return"] == "next visit's eval return over the visit"
    one_visit = rows[(rows["kind"] != "fresh") & (rows["task"] == "X")]
    assert probe_lead_correlations(one_visit, "eval_mean").empty
    # One run: two switches, too few for a correlation; the report says so in one line instead of a table of dashes.
    one_run = probe_lead_correlations(rows[rows["run"] == "none/seed0"], "eval_mean")
    assert one_run["n"].max() == 2 and one_run["pearson_r"].isna().all()
    assert _lead_lines(one_run)[-2] == "Too few switches for a correlation yet (2; at least 3 with some spread)."


def test_report_writes_the_probe_lead_table(runs: Path, tmp_path: Path):
    make_report(runs, tmp_path / "out", points=5, n_resamples=500)
    table = pd.read_csv(tmp_path / "out" / "lead.csv").set_index("probe")
    # The fixture's switches: none and reset seeds 0-2 (the incomplete reset run has none); erank at A's end is
    # 2 + seed, the next return B's training return over the fresh networks' mean on B (34).
    x = [2.0 + s for s in NONE] + [2.0 + s for s in RESET]
    y = [NONE[s][1] / 34.0 for s in NONE] + [RESET[s][1] / 34.0 for s in RESET]
    erank = table.loc["erank/value_head"]
    assert erank["n"] == 6 and erank["arms"] == 2
    assert erank["pearson_r"] == pytest.approx(np.corrcoef(x, y)[0, 1])
    assert erank["within_r"] == pytest.approx(1.0)  # inside each arm the return rises with the seed, as erank
    assert np.isnan(table.loc["kfac_eps_rank/q_net.0", "pearson_r"])  # 0.5 everywhere: no spread
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## Probes at a switch and the next task's return" in md and "| `erank/value_head` | 6 | 2 |" in md


# -- evaluation returns ------------------------------------------------------------------------------------
# Per arm and seed: evaluation returns at the end of visit 1 (task A) and visit 2 (task B).
EVAL_NONE = {0: (5.0, 2.0), 1: (7.0, 4.0)}
EVAL_RESET = {0: (6.0, 9.0), 1: (8.0, 13.0)}
EVAL_FRESH_B = {0: 10.0, 1: 14.0}


def write_eval_fresh_b(run_dir: Path, seed: int, value: float) -> Path:
    """A fresh run on task B alone, with evaluation: its return is ``value`` at the end."""
    return write_run(
        run_dir,
        seed=seed,
        interventions=[],
        total=SWITCH,
        checkpoint=SWITCH,
        task_order=[1],
        rows=[{**row(B, 1, 0, 90.0, 91.0, 9.0, (0.0, 0.0), 3.0), "eval_return": value}],
        scalars={
            f"task/{B}/episode_return": [(50, 90.0)],
            "task/id": [(10, 1)],
            "eval/mean_return": [(0, 0.0), (100, value)],
            f"eval/{B}/mean_return": [(0, 0.0), (100, value)],
            f"eval/{A}/mean_return": [(0, 3.0), (100, 3.0)],
        },
    )


@pytest.fixture
def eval_runs(tmp_path: Path) -> Path:
    root = tmp_path / "eval_runs"
    for arm, table, ivs in (("none", EVAL_NONE, []), ("reset", EVAL_RESET, ["reset"])):
        for seed, (ea, eb) in table.items():
            rows = [
                {**row(A, 1, 0, 50.0 + seed, 51.0, 2.0, (0.1, 0.3), 1.0 + seed), "eval_return": ea},
                {**row(B, 1, SWITCH, 60.0 + seed, 61.0, 3.0, (0.2, 0.4), 3.0 + ea), "eval_return": eb},
            ]
            scalars = {
                f"task/{A}/episode_return": curve(seed, 0.0),
                "task/id": [(10, 0), (100, 1), (200, 0)],
                "eval/mean_return": [(0, 0.0), (100, ea), (200, eb)],
                f"eval/{A}/mean_return": [(0, 0.0), (100, ea), (200, ea - 1)],
                f"eval/{B}/mean_return": [(0, 1.0), (100, 1.0), (200, eb)],
            }
            write_run(
                root / arm / f"20260101-00000{seed}_seed{seed}",
                seed=seed,
                interventions=ivs,
                total=200,
                checkpoint=200,
                rows=rows,
                scalars=scalars,
            )
    for seed, value in EVAL_FRESH_B.items():
        write_eval_fresh_b(root / "fresh" / f"20260101-00000{seed}_seed{seed}", seed, value)
    return root


def test_report_leads_with_evaluation_returns(eval_runs: Path, tmp_path: Path):
    make_report(eval_runs, tmp_path / "out", points=3, n_resamples=1_000)  # grid: 0, 100, 200
    out = tmp_path / "out"
    stats = pd.read_csv(out / "visits.csv")
    assert stat(stats, 2, "reset", "eval_return")["mean"] == pytest.approx(11.0)
    assert stat(stats, 2, "fresh", "eval_return")["mean"] == pytest.approx(12.0)
    md = (out / "report.md").read_text()
    assert "## Whole run" in md and md.index("## Whole run") < md.index("## Across the sequence")
    assert stat(stats, 2, "reset", "mean_return")["mean"] == pytest.approx(60.5)  # training return kept
    seq = pd.read_csv(out / "sequence.csv").set_index(["arm", "metric"])
    # Relative to fresh, on evaluation returns: visit 2 (task B) over the fresh arm's mean eval return (12).
    assert seq.loc[("none", "eval_return")]["mean"] == pytest.approx(3.0)
    assert seq.loc[("none", "eval_return/fresh")]["mean"] == pytest.approx(np.mean([2 / 12, 4 / 12]))
    assert seq.loc[("reset", "eval_return/fresh")]["mean"] == pytest.approx(np.mean([9 / 12, 13 / 12]))
    assert seq.loc[("none", "mean_return/fresh")]["mean"] == pytest.approx(np.mean([60 / 90, 61 / 90]))
    # eval_mean: the mean of the visit's rounds of its task, both ends included. Task A's visit [0, 100] has
    # rounds 0 and ea: ea / 2; task B's visit [100, 200] has 1 and eb; the fresh B run [0, 100] has 0 and value.
    visits = pd.read_csv(out / "visits_by_run.csv")
    none0 = visits[(visits["arm"] == "none") & (visits["seed"] == 0)].set_index("task")["eval_mean"]
    assert none0[A] == pytest.approx(EVAL_NONE[0][0] / 2) and none0[B] == pytest.approx((1 + EVAL_NONE[0][1]) / 2)
    fresh_b = np.mean([v / 2 for v in EVAL_FRESH_B.values()])
    assert stat(stats, 2, "fresh", "eval_mean")["mean"] == pytest.approx(fresh_b)
    assert seq.loc[("none", "eval_mean/fresh")]["mean"] == pytest.approx(
        np.mean([(1 + EVAL_NONE[s][1]) / 2 / fresh_b for s in (0, 1)])
    )
    # The whole run (C-CHAIN's Table 4 form): per run the mean of eval_mean over both visits; mean +- s.e.
    whole_csv = pd.read_csv(out / "whole_run.csv")
    assert sorted(set(whole_csv["metric"])) == ["eval_mean", "eval_return"]
    whole = whole_csv[whole_csv["metric"] == "eval_mean"].set_index("arm")
    per_run = {
        arm: [np.mean([table[s][0] / 2, (1 + table[s][1]) / 2]) for s in (0, 1)]
        for arm, table in (("none", EVAL_NONE), ("reset", EVAL_RESET))
    }
    for arm, values in per_run.items():
        assert whole.loc[arm, "mean"] == pytest.approx(np.mean(values))
        assert whole.loc[arm, "sem"] == pytest.approx(np.std(values, ddof=1) / np.sqrt(2))
    assert whole.loc["reset", "vs_none"] == pytest.approx(np.mean(per_run["reset"]) / np.mean(per_run["none"]))
    assert "fresh" not in whole.index  # the fresh arm has task B only: no whole-run value
    # Beside it, the final-return reading: per run the mean of the evaluation at each visit's end.
    ends = whole_csv[whole_csv["metric"] == "eval_return"].set_index("arm")
    at_ends = {arm: [np.mean(table[s]) for s in (0, 1)] for arm, table in (("none", EVAL_NONE), ("reset", EVAL_RESET))}
    for arm, values in at_ends.items():
        assert ends.loc[arm, "mean"] == pytest.approx(np.mean(values))
        assert ends.loc[arm, "sem"] == pytest.approx(np.std(values, ddof=1) / np.sqrt(2))
    assert ends.loc["reset", "vs_none"] == pytest.approx(np.mean(at_ends["reset"]) / np.mean(at_ends["none"]))
    section = (out / "report.md").read_text().split("## Whole run", 1)[1]
    row = next(line for line in section.splitlines() if line.startswith("| reset | 2 |"))
    mean, sem = np.mean(at_ends["reset"]), np.std(at_ends["reset"], ddof=1) / np.sqrt(2)
    assert row.count("|") == 11 and row.split("|")[7:9] == [" 2 ", " 9.00 +- 1.50 "], row  # (7.5, 10.5) per run
    assert (mean, sem) == pytest.approx((9.0, 1.5))
    md = (out / "report.md").read_text()
    assert "The main return is the evaluation return over the visit" in md and "falls back" not in md
    over, end = "eval return over the visit", "eval return at its end"
    assert f"| arm | n | {over} | IQM | relative to fresh | IQM | {end} | relative to fresh | training return |" in md
    assert f"| arm | n | {over} | IQM | {end} | IQM | training return | IQM | final training return | IQM |" in md
    # The NC1 correlation on the main return (eval_mean); NC1 of visit B is 3 + eval return of A, by construction.
    table = pd.read_csv(out / "correlation.csv")
    pooled = table[(table["scope"] == "all visits") & (table["return"] == over)].iloc[0]
    nc1 = [1, 2, 1, 2] + [3 + EVAL_NONE[s][0] for s in (0, 1)] + [3 + EVAL_RESET[s][0] for s in (0, 1)]
    ret = (
        [EVAL_NONE[0][0] / 2, EVAL_NONE[1][0] / 2, EVAL_RESET[0][0] / 2, EVAL_RESET[1][0] / 2]
        + [(1 + EVAL_NONE[s][1]) / 2 for s in (0, 1)]
        + [(1 + EVAL_RESET[s][1]) / 2 for s in (0, 1)]
    )
    assert pooled["n"] == 8 and pooled["pearson_r"] == pytest.approx(np.corrcoef(nc1, ret)[0, 1])
    curves = pd.read_csv(out / "curves.csv")

    def point(metric: str, arm: str, step: float) -> float:
        (found,) = [
            r["mean"] for _, r in curves.iterrows() if (r["metric"], r["arm"], r["step"]) == (metric, arm, step)
        ]
        return found

    assert point("eval_return", "reset", 200.0) == pytest.approx(11.0)
    assert point(f"eval_task/{A}", "none", 200.0) == pytest.approx(5.0)  # forgetting: task A after visit 2
    assert point(f"eval_task/{B}", "fresh", 200.0) == pytest.approx(12.0)  # placed where B starts (100)
    assert not ((curves["metric"] == f"eval_task/{A}") & (curves["arm"] == "fresh")).any()  # not its task
    for name in ("return.png", "train_return.png", "eval_tasks.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_names_runs_without_evaluation(eval_runs: Path, tmp_path: Path):
    # An older run (no eval_return column, no eval tags) beside runs with evaluation.
    write_run(
        eval_runs / "none" / "20260101-000009_seed9",
        seed=9,
        interventions=[],
        total=200,
        checkpoint=200,
        rows=[row(A, 1, 0, 1.0, 1.0, 2.0, (0.1, 0.3), 1.0), row(B, 1, SWITCH, 1.0, 1.0, 3.0, (0.2, 0.4), 2.0)],
        scalars={"task/id": [(10, 0), (100, 1)]},
    )
    make_report(eval_runs, tmp_path / "out", points=3, n_resamples=500)
    md = (tmp_path / "out" / "report.md").read_text()
    assert "1 of 7 runs logged no evaluation return" in md and "20260101-000009_seed9" in md
    stats = pd.read_csv(tmp_path / "out" / "visits.csv")
    assert stat(stats, 2, "none", "eval_return")["n"] == 2 and stat(stats, 2, "none", "mean_return")["n"] == 3


# -- a fresh trial reused from a continual trial's first visit ---------------------------------------------


def reuse_sweep(root: Path, reuse: bool) -> Path:
    """A sweep of the none arm (seeds 0, 1) and the fresh arm on tasks A and B. Fresh on A is none's first visit:
    reused (``sweep.json``: ``status: reused``, no run of its own) or a real run that logged exactly that."""
    trials = {}

    def trial(label: str, seed: int, arm: str, task: str | None, run_dir: str | None, **extra) -> None:
        status = "finished" if run_dir else "reused"
        trials[f"{label}/seed{seed}"] = dict(label=label, seed=seed, arm=arm, task=task, status=status, run_dir=run_dir)
        trials[f"{label}/seed{seed}"].update(extra)

    for seed, (ea, eb) in EVAL_NONE.items():
        rows = [
            {**row(A, 1, 0, 50.0 + seed, 51.0, 2.0 + seed, (0.1, 0.3), 1.0 + seed), "eval_return": ea},
            {**row(B, 1, SWITCH, 60.0 + seed, 61.0, 3.0, (0.2, 0.4), 3.0 + ea), "eval_return": eb},
        ]
        scalars = {
            f"task/{A}/episode_return": curve(seed, 0.0),
            f"task/{B}/episode_return": [(150, 70.0 + seed), (200, 80.0)],
            "task/id": [(10, 0), (100, 1), (200, 0)],
            "eval/mean_return": [(0, 0.0), (50, ea / 2), (100, ea), (200, eb)],
            f"eval/{A}/mean_return": [(0, 0.0), (50, ea / 2), (100, ea), (200, ea - 1)],
            f"eval/{B}/mean_return": [(0, 1.0), (100, 1.0), (200, eb)],
            "plasticity/erank/value_head@probe_set": [(50, 1.0 + seed), (100, 2.0 + seed), (200, 3.0)],
        }
        name = f"20260101-00000{seed}_seed{seed}"
        write_run(
            root / "none" / name, seed=seed, interventions=[], total=200, checkpoint=200, rows=rows, scalars=scalars
        )
        trial("none", seed, "none", None, f"none/{name}")
        write_eval_fresh_b(root / "fresh_task1" / name, seed, EVAL_FRESH_B[seed])
        trial("fresh_task1", seed, "fresh", B, f"fresh_task1/{name}")
        if reuse:
            trial("fresh_task0", seed, "fresh", A, None, reused_from=f"none/seed{seed}")
        else:  # what the fresh run on A logs: the first visit's row, and every tag up to the switch
            first = {tag: [(s, v) for s, v in points if s <= SWITCH] for tag, points in scalars.items()}
            write_run(
                root / "fresh_task0" / name,
                seed=seed,
                interventions=[],
                total=SWITCH,
                checkpoint=SWITCH,
                task_order=[0],
                rows=rows[:1],
                scalars=first,
            )
            trial("fresh_task0", seed, "fresh", A, f"fresh_task0/{name}")
    (root / "sweep.json").write_text(json.dumps({"trials": trials, "arms_order": ["none", "fresh"]}))
    return root


def test_report_takes_a_reused_fresh_trial_from_its_source_runs_first_visit(tmp_path: Path):
    out = {}
    for reuse in (False, True):
        sweep = reuse_sweep(tmp_path / f"reuse_{reuse}", reuse)
        make_report(sweep, None, points=9, n_resamples=500)
        out[reuse] = sweep / "report"
    for name in ("visits.csv", "sequence.csv", "whole_run.csv", "correlation.csv", "curves.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(out[True] / name), pd.read_csv(out[False] / name), obj=name)
    # The fresh arm has both tasks, so every number relative to fresh (and the whole-run row) exists.
    stats = pd.read_csv(out[True] / "visits.csv")
    assert stat(stats, 1, "fresh", "eval_mean")["n"] == 2
    first_visits = [ea for ea, _ in EVAL_NONE.values()]
    assert stat(stats, 1, "fresh", "eval_return")["mean"] == pytest.approx(np.mean(first_visits))
    whole = pd.read_csv(out[True] / "whole_run.csv").set_index("arm")
    assert "fresh" in whole.index
    # The same visit rows, where the reused ones name their source run.
    key = ["arm", "seed", "task", "visit"]
    by_run = {r: pd.read_csv(out[r] / "visits_by_run.csv").sort_values(key).reset_index(drop=True) for r in out}
    pd.testing.assert_frame_equal(by_run[True].drop(columns="run"), by_run[False].drop(columns="run"))
    reused = by_run[True][(by_run[True]["arm"] == "fresh") & (by_run[True]["task"] == A)]
    assert list(reused["run"]) == [f"none/20260101-00000{s}_seed{s}" for s in (0, 1)]
    runs_csv = pd.read_csv(out[True] / "runs.csv")
    assert sorted(runs_csv["reused_from"].dropna()) == ["none/seed0", "none/seed1"]
    assert "reused_from" not in pd.read_csv(out[False] / "runs.csv")
    md = (out[True] / "report.md").read_text()
    assert "| fresh | 4 | 0, 1 | 4 of 4 |" in md
    assert f"The `fresh` run on {A} (seeds 0, 1) is the none arm's first visit of it" in md
    assert "not started" not in md and "Incomplete runs" not in md


def test_a_reused_fresh_trial_follows_its_source_stopped_in_its_first_visit_or_not_started(tmp_path: Path):
    sweep = reuse_sweep(tmp_path / "sweep", True)
    manifest = json.loads((sweep / "sweep.json").read_text())
    # Seed 2's none run stopped inside its first visit (checkpoint at 60, logs to 50); seed 3's never started.
    name = "20260101-000002_seed2"
    scalars = {
        f"task/{A}/episode_return": [(20, 1.0), (50, 2.0)],
        "task/id": [(10, 0)],
        f"eval/{A}/mean_return": [(0, 0.0), (50, 1.0)],
    }
    write_run(sweep / "none" / name, seed=2, interventions=[], total=200, checkpoint=60, rows=None, scalars=scalars)
    for seed, status in ((2, "interrupted"), (3, "pending")):
        manifest["trials"][f"none/seed{seed}"] = dict(label="none", seed=seed, arm="none", status=status, run_dir=None)
        manifest["trials"][f"fresh_task0/seed{seed}"] = dict(
            label="fresh_task0",
            seed=seed,
            arm="fresh",
            task=A,
            status="reused",
            run_dir=None,
            reused_from=f"none/seed{seed}",
        )
    (sweep / "sweep.json").write_text(json.dumps(manifest))
    make_report(sweep, None, points=9, n_resamples=500)
    runs = pd.read_csv(sweep / "report" / "runs.csv")
    fresh2 = runs[(runs["arm"] == "fresh") & (runs["seed"] == 2)].iloc[0]
    # As far on as a fresh run stopped at the same step would be: 60 of one switch, not complete.
    assert (fresh2["checkpoint_step"], fresh2["total_steps"], bool(fresh2["complete"])) == (60, SWITCH, False)
    md = (sweep / "report" / "report.md").read_text()
    assert "| fresh | 5 | 0, 1, 2 | 4 of 5 |" in md
    assert "`fresh_task0/seed3`" in md.split("Trials not started yet")[1]
    assert "`fresh_task0/seed2`" not in md.split("Trials not started yet")[1]


def test_a_reused_fresh_trial_takes_the_source_run_the_sweep_counts_not_a_stale_one_the_manifest_names(
    tmp_path: Path,
):
    # Seed 2's none trial failed once (a stale attempt stopped inside its first visit, the one sweep.json still
    # names) and runs again in a newer directory, further on: through its first visit, checkpoint at 150.
    sweep = reuse_sweep(tmp_path / "sweep", True)
    manifest = json.loads((sweep / "sweep.json").read_text())
    stale, newer = "20260101-000002_seed2", "20260102-000000_seed2"
    for name, checkpoint, rows, scalars in (
        (stale, 60, None, {"task/id": [(10, 0)], f"eval/{A}/mean_return": [(0, 0.0), (50, 1.0)]}),
        (
            newer,
            150,
            [{**row(A, 1, 0, 40.0, 41.0, 2.0, (0.1, 0.3), 1.0), "eval_return": 7.0}],
            {"task/id": [(10, 0), (100, 1)], f"eval/{A}/mean_return": [(0, 0.0), (100, 7.0), (150, 3.0)]},
        ),
    ):
        write_run(
            sweep / "none" / name,
            seed=2,
            interventions=[],
            total=200,
            checkpoint=checkpoint,
            rows=rows,
            scalars=scalars,
        )
    manifest["trials"]["none/seed2"] = dict(
        label="none", seed=2, arm="none", status="failed", run_dir=f"none/{stale}", error="rlp: boom (exit 1)"
    )
    manifest["trials"]["fresh_task0/seed2"] = dict(
        label="fresh_task0", seed=2, arm="fresh", task=A, status="reused", run_dir=None, reused_from="none/seed2"
    )
    (sweep / "sweep.json").write_text(json.dumps(manifest))
    assert trial_state(sweep, "none", 2).run_dir.name == newer  # the sweep would resume the newer run

    make_report(sweep, None, points=9, n_resamples=500)
    runs = pd.read_csv(sweep / "report" / "runs.csv")
    fresh2 = runs[(runs["arm"] == "fresh") & (runs["seed"] == 2)].iloc[0]
    assert (fresh2["checkpoint_step"], fresh2["total_steps"], bool(fresh2["complete"])) == (SWITCH, SWITCH, True)
    by_run = pd.read_csv(sweep / "report" / "visits_by_run.csv")
    (visit,) = by_run[(by_run["arm"] == "fresh") & (by_run["seed"] == 2)].itertuples()
    assert (visit.run, visit.task, visit.eval_return, visit.eval_mean) == (f"none/{newer}", A, 7.0, 3.5)


def test_the_runner_and_the_report_build_a_runs_sequence_with_the_same_arguments(monkeypatch: pytest.MonkeyPatch):
    # One builder of make_sequence's arguments (task_envs.sequence_args): the runner's training envs, the task
    # copies and the report's rebuilt sequence get the same ones, the sequence seed falling back to the run seed.
    from rl_plasticity import runner
    from rl_plasticity.catalog import registries
    from rl_plasticity.config import validate_config
    from rl_plasticity.report import runs
    from rl_plasticity.task_envs import TaskEnvs

    seen: list[dict] = []

    def spy(**kwargs):
        seen.append(kwargs)
        return make_sequence(**kwargs)

    from envs import make_sequence

    monkeypatch.setattr(runner, "make_sequence", spy)
    monkeypatch.setattr("envs.make_sequence", spy)
    env = {"sequence": "cartpole_shift", "order": "random", "n_envs": 2, "options": {"values": [0.5, 1.5]}}
    for sequence_seed, expected_seed in ((None, 7), (3, 3)):
        seen.clear()
        cfg = validate_config({"seed": 7, "env": {**env, "sequence_seed": sequence_seed}}, registries=registries())
        runner.build_env(cfg).close()
        runs._task_names.cache_clear()
        assert runs.task_names(cfg.model_dump(mode="json")) == ["cartpole/length=0.5", "cartpole/length=1.5"]
        expected = dict(
            name="cartpole_shift",
            switch_every=cfg.env.switch_every,
            order="random",
            task_order=None,
            seed=expected_seed,
            num_envs=2,
            values=[0.5, 1.5],
        )
        assert seen and all(kwargs == expected for kwargs in seen), seen
        assert TaskEnvs.from_config(cfg).sequence_seed == expected_seed
