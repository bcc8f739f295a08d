"""`rlp sweep`: grid expansion, up-front validation, skip / resume / failure of trials, and a real Ray sweep.

Trials are real `rlp train` subprocesses on a tiny CartPole config (about 5 s each, mostly start-up). Only
the test marked `ray` starts Ray (`pytest -m "not ray"` skips it); the others use --sequential, which runs
the very same trial code one trial after another.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from rl_plasticity.catalog import registries
from rl_plasticity.cli import cli
from rl_plasticity.config import load_config
from rl_plasticity.rundirs import run_progress, trial_state
from rl_plasticity.sweep import SweepError, build_plan, expand_grid, parse_grid, parse_seeds
from rl_plasticity.sweep.driver import job_for
from rl_plasticity.sweep.plan import MANIFEST, check_sweep_dir, new_manifest, write_manifest
from rl_plasticity.sweep.trial import execute_trial

TINY = """\
name: tiny
seed: 0
total_steps: 600
agent: {algo: dqn, learning_starts: 50, buffer_size: 1000, batch_size: 16, train_freq: 1,
        target_update_interval: 50}
net: {kind: mlp, width: 16, depth: 1}
env: {sequence: cartpole_shift, switch_every: 200}
monitor: {enabled: false}
logging: {progress_bar: false}
"""
ARMS = Path(__file__).resolve().parents[1] / "configs" / "arms.yaml"


@pytest.fixture
def tiny(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    return path


def run(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def manifest(sweep: Path) -> dict:
    return json.loads((sweep / MANIFEST).read_text())


def plan_for(tiny: Path, grids=(), arms=(), fresh=False, seeds="0", overrides=(), cpus=1, fresh_reuse=True):
    return build_plan(
        tiny,
        list(overrides),
        list(grids),
        list(arms),
        ARMS,
        fresh,
        parse_seeds(seeds),
        tiny.parent / "sweep",
        cpus,
        fresh_reuse,
    )


# -- the grid language ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,seeds",
    [("0-4", [0, 1, 2, 3, 4]), ("0,2,5", [0, 2, 5]), ("3", [3]), ("0-2,7,1", [0, 1, 2, 7]), (" 4 , 6-7", [4, 6, 7])],
)
def test_parse_seeds(text: str, seeds: list[int]):
    assert parse_seeds(text) == seeds


@pytest.mark.parametrize("text", ["3-1", "a", "1-", "-1", "0,,2", "1.5"])
def test_parse_seeds_refuses(text: str):
    with pytest.raises(SweepError, match="--seeds"):
        parse_seeds(text)


def test_grid_expansion_labels_and_overrides():
    key, overrides = parse_grid("interventions=[[],[reset],[l2],[l2_er],[kfac_rank],[nc_reg]]")
    assert key == "interventions" and len(overrides) == 6
    assert overrides[:3] == ["interventions=[]", "interventions=[reset]", "interventions=[l2]"]
    points = expand_grid(["interventions=[[],[reset,l2]]"])
    assert points == [("none", ("interventions=[]",)), ("reset-l2", ("interventions=[reset,l2]",))]
    # Several keys: their cartesian product, in order, named key-value.
    points = expand_grid(["agent.learning_rate=[1e-3,1e-4]", "net.width=[32,64,128]"])
    assert len(points) == 6
    assert points[0] == ("learning_rate-0.001_width-32", ("agent.learning_rate=0.001", "net.width=32"))
    assert points[-1] == ("learning_rate-0.0001_width-128", ("agent.learning_rate=0.0001", "net.width=128"))
    assert expand_grid([]) == [("", ())]


def test_grid_values_reach_the_trial_config_unchanged(tiny: Path):
    # Nested lists, strings that need quoting and nulls survive the trip through an override string.
    _, overrides = parse_grid("env.options.values=[[0.5,1.5],[2.0,0.25,3]]")
    assert [load_config(tiny, [o], registries=registries()).env.options["values"] for o in overrides] == [
        [0.5, 1.5],
        [2.0, 0.25, 3],
    ]
    _, overrides = parse_grid('env.options.note=[\'a=b\', "x y", "it\'s"]')
    assert overrides == ["env.options.note='a=b'", "env.options.note='x y'", "env.options.note='it''s'"]
    _, overrides = parse_grid("checkpoint.every=[null,1000]")
    assert [load_config(tiny, [o], registries=registries()).checkpoint.every for o in overrides] == [None, 1000]


def test_plan_trials_arms_fresh_and_their_full_configs(tiny: Path):
    plan = plan_for(
        tiny,
        grids=["agent.learning_rate=[1e-3,1e-4]"],
        arms=["none", "reset", "fresh"],
        seeds="0,2",
        overrides=["agent.gamma=0.9", "agent.learning_rate=5e-4"],
        cpus=2,
    )
    ids = [t.id for t in plan.trials]
    # Seed-major: every arm (then the fresh tasks) of seed 0, then of seed 2.
    assert ids == [
        trial
        for s in (0, 2)
        for trial in [f"{arm}_{lr}/seed{s}" for arm in ("none", "reset") for lr in ("0.001", "0.0001")]
        + [f"fresh_task{k}/seed{s}" for k in range(3)]
    ]
    assert plan.tasks == ["cartpole/length=0.5", "cartpole/length=1.5", "cartpole/length=0.25"]

    trial = plan.trial("reset_0.0001/seed2")
    assert trial.arm == "reset_0.0001"
    assert trial.overrides == (
        "agent.gamma=0.9",
        "agent.learning_rate=5e-4",
        "interventions=[reset]",
        "agent.learning_rate=0.0001",
    )
    cfg = load_config(tiny, trial.run_overrides(plan.sweep_dir, 2), registries=registries())
    assert (cfg.seed, cfg.name, cfg.threads, cfg.interventions) == (2, "reset_0.0001", 2, ["reset"])
    assert (cfg.agent.learning_rate, cfg.agent.gamma, cfg.logging.root_dir) == (1e-4, 0.9, str(plan.sweep_dir))
    assert plan.configs[trial.id]["agent.learning_rate"] == 1e-4 and "threads" not in plan.configs[trial.id]

    # Fresh network: the base config on task k alone, one switch period, no intervention.
    f = plan.trial("fresh_task2/seed0")
    assert (f.arm, f.task) == ("fresh", "cartpole/length=0.25")
    cfg = load_config(tiny, f.run_overrides(plan.sweep_dir, 1), registries=registries())
    assert (cfg.env.order, cfg.env.task_order, cfg.total_steps, cfg.interventions) == ("explicit", [2], None, [])
    assert cfg.agent.gamma == 0.9 and cfg.agent.learning_rate == 5e-4  # the base's, not a grid value


# Epsilon over a fixed number of env steps (not a fraction of total_steps): the study presets' schedule.
STEPS = ("agent.exploration_fraction=null", "agent.exploration_steps=100")


def reused(plan) -> dict[str, str]:
    return {t.id: t.reused_from for t in plan.trials if t.reused_from is not None}


def test_fresh_task0_is_reused_from_the_none_arms_first_visit_at_every_seed(tiny: Path):
    plan = plan_for(tiny, arms=["reset", "none", "l2"], fresh=True, seeds="0-2", overrides=STEPS)
    # Only none has the base config: reset and l2 come first but have interventions; tasks 1 and 2 run.
    assert reused(plan) == {f"fresh_task0/seed{s}": f"none/seed{s}" for s in (0, 1, 2)}
    assert len(plan.trials) == 3 * 6
    assert reused(plan_for(tiny, arms=["reset", "none"], fresh=True, overrides=STEPS, fresh_reuse=False)) == {}
    # sweep.json says so; the trial keeps its config (a re-run compares it).
    entry = new_manifest(plan, None, ["rlp"])["trials"]["fresh_task0/seed1"]
    assert (entry["status"], entry["reused_from"], entry["run_dir"]) == ("reused", "none/seed1", None)
    assert entry["config"]["env.task_order"] == [0] and entry["config"]["name"] == "fresh_task0"


@pytest.mark.parametrize(
    "grids,overrides,source",
    [
        # A grid point that changes a hyperparameter is not the base config; the one equal to it is, whatever its label.
        (["agent.learning_rate=[1e-3,1e-2]"], [], None),
        (["agent.learning_rate=[1e-3,1e-4]"], [], "0.0001/seed0"),
        (["interventions=[[l2],[reset]]"], [], None),
        (["interventions=[[l2],[]]"], [], "none/seed0"),
        # Epsilon over a fraction of total_steps decays over 200 steps alone, over 600 in the continual run.
        ([], ["agent.exploration_fraction=0.1", "agent.exploration_steps=null"], None),
        # A random order may start with another task; an explicit one that starts with task 0 is fine ...
        ([], ["env.order=random"], None),
        ([], ["env.order=explicit", "env.task_order=[0,2]"], "tiny/seed0"),
        # ... if the continual run reaches the switch; its length does not matter otherwise.
        ([], ["total_steps=100"], None),
        ([], ["total_steps=200"], "tiny/seed0"),
        ([], ["total_steps=5000"], "tiny/seed0"),
    ],
)
def test_fresh_reuse_needs_the_very_same_first_visit(tiny: Path, grids, overrides, source):
    plan = plan_for(tiny, grids=grids, fresh=True, overrides=[*STEPS, *overrides])
    assert reused(plan) == ({"fresh_task0/seed0": source} if source else {})


def test_an_explicit_order_reuses_the_fresh_run_of_its_first_task(tiny: Path):
    plan = plan_for(tiny, fresh=True, overrides=[*STEPS, "env.order=explicit", "env.task_order=[2,0,1]"])
    assert reused(plan) == {"fresh_task2/seed0": "tiny/seed0"}


def test_dry_run_shows_reused_trials_and_no_fresh_reuse_runs_them(tiny: Path):
    args = ["sweep", str(tiny), "--out", "sweep", "--arms", "none", "--fresh", *STEPS, "--dry-run"]
    result = run(*args)
    assert result.exit_code == 0, result.output
    assert [line.split()[:3] for line in result.output.splitlines()[1:4]] == [
        ["none/seed0", "start", "agent.exploration_fraction=null"],
        ["fresh_task0/seed0", "reused", "(none/seed0)"],
        ["fresh_task1/seed0", "start", "agent.exploration_fraction=null"],
    ]
    result = run(*args, "--no-fresh-reuse")
    assert result.exit_code == 0 and "reused (" not in result.output
    assert result.output.splitlines()[2].split()[:2] == ["fresh_task0/seed0", "start"]
    assert "--no-fresh-reuse" in run("sweep", "--help").output


def test_resuming_a_sweep_planned_before_reuse(tiny: Path):
    """A sweep.json written before reuse existed (fresh_task0 pending) resumes with fresh_task0 reused; one whose
    fresh_task0 has a run directory keeps it as an ordinary trial."""
    old = plan_for(tiny, arms=["none"], fresh=True, seeds="0-1", overrides=STEPS, fresh_reuse=False)
    old.sweep_dir.mkdir()
    write_manifest(old.sweep_dir, new_manifest(old, None, ["rlp", "sweep"]))
    assert manifest(old.sweep_dir)["trials"]["fresh_task0/seed0"]["status"] == "pending"
    # Seed 1's fresh_task0 ran already.
    run_dir = old.sweep_dir / "fresh_task0" / "20260101-000000_seed1"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text("seed: 1\n")
    data = manifest(old.sweep_dir)
    data["trials"]["fresh_task0/seed1"].update(status="finished", run_dir="fresh_task0/20260101-000000_seed1")
    write_manifest(old.sweep_dir, data)

    plan = plan_for(tiny, arms=["none"], fresh=True, seeds="0-1", overrides=STEPS)
    assert reused(plan) == {"fresh_task0/seed0": "none/seed0"}
    trials = new_manifest(plan, check_sweep_dir(plan), ["rlp", "sweep"])["trials"]  # the same configs: no refusal
    entry = trials["fresh_task0/seed0"]
    assert (entry["status"], entry["reused_from"]) == ("reused", "none/seed0")
    assert trials["fresh_task0/seed1"]["status"] == "finished" and trials["fresh_task0/seed1"]["reused_from"] is None
    assert trials["fresh_task1/seed0"]["status"] == "pending"
    # Reused, then run after all with --no-fresh-reuse: pending again until it ends.
    write_manifest(plan.sweep_dir, new_manifest(plan, None, ["rlp", "sweep"]))
    again = plan_for(tiny, arms=["none"], fresh=True, seeds="0-1", overrides=STEPS, fresh_reuse=False)
    assert new_manifest(again, check_sweep_dir(again), ["rlp"])["trials"]["fresh_task0/seed0"]["status"] == "pending"


# Tiny, with what a study run has on: the monitor (heavy probes at the switch too), evaluation of every task,
# random steps at the task start, epsilon over exploration_steps, a checkpoint at the switch (keep: the one at
# the switch stays).
IDENTITY = """\
name: tiny
seed: 0
agent: {algo: dqn, learning_starts: 50, buffer_size: 1000, batch_size: 16, train_freq: 1, target_update_interval: 50,
        exploration_fraction: null, exploration_steps: 150, random_steps_per_task: 20}
net: {kind: mlp, width: 16, depth: 1}
env: {sequence: cartpole_shift, switch_every: 200, options: {values: [0.5, 1.5]}}
monitor: {probe_every: 50, probe_set_size: 64, probe_set_episodes: 2, gram_size: 32, hessian_order: 8,
          hessian_vectors: 1, trainability_steps: 10}
eval: {every: 50, episodes: 2, tasks: all, max_episode_steps: 100}
checkpoint: {every: 200, keep: 2}
logging: {progress_bar: false}
"""


def _checkpoint_state(run_dir: Path, step: int) -> dict:
    """The networks and Adam state (SB3's zip) and the replay buffer of the run's checkpoint at ``step``."""
    import numpy as np
    from stable_baselines3.common.save_util import load_from_zip_file

    folder = run_dir / "checkpoints" / f"step_{step:012d}"
    _, params, _ = load_from_zip_file(folder / "model.zip")
    buffer = {f.name: np.load(f) for f in sorted((folder / "replay_buffer").glob("*.npy"))}
    return {"params": params, "buffer": buffer}


def test_fresh_task0_is_the_none_arms_first_visit_and_a_resumed_sweep_reuses_it(tmp_path: Path, monkeypatch):
    """The identity reuse rests on, end to end: a fresh run on task 0 and the none arm's run, both made by the
    sweep, log the same task-0 row, curves and checkpoint at the switch. Then the same sweep as an older rlp
    sweep left it (fresh_task0 pending) resumes with fresh_task0 reused, and its report equals the one over the
    real run."""
    import shutil

    import numpy as np
    import pandas as pd
    import torch

    from rl_plasticity.report import make_report
    from rl_plasticity.report.runs import read_scalars

    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.yaml").write_text(IDENTITY)
    args = ["sweep", "tiny.yaml", "--arms", "none", "--fresh", "--sequential"]
    result = run(*args, "--out", "sweep", "--no-fresh-reuse")
    assert result.exit_code == 0, result.output
    sweep = tmp_path / "sweep"
    (none,) = (sweep / "none").iterdir()
    (fresh,) = (sweep / "fresh_task0").iterdir()

    continual, alone = (d.joinpath("task_summary.csv").read_text().splitlines() for d in (none, fresh))
    assert len(continual) == 3 and len(alone) == 2  # header, task 0 (and task 1)
    assert "hessian_top_eig/loss" in alone[0] and "eval_return/cartpole/length=1.5" in alone[0]
    assert alone[1].startswith("0,cartpole/length=0.5,1,0,200,")
    assert continual[:2] == alone
    # Parameters, Adam state and replay buffer at the switch, after that step's update.
    a, b = _checkpoint_state(none, 200), _checkpoint_state(fresh, 200)
    policy, adam = a["params"]["policy"], a["params"]["policy.optimizer"]["state"]
    assert len(policy) >= 8 and len(adam) >= 4  # online and target nets; the online net's moments
    for key, tensor in policy.items():
        assert torch.equal(b["params"]["policy"][key], tensor), key
    for p, state in adam.items():
        for key, value in state.items():
            assert torch.equal(b["params"]["policy.optimizer"]["state"][p][key], value), (p, key)
    assert a["buffer"].keys() == b["buffer"].keys() and len(a["buffer"]) >= 5
    for name, array in a["buffer"].items():
        np.testing.assert_array_equal(b["buffer"][name], array, err_msg=name)
    # Every evaluation and probe logged up to the switch.
    sa, sb = read_scalars(none), read_scalars(fresh)
    tags = [t for t in sb if t.startswith(("eval/", "plasticity/"))]
    assert len(tags) > 20
    for tag in tags:
        sa_steps, sa_values = sa[tag]
        np.testing.assert_array_equal(sa_values[sa_steps <= 200], sb[tag][1], err_msg=tag)

    # The same sweep before its fresh_task0 ran, as an older rlp sweep left it: resumed, fresh_task0 is reused.
    resumed = tmp_path / "resumed"
    shutil.copytree(sweep, resumed)
    shutil.rmtree(resumed / "fresh_task0")
    shutil.rmtree(resumed / "report", ignore_errors=True)
    data = manifest(resumed)
    data["trials"]["fresh_task0/seed0"].update(status="pending", run_dir=None)
    del data["trials"]["fresh_task0/seed0"]["reused_from"]
    write_manifest(resumed, data)
    result = run(*args, "--out", "resumed")
    assert result.exit_code == 0, result.output
    assert "2 finished already (skipped), 1 reused (a continual trial's first visit), 0 to run" in result.output
    entry = manifest(resumed)["trials"]["fresh_task0/seed0"]
    assert (entry["status"], entry["reused_from"]) == ("reused", "none/seed0")

    for folder in (sweep, resumed):
        make_report(folder, None, points=9, n_resamples=200)
    for name in ("visits.csv", "sequence.csv", "whole_run.csv", "curves.csv"):
        before, after = (pd.read_csv(folder / "report" / name) for folder in (sweep, resumed))
        pd.testing.assert_frame_equal(after, before, obj=name)
    fresh_rows = pd.read_csv(resumed / "report" / "visits.csv").query("arm == 'fresh' and metric == 'eval_mean'")
    assert list(fresh_rows["n"]) == [1, 1]  # tasks 0 and 1


BAD = [
    (["--grid", "interventions=[[],[resett]]"], ["trial resett/seed0", "did you mean 'reset'"]),
    (["--grid", "interventions=reset"], ["--grid", "non-empty list"]),
    (["--grid", "interventions=[[],[reset]"], ["--grid", "does not parse"]),
    (["--grid", "interventions"], ["--grid", "key=[v1,v2,...]"]),
    (["--grid", "agent.gama=[0.9,0.99]"], ["agent.gama", "did you mean 'agent.gamma'"]),
    (["--grid", "seed=[1,2]"], ["'seed' is set by the sweep", "--seeds"]),
    (["--grid", "net.width=[16]", "--grid", "net.width=[32]"], ["net.width", "twice"]),
    (["logging.root_dir=elsewhere"], ["logging.root_dir", "--out"]),
    (["agent.learnin_rate=1e-3"], ["did you mean 'agent.learning_rate'"]),
    (["env.options.param=bogus"], ["env", "bogus", "length"]),
    (["--seeds", "2-1"], ["--seeds", "1-2"]),
    (["--seeds", "x"], ["--seeds"]),
    (["--arms", "none,bogus"], ["--arms", "'bogus'", "reset", "fresh"]),
    (["--arms", "none", "--arms-file", "missing.yaml"], ["--arms-file", "missing.yaml"]),
    (["--fresh", "--grid", "env.switch_every=[100,200]"], ["--fresh", "env.switch_every"]),
    (["--grid", "name=[a,b]"], ["'name' is set by the sweep"]),
    (["--grid", "interventions=[[l2],[l2]]"], ["several trials would be named l2"]),
]


@pytest.mark.parametrize("args,words", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_sweep_input_one_line_exit_2_nothing_written(tiny: Path, args: list[str], words: list[str]):
    result = run("sweep", str(tiny), "--out", "sweep", *args)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rlp: error: "), result.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert "Traceback" not in result.output
    assert sorted(p.name for p in tiny.parent.iterdir()) == ["tiny.yaml"]


def test_without_ray_one_line_naming_the_extra(tiny: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    result = run("sweep", str(tiny), "--out", "sweep")
    assert result.exit_code == 2
    assert result.stderr.strip().count("\n") == 0
    assert "pip install" in result.stderr and ".[distributed]" in result.stderr
    assert not (tiny.parent / "sweep").exists()


def test_dry_run_lists_trials_and_writes_nothing(tiny: Path):
    result = run(
        "sweep", str(tiny), "--out", "sweep", "--seeds", "0-1", "--grid", "interventions=[[],[l2]]", "--dry-run"
    )
    assert result.exit_code == 0, result.output
    listed = [line.split()[0] for line in result.output.splitlines()[1:]]
    assert listed == ["none/seed0", "l2/seed0", "none/seed1", "l2/seed1"]
    assert "start" in result.output and not (tiny.parent / "sweep").exists()


def test_a_sweep_directory_is_only_rerun_with_the_same_trial_configs(tiny: Path):
    plan = plan_for(tiny, grids=["interventions=[[],[l2]]"])
    plan.sweep_dir.mkdir()
    write_manifest(plan.sweep_dir, new_manifest(plan, None, ["rlp", "sweep"]))
    assert check_sweep_dir(plan_for(tiny, grids=["interventions=[[],[l2],[reset]]"], seeds="0-1")) is not None
    result = run("sweep", str(tiny), "--out", "sweep", "--grid", "interventions=[[],[l2]]", "agent.gamma=0.5")
    assert result.exit_code == 2 and "agent.gamma" in result.stderr and "another --out" in result.stderr
    (tiny.parent / "not_a_sweep").mkdir()
    (tiny.parent / "not_a_sweep" / "file").write_text("x")
    result = run("sweep", str(tiny), "--out", "not_a_sweep", "--sequential")
    assert result.exit_code == 2 and "not a sweep directory" in result.stderr


def test_a_second_driver_on_the_same_sweep_is_refused(tiny: Path):
    import fcntl

    (tiny.parent / "sweep").mkdir()
    with (tiny.parent / "sweep" / ".lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running `rlp sweep` holds it
        result = run("sweep", str(tiny), "--out", "sweep", "--sequential")
    assert result.exit_code == 2 and "another rlp sweep is running on" in result.stderr
    assert not (tiny.parent / "sweep" / MANIFEST).exists()


# -- running trials ---------------------------------------------------------------------------------


def test_failed_trial_is_reported_others_finish_and_finished_ones_are_skipped(tiny: Path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("device=cuda must fail at run time for this test")
    # device=cuda passes the config check (a Ray worker may have a GPU) and fails when the run starts.
    args = ["sweep", str(tiny), "--out", "sweep", "--grid", "device=[cuda,cpu]", "--sequential"]
    result = run(*args)
    assert result.exit_code == 1, result.output
    sweep = tiny.parent / "sweep"
    trials = manifest(sweep)["trials"]
    assert trials["cpu/seed0"]["status"] == "finished" and trials["cuda/seed0"]["status"] == "failed"
    error = trials["cuda/seed0"]["error"]
    assert error.startswith("rlp: error: device: 'cuda' requested") and error.endswith("(exit 2)")
    assert f"cuda/seed0 FAILED (started): {error}" in result.output  # reported with its error ...
    assert "1 finished, 1 failed" in result.output  # ... and the other trial still ran
    (run_dir,) = (sweep / "cpu").iterdir()
    assert trials["cpu/seed0"]["run_dir"] == f"cpu/{run_dir.name}" and run_progress(run_dir).complete

    # Run again: the finished trial is skipped (not even started), the failed one retried.
    mtime = (run_dir / "config.yaml").stat().st_mtime_ns
    result = run(*args)
    assert result.exit_code == 1
    assert "1 finished already (skipped), 1 to run" in result.output
    assert "0 finished, 1 failed, 1 skipped" in result.output
    trials = manifest(sweep)["trials"]
    assert (trials["cpu/seed0"]["attempts"], trials["cuda/seed0"]["attempts"]) == (1, 2)
    assert [p.name for p in (sweep / "cpu").iterdir()] == [run_dir.name]
    assert (run_dir / "config.yaml").stat().st_mtime_ns == mtime
    assert (sweep / "logs" / "cpu_seed0.err").read_text().count("== ") == 1


def test_interrupted_trial_resumes_from_its_checkpoint(tiny: Path):
    plan = plan_for(tiny, overrides=["total_steps=4000", "checkpoint.every=200"])
    (trial,) = plan.trials
    job = job_for(plan, trial)
    # A stale run directory with no checkpoint (died at start-up) holds nothing to resume: it is removed.
    stale = plan.sweep_dir / trial.label / "20200101-000000_seed0"
    stale.mkdir(parents=True)
    stale.joinpath("config.yaml").write_text("seed: 0\n")

    # Start the trial's run as a worker would, and stop it with SIGTERM once it has checkpointed.
    proc = subprocess.Popen(
        [sys.executable, "-m", "rl_plasticity", "train", job.config, *job.overrides, "--no-progress"],
        cwd=tiny.parent,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    while trial_state(plan.sweep_dir, trial.label, trial.seed) is None:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143
    state = trial_state(plan.sweep_dir, trial.label, trial.seed)
    assert state is not None and not state.complete and state.checkpoint_step < 4000

    outcome = execute_trial(job)
    assert (outcome.status, outcome.mode, outcome.run_dir) == ("finished", "resumed", str(state.run_dir))
    assert run_progress(state.run_dir).checkpoint_step == 4000 and not stale.exists()
    assert "--resume" in (plan.sweep_dir / "logs" / "tiny_seed0.err").read_text()
    # Complete now: executing it again is a skip that starts nothing.
    again = execute_trial(job)
    assert (again.status, again.mode, again.seconds) == ("finished", "skipped", 0.0)


def test_a_trial_waits_for_an_earlier_attempt_that_still_holds_its_run(tiny: Path):
    import threading

    from rl_plasticity.runlock import run_lock

    plan = plan_for(tiny)
    (trial,) = plan.trials
    # An earlier attempt still starting up (its worker died; it was told to stop): a run directory with no
    # checkpoint yet, its lock held by a live process, here this one, for one more second.
    stale = plan.sweep_dir / trial.label / "20200101-000000_seed0"
    stale.mkdir(parents=True)
    stale.joinpath("config.yaml").write_text("seed: 0\n")
    held, release = threading.Event(), threading.Event()

    def earlier_attempt() -> None:
        with run_lock(stale):
            held.set()
            release.wait(1.0)

    thread = threading.Thread(target=earlier_attempt)
    thread.start()
    held.wait()
    outcome = execute_trial(job_for(plan, trial))
    thread.join()
    assert (outcome.status, outcome.mode) == ("finished", "started") and not stale.exists()
    log = (plan.sweep_dir / "logs" / "tiny_seed0.err").read_text()
    # Not removed while it was held; then removed, and both said in the trial's log.
    assert f"rlp sweep: waited for PID {os.getpid()} to stop writing {stale} (an earlier attempt)" in log
    assert f"rlp sweep: removed {stale}: it stopped before its first checkpoint (nothing to resume)" in log


@pytest.mark.parametrize("sigint", ["ignored", "default"])
def test_an_interrupt_stops_the_run_even_where_sigint_is_ignored(sigint: str):
    """Ray cancels a trial with ``_thread.interrupt_main()``, a no-op while SIGINT is ignored (as in a
    background ``rlp sweep ... &``): the trial must still SIGTERM its run, and leave SIGINT as it found it."""
    import _thread
    import threading

    from rl_plasticity.sweep.trial import _run_to_end

    before = signal.signal(signal.SIGINT, signal.SIG_IGN if sigint == "ignored" else signal.default_int_handler)
    child = (
        "import signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: sys.exit(143)); "
        "print('ready', flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
    timer = threading.Timer(1.0, _thread.interrupt_main)  # as Ray's cancellation does, from another thread
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"  # its SIGTERM handler is in place
        timer.start()
        start = time.monotonic()
        code, interrupted = _run_to_end(proc)
        assert (code, interrupted) == (143, True)
        assert time.monotonic() - start < 30
        expected = signal.SIG_IGN if sigint == "ignored" else signal.default_int_handler
        assert signal.getsignal(signal.SIGINT) == expected
    except KeyboardInterrupt:  # never let it reach pytest
        pytest.fail("the interrupt arrived outside the trial's wait")
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, before)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- a real Ray ---------------------------------------------------------------------------------------


@pytest.mark.ray
def test_ray_sweep_2x2_end_to_end(tiny: Path):
    pytest.importorskip("ray")
    args = [
        "sweep",
        str(tiny),
        "--out",
        "sweep",
        "--seeds",
        "0-1",
        "--grid",
        "interventions=[[],[l2]]",
        "--num-cpus",
        "2",
        "monitor.enabled=true",
        "monitor.probe_every=100",
        "monitor.switch_probes=[]",
    ]
    # A trial that asks for more CPUs than the cluster has: one line, exit 2, nothing written.
    result = run(*args, "--cpus-per-trial", "3")
    assert result.exit_code == 2 and result.stderr.strip().count("\n") == 0
    assert "--cpus-per-trial: 3 CPUs per trial, but the Ray cluster has 2" in result.stderr
    assert not (tiny.parent / "sweep").exists()

    result = run(*args)
    assert result.exit_code == 0, result.output + result.stderr
    sweep = tiny.parent / "sweep"
    assert "4 trials" in result.output and "on a local Ray with 2 CPUs" in result.output
    trials = manifest(sweep)["trials"]
    assert sorted(trials) == ["l2/seed0", "l2/seed1", "none/seed0", "none/seed1"]
    for trial_id, entry in trials.items():
        label, seed = trial_id.split("/seed")
        assert entry["status"] == "finished" and entry["attempts"] == 1
        run_dir = sweep / entry["run_dir"]
        cfg = load_config(run_dir / "config.yaml", registries=registries())
        assert (cfg.seed, cfg.name, cfg.threads) == (int(seed), label, 1)
        assert cfg.interventions == ([] if label == "none" else ["l2"])
        assert run_progress(run_dir).complete and (run_dir / "model.zip").is_file()
        assert (run_dir / "task_summary.csv").is_file()
    # Two workers: the first two trials (seed-major order: none and l2 of seed 0) ran side by side, each
    # starting before the other ended.
    spans = []
    for label in ("none", "l2"):
        header = (sweep / "logs" / f"{label}_seed0.err").read_text().splitlines()[0]
        start = dt.datetime.fromisoformat(header.split()[1])
        spans.append((start, start + dt.timedelta(seconds=trials[f"{label}/seed0"]["seconds"])))
    (start_a, end_a), (start_b, end_b) = spans
    # More than the 1 s rounding of the logged start times.
    assert (min(end_a, end_b) - max(start_a, start_b)).total_seconds() > 1.0, spans

    # The same sweep again: nothing to run.
    result = run(
        *args[:-3], "monitor.enabled=true", "monitor.probe_every=100", "monitor.switch_probes=[]", "--sequential"
    )
    assert result.exit_code == 0 and "4 finished already (skipped), 0 to run" in result.output

    # And its report: both arms, two seeds each, every visit.
    from rl_plasticity.report import make_report

    report = make_report(sweep, None, points=20, n_resamples=1_000)
    assert not report.incomplete
    import pandas as pd

    stats = pd.read_csv(sweep / "report" / "visits.csv")
    returns = stats[stats["metric"] == "mean_return"]
    assert sorted(set(returns["arm"])) == ["l2", "none"] and set(returns["n"]) == {2}
    assert sorted(set(returns["index"])) == [1, 2, 3]
    assert (sweep / "report" / "return.png").is_file() and (sweep / "report" / "erank.png").is_file()


def test_flat_config_keeps_empty_mappings_only_for_a_trial(tiny: Path):
    """The run's flat config drops an empty mapping; a trial's keeps it (the manifests of older sweeps did)."""
    from rl_plasticity.config import flat_config
    from rl_plasticity.sweep.plan import trial_config

    cfg = load_config(tiny, ["intervention_params={}", "agent.gamma=0.9"], registries=registries())
    run, trial = flat_config(cfg), trial_config(cfg)
    assert run["agent.gamma"] == trial["agent.gamma"] == 0.9 and run["net.width"] == 16
    assert not any(k.startswith("intervention_params") for k in run)
    assert trial["intervention_params"] == {} and "threads" in run and "threads" not in trial
    assert {k: v for k, v in run.items() if k not in ("threads", "logging.root_dir", "logging.progress_bar")} == {
        k: v for k, v in trial.items() if v != {}
    }
