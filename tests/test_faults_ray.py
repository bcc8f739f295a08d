"""Ray faults, on real clusters (marked `ray`): a trial's Ray worker killed in the middle of a local sweep, and
`rlp sweep --address` on a two-node cluster with token authentication, started and stopped by the test."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_checkpoint import assert_same_logs, assert_same_model
from test_sweep import TINY, manifest

from rl_plasticity.layout import LOCK_FILE
from rl_plasticity.rundirs import trial_state

pytestmark = pytest.mark.ray
RLP = str(Path(sys.executable).with_name("rlp"))
RAY = str(Path(sys.executable).with_name("ray"))


def _env(**extra: str) -> dict[str, str]:
    """This environment without any RAY_ setting of the caller's, plus ``extra``."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_")}, **extra}


def _ppid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _start_sweep(tmp_path: Path, args: list[str], **popen: Any) -> subprocess.Popen:
    """``rlp ARGS --out sweep`` in ``tmp_path`` on the tiny config (written there), its stdout piped as text."""
    (tmp_path / "tiny.yaml").write_text(TINY)
    return subprocess.Popen(  # noqa: PLW1509 - a preexec_fn only sets a signal disposition
        [RLP, *args, "--out", "sweep"], cwd=tmp_path, stdout=subprocess.PIPE, text=True, env=_env(), **popen
    )


def test_a_killed_ray_worker_is_reported_and_its_trial_resumes_exactly(tmp_path: Path):
    pytest.importorskip("ray")
    args = ["sweep", "tiny.yaml", "--num-cpus", "1", "total_steps=1200", "checkpoint.every=100"]
    sweep = _start_sweep(tmp_path, args, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 180
        while (state := trial_state(tmp_path / "sweep", "tiny", 0)) is None or state.checkpoint_step < 200:
            assert sweep.poll() is None and time.monotonic() < deadline, sweep.communicate()
            time.sleep(0.05)
        run_dir = state.run_dir
        run_pid = int((run_dir / LOCK_FILE).read_text().split()[0])  # the trial's `rlp train`
        worker = _ppid(run_pid)  # the Ray worker running the trial's task
        os.kill(worker, signal.SIGKILL)
        out, err = sweep.communicate(timeout=180)
    finally:
        if sweep.poll() is None:
            sweep.kill()
            sweep.wait()
    assert sweep.returncode == 1, out + err
    reported = [line for line in out.splitlines() if line.startswith("[1/1] tiny/seed0 FAILED")]
    assert len(reported) == 1, out + err
    reported = reported[0]
    assert "Ray: " in reported and "WorkerCrashedError" in reported, reported
    entry = manifest(tmp_path / "sweep")["trials"]["tiny/seed0"]
    assert entry["status"] == "failed" and "WorkerCrashedError" in entry["error"]

    # The same command again: the trial continues from its checkpoint (its run got SIGTERM when the worker died
    # and wrote one; the sweep waits for it to let go of the run) ...
    again = subprocess.run(
        [RLP, *args, "--out", "sweep"],
        check=False,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
    )
    assert again.returncode == 0, again.stdout + again.stderr
    assert "tiny/seed0 resumed, finished" in again.stdout
    assert [p.name for p in (tmp_path / "sweep" / "tiny").iterdir()] == [run_dir.name]
    # ... and ends as the same trial run without a fault.
    reference = subprocess.run(
        [RLP, *args, "--out", "reference", "--sequential"],
        check=False,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
    )
    assert reference.returncode == 0, reference.stdout + reference.stderr
    (reference_run,) = (tmp_path / "reference" / "tiny").iterdir()
    assert_same_model(run_dir, reference_run)
    assert_same_logs(run_dir, reference_run, monitored=False)  # the tiny sweep config runs no monitor


def _sigint_ignored() -> None:  # pragma: no cover - runs in the child between fork and exec
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def test_sigterm_stops_the_trials_of_a_sweep_started_in_the_background(tmp_path: Path):
    """A driver started as ``nohup rlp sweep ... &`` ignores SIGINT, and so do its Ray workers: Ray's
    cancellation must still reach the running trials, which write a checkpoint and stop; a queued trial is
    said not to have started."""
    pytest.importorskip("ray")
    args = ["sweep", "tiny.yaml", "--num-cpus", "2", "--seeds", "0-2", "total_steps=200000", "checkpoint.every=200"]
    # SIGINT ignored, as a non-interactive shell's `&` leaves it.
    sweep = _start_sweep(tmp_path, args, stderr=subprocess.STDOUT, preexec_fn=_sigint_ignored)
    seeds, pids = (0, 1, 2), []
    try:
        deadline = time.monotonic() + 240
        while sum(trial_state(tmp_path / "sweep", "tiny", seed) is not None for seed in seeds) < 2:
            if sweep.poll() is not None or time.monotonic() > deadline:
                pytest.fail("two trials did not checkpoint in 240 s")
            time.sleep(0.1)
        states = {seed: trial_state(tmp_path / "sweep", "tiny", seed) for seed in seeds}
        pids = [int((state.run_dir / LOCK_FILE).read_text().split()[0]) for state in states.values() if state]
        sweep.send_signal(signal.SIGTERM)
        out, _ = sweep.communicate(timeout=120)  # before the fix: the trials ran on and the driver waited
    finally:
        if sweep.poll() is None:
            sweep.kill()
            sweep.wait()
        for pid in pids:  # the runs, were they left running
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert sweep.returncode == 143, out
    assert "sweep: stopping 2 running trial(s); each writes a checkpoint first; 1 queued trial(s) will not start" in out
    assert "sweep: stopped by SIGTERM" in out, out
    entries = manifest(tmp_path / "sweep")["trials"]
    (queued,) = [seed for seed in seeds if states[seed] is None]
    for seed in seeds:
        entry = entries[f"tiny/seed{seed}"]
        assert entry["status"] == "interrupted", entries
        state = trial_state(tmp_path / "sweep", "tiny", seed)
        if seed == queued:
            assert entry["error"] == "not started: SIGTERM came first" and state is None
            assert not (tmp_path / "sweep" / "logs" / f"tiny_seed{seed}.err").exists()
            continue
        assert state is not None and 0 < state.checkpoint_step < 200000 and not state.complete
        assert entry["error"].startswith(f"stopped by SIGTERM (at step {state.checkpoint_step} of 200000")
        assert "stopped by SIGTERM" in (tmp_path / "sweep" / "logs" / f"tiny_seed{seed}.err").read_text()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """``ray start ... --block``, waited for until its node is up (stopped by SIGTERM to it)."""
    proc = subprocess.Popen(
        [RAY, "start", *args, "--disable-usage-stats", "--block"],
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while "block forever" not in log.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
        time.sleep(0.2)
    return proc


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # `ray start --block` then stops the node's processes
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def token_cluster(tmp_path: Path) -> Iterator[tuple[str, dict[str, str], str]]:
    """A two-node Ray cluster on 127.0.0.1 (one CPU each) with token authentication, as a new user makes one:
    a token in ~/.ray/auth_token (HOME is a folder of the test), ``ray start --head`` (which turns token
    authentication on when a token exists), ``RAY_AUTH_MODE=token ray start --address=...``.

    Yields the address, the environment (that HOME, no RAY_ variable) and the token. Its own --temp-dir keeps
    other Ray users of this machine from finding it as "the current cluster".
    """
    pytest.importorskip("ray")
    home = tmp_path / "home"
    home.mkdir()
    env = _env(HOME=str(home))
    made = subprocess.run(
        [RAY, "get-auth-token", "--generate"], check=False, env=env, capture_output=True, text=True, timeout=60
    )
    assert made.returncode == 0, made.stderr
    token = (home / ".ray" / "auth_token").read_text().strip()
    port = _free_port()
    temp = tempfile.mkdtemp(prefix="rlpray", dir="/tmp")  # short: Ray's socket paths have a length limit
    nodes = []
    try:
        nodes.append(
            _start(
                [
                    "--head",
                    f"--port={port}",
                    "--node-ip-address=127.0.0.1",
                    "--num-cpus=1",
                    "--include-dashboard=false",
                    f"--temp-dir={temp}",
                ],
                env,
                tmp_path / "head.log",
            )
        )
        nodes.append(
            _start(
                [f"--address=127.0.0.1:{port}", "--node-ip-address=127.0.0.1", "--num-cpus=1"],
                {**env, "RAY_AUTH_MODE": "token"},
                tmp_path / "worker.log",
            )
        )
        yield f"127.0.0.1:{port}", env, token
    finally:
        for node in reversed(nodes):
            _stop(node)
        subprocess.run(["rm", "-rf", temp], check=False)


def test_sweep_joins_a_two_node_cluster_with_token_authentication(tmp_path: Path, token_cluster):
    address, env, token = token_cluster
    (tmp_path / "tiny.yaml").write_text(TINY)
    args = [RLP, "sweep", "tiny.yaml", "--out", "sweep", "--seeds", "0-1", "--address", address]

    # Without RAY_AUTH_MODE=token: refused in one line that says what to set, nothing written.
    refused = subprocess.run(args, check=False, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    line = refused.stderr.strip().splitlines()[-1]
    assert line.startswith(
        f"rlp: error: --address: cannot join Ray at {address}: the cluster uses token authentication"
    ), line
    assert "set RAY_AUTH_MODE=token" in line and "RAY_AUTH_TOKEN" in line and "~/.ray/auth_token" in line
    assert not (tmp_path / "sweep").exists()

    # With it (the token from ~/.ray/auth_token, or as RAY_AUTH_TOKEN): the two trials run, one on each node
    # (one CPU each), side by side.
    joined = subprocess.run(
        args,
        check=False,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**env, "HOME": str(tmp_path), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token},
    )
    assert joined.returncode == 0, joined.stdout + joined.stderr
    assert f"2 to run on the Ray cluster at {address}" in joined.stdout
    trials = manifest(tmp_path / "sweep")["trials"]
    assert {t: e["status"] for t, e in trials.items()} == {"tiny/seed0": "finished", "tiny/seed1": "finished"}
    import datetime as dt

    spans = []
    for seed in (0, 1):
        header = (tmp_path / "sweep" / "logs" / f"tiny_seed{seed}.err").read_text().splitlines()[0]
        start = dt.datetime.fromisoformat(header.split()[1])
        spans.append((start, start + dt.timedelta(seconds=trials[f"tiny/seed{seed}"]["seconds"])))
    (start_a, end_a), (start_b, end_b) = spans
    assert (min(end_a, end_b) - max(start_a, start_b)).total_seconds() > 1.0, spans  # two nodes at once
