"""Faults a long study meets, on real `rlp train` processes: a second writer on a live run, SIGKILL inside a
checkpoint write, damaged checkpoint files, a full disk. Each is told in one line, and every resume ends with
exactly the parameters, optimizer state, TensorBoard scalars and task_summary.csv of an uninterrupted run.
(The Ray faults, a dead worker and joining a cluster with token authentication, are in test_faults_ray.py.)
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_checkpoint import assert_same_logs, assert_same_model, latest_step, latest_step_under, only_run

from rl_plasticity.catalog import registries
from rl_plasticity.checkpoint import CheckpointStore
from rl_plasticity.cli import cli
from rl_plasticity.config import load_config
from rl_plasticity.layout import LOCK_FILE
from rl_plasticity.runlock import is_locked, run_lock
from rl_plasticity.runner import train

RLP = str(Path(sys.executable).with_name("rlp"))

# DQN on CartPole, 3 tasks of 400 steps, the monitor on (its state is part of what a resume restores), a
# checkpoint every 100 steps and the last two kept (so a damaged newest one has an older one to fall back to).
CONFIG = """\
name: f
seed: 3
total_steps: 1200
threads: 1
agent: {algo: dqn, learning_starts: 100, buffer_size: 2000, batch_size: 16, train_freq: 4,
        target_update_interval: 100, exploration_fraction: 0.5}
net: {kind: mlp, width: 16, depth: 1}
env: {sequence: cartpole_shift, switch_every: 400}
logging: {progress_bar: false, root_dir: out}
monitor: {probe_every: 50, probe_set_size: 32, probes: [rank, weights], switch_probes: []}
checkpoint: {every: 100, keep: 2}
"""

# `rlp train` in a process that pauses (writes a marker file, then sleeps) at the Nth call of a function of
# rl_plasticity.checkpoint, so that a test can SIGKILL it at an exact point inside a checkpoint write.
PAUSING = """\
import sys, time
from pathlib import Path
import rl_plasticity.checkpoint as checkpoint
marker, owner, name, nth = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
owner = checkpoint if owner == "module" else getattr(checkpoint, owner)
original, calls = getattr(owner, name), []
def paused(*args, **kwargs):
    calls.append(1)
    if len(calls) == nth:
        Path(marker).write_text("paused")
        time.sleep(600)
    return original(*args, **kwargs)
setattr(owner, name, paused)
from rl_plasticity.cli import main
sys.argv = ["rlp", *sys.argv[5:]]
main()
"""


def cli_run(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run."""
    folder = tmp_path_factory.mktemp("reference")
    (folder / "f.yaml").write_text(CONFIG)
    return train(load_config(folder / "f.yaml", [f"logging.root_dir={folder / 'out'}"], registries=registries()))


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "f.yaml").write_text(CONFIG)
    return tmp_path


def wait_until(proc: subprocess.Popen, condition, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended before {what}: {proc.communicate()}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def assert_same_run(run_dir: Path, reference: Path) -> None:
    assert_same_model(run_dir, reference)
    assert_same_logs(run_dir, reference)
    assert (run_dir / "task_summary.csv").read_text() == (reference / "task_summary.csv").read_text()


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file below ``folder``: size and modification time."""
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# -- one writer per run ------------------------------------------------------------------------------------


def test_a_second_writer_is_refused_while_the_first_lives(workdir: Path, reference: Path):
    first = subprocess.Popen(
        [RLP, "train", "f.yaml", "total_steps=50000"],
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(first, lambda: latest_step_under(workdir / "out" / "f") >= 100, "a checkpoint")
        run_dir = only_run(workdir / "out" / "f")
        first.send_signal(signal.SIGSTOP)  # frozen with its lock held: any change now is the second writer's
        before = snapshot(run_dir)
        second = subprocess.run(
            [RLP, "train", "--resume", str(run_dir)],
            check=False,
            cwd=workdir,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert second.returncode == 2, second.stderr
        (line,) = second.stderr.strip().splitlines()
        assert line == (
            f"rlp: error: {run_dir} is being written by PID {first.pid} (rlp train); one writer per "
            "run: wait for it to end or stop it, then resume"
        )
        assert snapshot(run_dir) == before  # nothing written
        assert is_locked(run_dir)
        first.send_signal(signal.SIGCONT)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    # The kernel dropped the dead process's lock: nothing stale is left, the run can be resumed at once.
    assert not is_locked(run_dir)
    result = cli_run("train", "--resume", str(run_dir), "--force", f"total_steps={latest_step(run_dir) + 100}")
    assert result.exit_code == 0, result.output
    assert f"resuming {run_dir} from step_" in result.stderr


def test_the_run_and_the_sweep_lock_are_one_flock_helper(tmp_path: Path):
    # In one process too: flock belongs to the open file, so a second open of .lock is a second holder.
    from rl_plasticity.runlock import RunInUse
    from rl_plasticity.sweep.driver import _exclusive
    from rl_plasticity.sweep.grid import SweepError

    with run_lock(tmp_path):
        assert is_locked(tmp_path)
        with (
            pytest.raises(RunInUse, match=f"is being written by PID {os.getpid()} \\(rlp train\\)"),
            run_lock(tmp_path),
        ):
            pass
        with pytest.raises(SweepError, match="another rlp sweep is running"), _exclusive(tmp_path):
            pass
    assert not is_locked(tmp_path)
    with _exclusive(tmp_path):
        with pytest.raises(RunInUse), run_lock(tmp_path):
            pass
    # An error raised inside the block is the block's own, not a lock someone else holds.
    with pytest.raises(BlockingIOError, match="the block's"), run_lock(tmp_path):
        raise BlockingIOError("the block's")
    assert not is_locked(tmp_path)


def test_the_lock_is_taken_before_anything_is_written_and_released_after(workdir: Path, reference: Path):
    run_dir = workdir / "run"
    shutil.copytree(reference, run_dir)
    before = snapshot(run_dir)
    with run_lock(run_dir):  # as a live run in this very process holds it
        result = cli_run("train", "--resume", str(run_dir))
    assert result.exit_code == 2 and f"PID {os.getpid()}" in result.stderr
    after = snapshot(run_dir)
    assert after.pop(LOCK_FILE) and {k: v for k, v in before.items() if k != LOCK_FILE} == after
    # A finished run's resume takes and frees the lock.
    assert cli_run("train", "--resume", str(run_dir)).exit_code == 0 and not is_locked(run_dir)


# -- SIGKILL inside a checkpoint write ---------------------------------------------------------------------

# (what to pause in, which call, the checkpoint the resume must start from, the line the resume prints)
KILL_POINTS = {
    # The third checkpoint (step 300) half-written in its .tmp- folder: model.zip and the buffer are there.
    "inside the temporary folder": (("module", "capture", 3), 200, "an unfinished checkpoint write"),
    # The third checkpoint renamed into place, `latest` still naming step 200.
    "between the rename and latest": (("CheckpointStore", "_point_latest", 3), 300, "is complete and newer than"),
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_sigkill_inside_a_checkpoint_write_then_resume_equals_uninterrupted(workdir: Path, reference: Path, point: str):
    (owner, name, nth), resumed_from, told = KILL_POINTS[point]
    (workdir / "pausing.py").write_text(PAUSING)
    marker = workdir / "paused"
    proc = subprocess.Popen(
        [sys.executable, "pausing.py", str(marker), owner, name, str(nth), "train", "f.yaml"],
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)),
    )
    try:
        wait_until(proc, marker.exists, "the pause inside the write")
        run_dir = only_run(workdir / "out" / "f")
        leftovers = [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
        assert latest_step(run_dir) == 200
        if resumed_from == 200:  # half-written
            assert leftovers and not (run_dir / "checkpoints" / "step_000000000300").exists(), leftovers
        else:  # complete, but not yet named by latest
            assert not leftovers and (run_dir / "checkpoints" / "step_000000000300" / "meta.json").is_file()
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    result = cli_run("train", "--resume", str(run_dir))
    assert result.exit_code == 0, result.output
    assert told in result.stderr
    assert f"resuming {run_dir} from step_{resumed_from:012d}" in result.stderr
    for leftover in leftovers:  # removed, and said so
        assert f"removed {run_dir / 'checkpoints' / leftover}: an unfinished" in result.stderr
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    assert_same_run(run_dir, reference)


# -- damaged checkpoint files ------------------------------------------------------------------------------


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


# (damage to the newest checkpoint, step_1200, the words of the line that names it)
DAMAGES = {
    "truncated model.zip": (lambda c: _truncate(c / "model.zip"), "model.zip: truncated or changed"),
    "truncated state.pt": (lambda c: _truncate(c / "state.pt"), "state.pt: truncated or changed"),
    "altered replay buffer": (
        lambda c: _flip_last_byte(c / "replay_buffer" / "observations.npy"),
        "observations.npy: altered",
    ),
    "no meta.json": (lambda c: (c / "meta.json").unlink(), "meta.json: missing or corrupt"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_newest_checkpoint_is_named_and_the_resume_falls_back(workdir: Path, reference: Path, damage: str):
    run_dir = workdir / "run"
    shutil.copytree(reference, run_dir)
    store = CheckpointStore(run_dir)
    older, newest = store.checkpoints()
    assert (older.name, newest.name) == ("step_000000001100", "step_000000001200")
    harm, words = DAMAGES[damage]
    harm(newest)  # the resume must now run the last 100 steps again, from step_1100, and end as the reference
    result = cli_run("train", "--resume", str(run_dir))
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    (told,) = [line for line in lines if words in line]
    assert told.startswith(f"rlp: {newest}/") and told.endswith(
        f": resuming from the newest complete checkpoint before it, {older}"
    ), told
    assert f"rlp: removed {newest}: newer than the checkpoint resumed from, and unusable (see above)" in lines
    assert f"resuming {run_dir} from step_000000001100 (env step 1100 of 1200)" in result.stderr
    assert_same_run(run_dir, reference)


def test_latest_naming_a_missing_folder_falls_back(workdir: Path, reference: Path):
    run_dir = workdir / "run"
    shutil.copytree(reference, run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "step_000000001200")
    result = cli_run("train", "--resume", str(run_dir))
    assert result.exit_code == 0, result.output
    assert (
        f"rlp: {run_dir / 'checkpoints' / 'latest'} names 'step_000000001200', which is not there: resuming "
        f"from the newest complete checkpoint, {run_dir / 'checkpoints' / 'step_000000001100'}"
    ) in result.stderr
    assert_same_run(run_dir, reference)


def test_no_usable_checkpoint_one_line_exit_2_nothing_removed(workdir: Path, reference: Path):
    run_dir = workdir / "run"
    shutil.copytree(reference, run_dir)
    older, newest = CheckpointStore(run_dir).checkpoints()
    _truncate(newest / "state.pt")
    _flip_last_byte(older / "model.zip")
    before = snapshot(run_dir)
    result = cli_run("train", "--resume", str(run_dir))
    assert result.exit_code == 2, result.output
    (line,) = result.stderr.strip().splitlines()
    size = before[f"checkpoints/{newest.name}/state.pt"][0]
    written = (reference / "checkpoints" / newest.name / "state.pt").stat().st_size
    assert line == (
        f"rlp: error: {newest / 'state.pt'}: truncated or changed ({size} bytes, {written} written); the "
        "1 older one(s) are unusable too; no complete checkpoint to resume from"
    )
    after = snapshot(run_dir)
    after.pop(LOCK_FILE)
    assert after == {k: v for k, v in before.items() if k != LOCK_FILE}  # nothing removed or written


# -- a full disk ------------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(workdir: Path):
    """A real 16 MB filesystem (tmpfs, mounted here: needs root); skipped where mounting is not allowed."""
    disk = workdir / "disk"
    disk.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)]
    mounted = subprocess.run(mount, check=False, capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(
            f"cannot mount a small tmpfs here ({mounted.stderr.decode().strip()}); "
            "test_a_write_that_fails_for_lack_of_space_keeps_the_checkpoint covers ENOSPC by patching"
        )
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(disk: Path) -> Path:
    """Take every free byte of ``disk`` with one file (until the filesystem says ENOSPC)."""
    filler = disk / "filler"
    with filler.open("wb", buffering=0) as f:  # unbuffered: closing it writes nothing more
        try:
            while True:
                f.write(b"\0" * (1 << 16))
        except OSError:
            pass
    return filler


def test_full_disk_stops_with_exit_4_naming_the_file_and_the_intact_checkpoint(
    workdir: Path, reference: Path, small_disk: Path
):
    """A real full filesystem: a 16 MB tmpfs, filled by this test while the run trains."""
    root = small_disk / "out"
    proc = subprocess.Popen(
        [RLP, "train", "f.yaml", f"logging.root_dir={root}"],
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_until(proc, lambda: latest_step_under(root / "f") >= 100, "a checkpoint")
    filler = fill(small_disk)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 4, err
    run_dir = only_run(root / "f")
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"rlp: error: cannot write {run_dir}") and "(No space left on device)" in last, last
    kept = CheckpointStore(run_dir).latest()
    assert kept is not None
    assert last.endswith(
        f"last good checkpoint: {kept} (intact); make room (or make it writable), then: rlp train --resume {run_dir}"
    )
    CheckpointStore(run_dir).verify(kept)  # every file as written (sizes and SHA-256)
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".tmp")]

    filler.unlink()  # room again: the resume continues from the kept checkpoint, exactly
    result = cli_run("train", "--resume", str(run_dir))
    assert result.exit_code == 0, result.output
    assert_same_run(run_dir, reference)


def test_read_only_run_directory_stops_with_exit_4(workdir: Path, reference: Path, small_disk: Path):
    """A real read-only filesystem: the tmpfs remounted read-only under a stopped run."""
    run_dir = small_disk / "run"
    shutil.copytree(reference, run_dir)
    config = run_dir / "config.yaml"
    config.write_text(config.read_text().replace("total_steps: 1200", "total_steps: 1500"))
    before = snapshot(run_dir)
    assert subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=False).returncode == 0
    try:
        result = cli_run("train", "--resume", str(run_dir))
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)
    assert result.exit_code == 4, result.output
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"rlp: error: cannot write {run_dir}") and "(Read-only file system)" in line, line
    assert f"last good checkpoint: {run_dir / 'checkpoints' / 'step_000000001200'} (intact)" in line
    assert snapshot(run_dir) == before


def test_a_write_that_fails_for_lack_of_space_keeps_the_checkpoint(workdir: Path, monkeypatch: pytest.MonkeyPatch):
    """ENOSPC by patching (runs everywhere): the replay buffer's write fails inside the third checkpoint."""
    import errno

    from rl_plasticity import checkpoint

    original, calls = checkpoint.save_replay_buffer, []

    def no_space(buffer, folder):
        calls.append(folder)
        if len(calls) == 3:
            folder.mkdir()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return original(buffer, folder)

    monkeypatch.setattr(checkpoint, "save_replay_buffer", no_space)
    result = cli_run("train", "f.yaml")
    assert result.exit_code == 4, result.output
    run_dir = only_run(workdir / "out" / "f")
    line = result.stderr.strip().splitlines()[-1]
    printed = Path("out") / "f" / run_dir.name  # as the config gives it (logging.root_dir: out)
    tmp = printed / "checkpoints" / f".tmp-step_000000000300-{os.getpid()}"
    assert line == (
        f"rlp: error: cannot write {tmp / 'replay_buffer'} (No space left on device); training stopped; "
        f"removed the unfinished checkpoint {tmp}; last good checkpoint: "
        f"{printed / 'checkpoints' / 'step_000000000200'} (intact); make room (or make it writable), "
        f"then: rlp train --resume {printed}"
    )
    assert not (workdir / tmp).exists() and latest_step(run_dir) == 200
    CheckpointStore(run_dir).verify(run_dir / "checkpoints" / "step_000000000200")
