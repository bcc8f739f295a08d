"""Checkpoints and resume: SIGTERM mid-run, resume, and the same parameters, logs and task summary as an
uninterrupted run; DQN with and without its replay buffer, PPO; changed configs; corrupt checkpoints."""

from __future__ import annotations

import math
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch as th
from click.testing import CliRunner
from stable_baselines3.common.save_util import load_from_zip_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from rl_plasticity.catalog import registries
from rl_plasticity.checkpoint import CheckpointSettings, CheckpointStore
from rl_plasticity.cli import cli
from rl_plasticity.config import load_config
from rl_plasticity.interventions import INTERVENTIONS, register
from rl_plasticity.interventions.base import Params, PlasticityIntervention
from rl_plasticity.runner import settings_from, train

RLP = str(Path(sys.executable).with_name("rlp"))

# DQN on CartPole, 3 tasks of 500 steps; a head reset at each switch (optimizer surgery, torch RNG) and an L2
# loss term; the monitor with its cheap probes every 50 updates and the trainability probe at switches.
DQN = """\
name: dqn
seed: 1
total_steps: 1500
threads: 1
agent: {algo: dqn, double_q: true, learning_starts: 100, buffer_size: 2000, batch_size: 16, train_freq: 4,
        target_update_interval: 100, exploration_fraction: 0.5, fast: false}
net: {kind: mlp, width: 16, depth: 1}
env: {sequence: cartpole_shift, switch_every: 500}
logging: {progress_bar: false, root_dir: out}
monitor: {probe_every: 50, probe_set_size: 32, probes: [rank, dormant, collapse, weights],
          switch_probes: [trainability], trainability_steps: 10, first_visit: true, first_visit_size: 32}
eval: {episodes: 3, tasks: all, epsilon: 0.05}
checkpoint: {every: 100}
interventions: [reset, l2]
"""

PPO = """\
name: ppo
seed: 2
total_steps: 1536
threads: 1
agent: {algo: ppo, n_steps: 64, batch_size: 32, n_epochs: 2}
net: {kind: mlp, width: 16, depth: 1}
env: {sequence: cartpole_shift, switch_every: 512, n_envs: 2}
logging: {progress_bar: false, root_dir: out}
monitor: {probe_every: 20, probe_set_size: 32, probes: [rank, dormant, weights], switch_probes: []}
eval: {episodes: 3, tasks: all, every: 100}
checkpoint: {every: 200}
interventions: [l2]
"""


# -- helpers -------------------------------------------------------------------------------------------------


def cli_run(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag of the run directory (all its events files), as TensorBoard reads them."""
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def same(a: list[tuple[int, float]], b: list[tuple[int, float]]) -> bool:
    return len(a) == len(b) and all(
        s == t and (v == w or (math.isnan(v) and math.isnan(w))) for (s, v), (t, w) in zip(a, b)
    )


def assert_same_logs(run: Path, reference: Path, monitored: bool = True) -> None:
    """No step twice for a tag, and every scalar but the wall-clock ones equal to the reference run's (with
    ``monitored``, the evaluation's and the probe set's among them)."""
    got, want = scalars(run), scalars(reference)
    assert set(got) == set(want), set(got) ^ set(want)
    if monitored:
        assert "eval/mean_return" in got and any(t.endswith("@probe_set") for t in got)
    for tag, points in got.items():
        steps = [s for s, _ in points]
        assert len(steps) == len(set(steps)), f"{tag}: a step logged twice"
        if not tag.startswith("time/"):
            assert same(points, want[tag]), (tag, [p for p in zip(points, want[tag]) if p[0] != p[1]][:3])


def model_state(run_dir: Path) -> dict[str, Any]:
    _, params, _ = load_from_zip_file(run_dir / "model.zip")
    return params


def assert_same_model(run: Path, reference: Path) -> None:
    got, want = model_state(run), model_state(reference)
    for key, tensor in want["policy"].items():
        assert th.equal(got["policy"][key], tensor), key
    # The optimizer too (Adam moments and step counts).
    for p, state in want["policy.optimizer"]["state"].items():
        for key, value in state.items():
            assert th.equal(got["policy.optimizer"]["state"][p][key], value), (p, key)


def final_state(run_dir: Path) -> dict[str, Any]:
    return CheckpointStore(run_dir).read().state


def only_run(root: Path) -> Path:
    (run_dir,) = [p for p in root.iterdir() if p.is_dir()]
    return run_dir


def latest_step(run_dir: Path) -> int:
    """The step of the latest checkpoint, -1 if there is none (yet)."""
    latest = CheckpointStore(run_dir).latest()
    return -1 if latest is None else int(latest.name.split("_")[1].split(".")[0])


def latest_step_under(root: Path) -> int:
    """:func:`latest_step` of the one run under ``root``, -1 if it is not there yet."""
    runs = [p for p in root.iterdir() if p.is_dir()] if root.is_dir() else []
    return latest_step(runs[0]) if runs else -1


class _SigtermParams(Params):
    at_step: int = 0


class _SigtermAt(PlasticityIntervention):
    """Test only: SIGTERM to this process once, at the first update at or after env step at_step."""

    Params = _SigtermParams

    def on_update(self, agent: Any, num_gradient_steps: int) -> None:
        if not self.fired and agent.num_timesteps >= self.params.at_step:
            self.fired = 1
            signal.raise_signal(signal.SIGTERM)


@contextmanager
def sigterm_test_intervention() -> Iterator[None]:
    """``_sigterm_test`` (:class:`_SigtermAt`) registered, for a run that uses it and for its resumes."""
    register("_sigterm_test")(_SigtermAt)
    try:
        yield
    finally:
        INTERVENTIONS.pop("_sigterm_test", None)


@pytest.fixture
def sigterm_intervention():
    with sigterm_test_intervention():
        yield


def assert_sigterm_resume_equals(
    reference: Path, config: Path, at_step: int, interventions: list[str], *overrides: str
) -> Path:
    """Run ``rlp train config`` (in this process, into ``out/`` beside ``config``) with ``interventions`` and the
    ``overrides``, SIGTERMed at the first update at or after env step ``at_step`` (:class:`_SigtermAt`); check that
    it stopped there (exit 143, its checkpoint at ``at_step``, the stop line), resume it to the end and check that
    its parameters, optimizer state and logs equal those of ``reference``, the same run never stopped.

    :return: the run directory.
    """
    out = config.parent / "out"
    with sigterm_test_intervention():
        result = cli_run(
            "train",
            str(config),
            f"logging.root_dir={out}",
            f"interventions=[{','.join([*interventions, '_sigterm_test'])}]",
            *overrides,
            f"intervention_params._sigterm_test.at_step={at_step}",
        )
        assert result.exit_code == 143, result.output
        run_dir = only_run(only_run(out))
        assert latest_step(run_dir) == at_step and f"stopped by SIGTERM at env step {at_step}" in result.stderr
        result = cli_run("train", "--resume", str(run_dir))
        assert result.exit_code == 0, result.output
    assert_same_model(run_dir, reference)
    assert_same_logs(run_dir, reference)
    return run_dir


@pytest.fixture(scope="module")
def dqn_reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted DQN run."""
    folder = tmp_path_factory.mktemp("reference")
    (folder / "dqn.yaml").write_text(DQN)
    return train(load_config(folder / "dqn.yaml", [f"logging.root_dir={folder / 'out'}"], registries=registries()))


@pytest.fixture(scope="module")
def fast_dqn_reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted DQN run on the fast path (agent.fast)."""
    folder = tmp_path_factory.mktemp("reference_fast")
    (folder / "dqn.yaml").write_text(DQN.replace("fast: false", "fast: true"))
    return train(load_config(folder / "dqn.yaml", [f"logging.root_dir={folder / 'out'}"], registries=registries()))


def wait_for(proc: subprocess.Popen, condition, what: str, timeout: float = 120.0) -> None:
    start = time.monotonic()
    while not condition():
        assert proc.poll() is None, f"the run ended before {what}: {proc.communicate()}"
        assert time.monotonic() - start < timeout, f"timed out waiting for {what}"
        time.sleep(0.01)


# -- the tests -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["stock", "fast"])
def test_sigterm_mid_task_and_after_switch_then_resume_equals_uninterrupted(
    tmp_path: Path, path: str, request: pytest.FixtureRequest
):
    dqn_reference = request.getfixturevalue("dqn_reference" if path == "stock" else "fast_dqn_reference")
    (tmp_path / "dqn.yaml").write_text(DQN if path == "stock" else DQN.replace("fast: false", "fast: true"))
    out = tmp_path / "out"

    # 1. Killed during the first task, as soon as its first checkpoint is there.
    first = subprocess.Popen(
        [RLP, "train", "dqn.yaml"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    wait_for(first, lambda: latest_step_under(out / "dqn") > 0, "a checkpoint")
    first.send_signal(signal.SIGTERM)
    _, err = first.communicate(timeout=120)
    assert first.returncode == 143, err
    run_dir = only_run(out / "dqn")
    stopped = latest_step(run_dir)
    assert 0 < stopped < 1500 and "Traceback" not in err
    printed = Path("out") / "dqn" / run_dir.name
    assert err.strip().splitlines()[-1] == (
        f"rlp: stopped by SIGTERM at env step {stopped}; checkpoint written to "
        f"{printed / 'checkpoints' / f'step_{stopped:012d}'}; "
        f"resume with: rlp train --resume {printed}"
    )

    # 2. Resumed, and killed again just after the first task switch (step 500).
    second = subprocess.Popen(
        [RLP, "train", "--resume", str(run_dir)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(second, lambda: latest_step(run_dir) >= max(500, stopped + 1), "the switch")
    second.send_signal(signal.SIGTERM)
    _, err = second.communicate(timeout=120)
    assert second.returncode == 143, err
    after_switch = latest_step(run_dir)
    assert 500 <= after_switch < 1000
    state = CheckpointStore(run_dir).read().state
    assert state["env"]["schedule"][0]["current_task_id"] == 1  # the new task, already reset into
    assert dict(state["interventions"])["reset"]["fired"] == 1

    # 3. Resumed to the end, in this process.
    result = cli_run("train", "--resume", str(run_dir))
    assert result.exit_code == 0, result.output
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 3  # one per process, read as one

    # Everything equals the uninterrupted run: parameters and optimizer, logged scalars (task/id at the
    # switches, returns per task, interventions/reset/fired, probes), task_summary.csv, and the final state.
    assert_same_model(run_dir, dqn_reference)
    assert_same_logs(run_dir, dqn_reference)
    assert [v for _, v in scalars(run_dir)["interventions/reset/fired"]] == [1, 2]
    assert (run_dir / "task_summary.csv").read_text() == (dqn_reference / "task_summary.csv").read_text()
    assert len((run_dir / "task_summary.csv").read_text().splitlines()) == 4  # header + 3 visits
    for name in ("probe_sets.pt", "first_visit_sets.pt"):  # rebuilt or restored: the same sets, every task
        got, want = (th.load(d / name, weights_only=False) for d in (run_dir, dqn_reference))
        sets = "sets" if name == "probe_sets.pt" else "frozen"
        assert sorted(got[sets]) == sorted(want[sets]) == [0, 1, 2]
        for task, arrays in want[sets].items():
            assert all(np.array_equal(got[sets][task][k], v) for k, v in arrays.items()), (name, task)
    got, want = final_state(run_dir), final_state(dqn_reference)
    assert got["agent"]["num_timesteps"] == want["agent"]["num_timesteps"] == 1500
    assert got["agent"]["num_gradient_steps"] == want["agent"]["num_gradient_steps"]
    assert got["env"]["schedule"] == want["env"]["schedule"]
    # The exploration schedule, the target-update phase and the episode count, and every RNG, consumed alike.
    for key in ("_current_progress_remaining", "exploration_rate", "_n_calls", "_episode_num", "_n_updates"):
        assert got["agent"][key] == want["agent"][key], key
    assert got["rng"]["python"] == want["rng"]["python"] and got["rng"]["action_space"] == want["rng"]["action_space"]
    assert (got["rng"]["numpy"][1] == want["rng"]["numpy"][1]).all()
    assert th.equal(got["rng"]["torch"], want["rng"]["torch"])
    assert [(n, s["fired"]) for n, s in got["interventions"]] == [(n, s["fired"]) for n, s in want["interventions"]]
    assert got["task_log"] == want["task_log"] == {"num_switches": 3}
    meta = CheckpointStore(run_dir).read().meta
    assert meta["replay_buffer"] == {"saved": True, "transitions": 1500, "bytes": meta["replay_buffer"]["bytes"]}
    assert meta["replay_buffer"]["bytes"] > 0
    assert len(CheckpointStore(run_dir).checkpoints()) == 1  # checkpoint.keep = 1


def test_ppo_resume_equals_uninterrupted(tmp_path: Path):
    (tmp_path / "ppo.yaml").write_text(PPO)
    reference = train(
        load_config(tmp_path / "ppo.yaml", [f"logging.root_dir={tmp_path / 'ref'}"], registries=registries())
    )
    # The same run with a SIGTERM to this process during the update at step 640 (in task 1); PPO stops at
    # the next rollout boundary, right after that update, with an empty rollout buffer.
    run_dir = assert_sigterm_resume_equals(reference, tmp_path / "ppo.yaml", 640, ["l2"])
    assert (run_dir / "task_summary.csv").read_text() == (reference / "task_summary.csv").read_text()


def test_dqn_without_replay_buffer_refills_it(
    tmp_path: Path, dqn_reference: Path, sigterm_intervention: None, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dqn.yaml").write_text(DQN)
    result = cli_run(
        "train",
        str(tmp_path / "dqn.yaml"),
        "checkpoint.replay_buffer=false",
        "interventions=[reset,l2,_sigterm_test]",
        "intervention_params._sigterm_test.at_step=700",
    )
    assert result.exit_code == 143, result.output
    run_dir = only_run(tmp_path / "out" / "dqn")
    ckpt = CheckpointStore(run_dir).read()
    assert ckpt.step == 700 and not (ckpt.path / "replay_buffer").exists()
    assert ckpt.meta["replay_buffer"]["saved"] is False and ckpt.state["replay_buffer"] is None

    result = cli_run("train", "--resume", str(run_dir))
    assert result.exit_code == 0, result.output
    assert "refilling it for 100 env steps" in result.stderr
    state = final_state(run_dir)
    assert state["agent"]["num_timesteps"] == 1500
    # No updates while the buffer refills (100 steps = 25 rollouts of train_freq 4), then training as before.
    reference = final_state(dqn_reference)["agent"]["num_gradient_steps"]
    assert state["agent"]["num_gradient_steps"] == reference - 25
    rows = (run_dir / "task_summary.csv").read_text().splitlines()
    assert [r.split(",")[:3] for r in rows[1:]] == [
        ["0", "cartpole/length=0.5", "1"],
        ["1", "cartpole/length=1.5", "1"],
        ["2", "cartpole/length=0.25", "1"],
    ]
    for tag, points in scalars(run_dir).items():
        assert len({s for s, _ in points}) == len(points), tag
    assert [s for s, _ in scalars(run_dir)["task/id"] if s in (500, 1000)] == [500, 1000]


def test_changed_config_refused_unless_force(tmp_path: Path, dqn_reference: Path):
    run_dir = tmp_path / "run"
    shutil.copytree(dqn_reference, run_dir)
    (tmp_path / "dqn.yaml").write_text(DQN)

    result = cli_run("train", "--resume", str(run_dir), "agent.learning_rate=0.01", "monitor.probe_every=10")
    assert result.exit_code == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("rlp: error: the config differs from") and "--force" in line
    assert "agent.learning_rate (0.0001 -> 0.01)" in line and "monitor.probe_every (50 -> 10)" in line

    result = cli_run("train", "--resume", str(run_dir), "--force", "env.switch_every=250")
    assert result.exit_code == 2 and "env.switch_every" in result.stderr and "even with --force" in result.stderr

    # The same config as a file (total_steps resolved the same way): accepted; the run is complete already.
    result = cli_run(
        "train", "--resume", str(run_dir), str(tmp_path / "dqn.yaml"), f"logging.root_dir={dqn_reference.parents[1]}"
    )
    assert result.exit_code == 0 and "nothing to do" in result.stderr, result.output

    # --force extends a finished run: the schedule continues into a second pass, the summary is appended.
    before = (run_dir / "task_summary.csv").read_text()
    result = cli_run("train", "--resume", str(run_dir), "--force", "total_steps=1800")
    assert result.exit_code == 0, result.output
    assert "total_steps (1500 -> 1800)" in result.stderr
    assert load_config(run_dir / "config.yaml", registries=registries()).total_steps == 1800
    assert final_state(run_dir)["agent"]["num_timesteps"] == 1800
    after = (run_dir / "task_summary.csv").read_text()
    # One more row: the second visit of task 0, cut short by the new end.
    assert after.startswith(before) and len(after.splitlines()) == len(before.splitlines()) + 1
    assert after.splitlines()[-1].startswith("0,cartpole/length=0.5,2,1500,1800,")
    ids = dict(scalars(run_dir)["task/id"])
    assert ids[1500] == 0 and max(ids) > 1700


CORRUPTIONS = {
    "not a run directory": (lambda run: (run / "config.yaml").unlink(), "config.yaml"),
    "no checkpoint": (lambda run: shutil.rmtree(run / "checkpoints"), "checkpoints/latest"),
    "latest names nothing": (
        lambda run: (shutil.rmtree(_ckpt(run)), (run / "checkpoints" / "latest").write_text("step_000000000999\n")),
        "'step_000000000999', which is not there",
    ),
    "truncated state": (lambda run: _truncate(run, "state.pt"), "state.pt"),
    "garbage state": (lambda run: _scramble(run, "state.pt"), "state.pt"),
    "garbage model": (lambda run: _scramble(run, "model.zip"), "model.zip"),
    "missing buffer array": (lambda run: (_ckpt(run) / "replay_buffer" / "actions.npy").unlink(), "actions.npy"),
    # The same size, other bytes: only the SHA-256 in meta.json tells.
    "altered buffer array": (lambda run: _flip_last_byte(run, "replay_buffer/rewards.npy"), "rewards.npy: altered"),
}


def _ckpt(run: Path) -> Path:
    return CheckpointStore(run).latest()  # type: ignore[return-value]


def _truncate(run: Path, name: str) -> None:
    path = _ckpt(run) / name
    path.write_bytes(path.read_bytes()[:100])


def _flip_last_byte(run: Path, name: str) -> None:
    path = _ckpt(run) / name
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def _scramble(run: Path, name: str) -> None:
    path = _ckpt(run) / name
    path.write_bytes(bytes(len(path.read_bytes())))


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_missing_or_corrupt_checkpoint_one_line_exit_2(tmp_path: Path, dqn_reference: Path, case: str):
    run_dir = tmp_path / "run"
    shutil.copytree(dqn_reference, run_dir)
    # Resume in the middle: the run is complete, so pretend it ran to 3000.
    config = run_dir / "config.yaml"
    config.write_text(config.read_text().replace("total_steps: 1500", "total_steps: 3000"))
    corrupt, named = CORRUPTIONS[case]
    corrupt(run_dir)
    events = sorted(run_dir.glob("events.out.tfevents.*"))
    result = cli_run("train", "--resume", str(run_dir))
    assert result.exit_code == 2, result.output
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("rlp: error: ") and named in line, line
    assert "Traceback" not in result.output
    assert sorted(run_dir.glob("events.out.tfevents.*")) == events  # nothing written


def test_interrupted_write_leaves_latest_intact(tmp_path: Path, dqn_reference: Path, monkeypatch: pytest.MonkeyPatch):
    import rl_plasticity.checkpoint as checkpoint
    from rl_plasticity.run_logger import make_logger
    from rl_plasticity.runner import build_agent, build_env
    from rl_plasticity.task_logging import TaskLogCallback

    run_dir = tmp_path / "run"
    shutil.copytree(dqn_reference, run_dir)
    cfg = load_config(run_dir / "config.yaml", registries=registries())
    env = build_env(cfg)
    agent = build_agent(cfg, env)
    agent.set_logger(make_logger(tmp_path / "logs", stdout=False))
    run = checkpoint.Trainee(agent, env, list(agent.interventions), TaskLogCallback({}, ["a", "b", "c"]))
    store = CheckpointStore(run_dir)
    before = store.latest()

    def killed(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt  # as a kill would, half-way through

    monkeypatch.setattr(checkpoint.th, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        store.write(run, settings_from(cfg.checkpoint, CheckpointSettings))
    assert store.latest() == before and store.read().step == 1500
    assert [p.name for p in store.root.iterdir() if p.name.startswith(".tmp")]  # the unfinished write
    store.clean()
    assert not [p.name for p in store.root.iterdir() if p.name.startswith(".tmp")]

    # Non-finite parameters are never checkpointed: the last good checkpoint stays the latest.
    monkeypatch.undo()
    with th.no_grad():
        agent.q_net.q_net[0].weight[0, 0] = float("nan")
    from agents.plastic import NonFiniteError

    with pytest.raises(NonFiniteError, match=r"parameters/q_net\.q_net\.0\.weight = nan"):
        store.write(run, settings_from(cfg.checkpoint, CheckpointSettings))
    assert store.latest() == before
    env.close()


def test_signal_guard_first_signal_asks_second_stops_at_once():
    from rl_plasticity.checkpoint import SignalGuard, TrainingInterrupted

    before = signal.getsignal(signal.SIGINT)
    with SignalGuard() as guard:
        signal.raise_signal(signal.SIGINT)
        assert guard.received == signal.SIGINT  # noted, training goes on to the next rollout boundary
        with pytest.raises(TrainingInterrupted) as info:
            signal.raise_signal(signal.SIGTERM)
    assert info.value.immediate and info.value.exit_status == 143
    assert TrainingInterrupted(signal.SIGINT).exit_status == 130
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored
