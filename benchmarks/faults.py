"""Faults against real ``rlp train`` processes: random kills, kills inside checkpoint writes, a second writer,
damaged checkpoints and a full disk, each resumed and compared with an uninterrupted run.

What it does: one uninterrupted reference run of a tiny config (DQN on CartPole, 3 tasks of 200 steps, the
monitor on, a checkpoint every 50 steps, the last two kept), then for each kind of fault N trials, each a
fresh run in its own process with the fault put in at a random point, then ``rlp train --resume`` (a new
process) until it finishes:

- ``SIGKILL at a random time``: at a uniformly drawn moment of the run's training time;
- ``SIGKILL inside a checkpoint write``: at the k-th (random, k >= 2) moment a ``checkpoints/.tmp-*`` entry appears
  (a checkpoint folder being written, ``latest`` being replaced, an old checkpoint being deleted), polled
  as fast as Python can; a trial counts as inside when the ``.tmp-`` entry is still there after the kill;
- ``second writer``: while the run trains (frozen with SIGSTOP so that any change is the intruder's), a
  second ``rlp train --resume``: it must be refused with one line naming the holder's PID and change
  nothing; then the first run goes on to its end;
- ``damaged checkpoint``: the run killed after a random checkpoint, then a random file of its newest
  checkpoint truncated, altered by one byte, or deleted, or ``latest`` pointed at a missing folder: the
  resume must name the damage in one line and fall back to the older checkpoint;
- ``full disk`` (root only: a 16 MB tmpfs mounted per trial): the disk filled after a random checkpoint:
  exit 4 with one line naming the file and the intact last checkpoint; then room is made and it resumes.

How to read it: ``exact resumes`` = the finished run's parameters, optimizer state, TensorBoard scalars
(all but ``time/``) and ``task_summary.csv`` equal the reference's; ``refused with a clear line`` = the
fault was told in the expected one line (refusal, fallback, exit 4); ``lost steps`` = the step of the
newest checkpoint on disk that passes its checks (sizes, SHA-256, loadable) right after the fault, minus
the step the resume started from (what a resume threw away of finished, good work). The target: every
trial exact, 0 steps lost. The last line is ``faults: <exact>/<trials> exact, <lost> steps lost``.

It is CPU-heavy (two processes per trial, about 10 s each on a quiet 2-core machine): run it nice'd.

Measured here (2 cores at a load of 4-8, 20 minutes): 33/33 exact, 0 steps lost; 10 random SIGKILLs, 10
SIGKILLs with a ``.tmp-`` entry still there (all inside a write), 3 second writers refused, 6 damaged
checkpoints named and fallen back from, 4 full disks stopped with exit 4.

    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/faults.py                 # 33 trials, 20 of them SIGKILLs
    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/faults.py --trials 2      # smoke run
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch as th
from stable_baselines3.common.save_util import load_from_zip_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from rl_plasticity.checkpoint import CheckpointError, CheckpointStore

RLP = str(Path(sys.executable).with_name("rlp"))
CONFIG = """\
name: f
seed: 5
total_steps: 600
threads: 1
agent: {algo: dqn, learning_starts: 50, buffer_size: 1000, batch_size: 16, train_freq: 2,
        target_update_interval: 50, exploration_fraction: 0.5}
net: {kind: mlp, width: 16, depth: 1}
env: {sequence: cartpole_shift, switch_every: 200}
logging: {progress_bar: false, root_dir: out}
monitor: {probe_every: 25, probe_set_size: 32, probes: [rank, weights], switch_probes: []}
checkpoint: {every: 50, keep: 2}
"""
CHECKPOINTS = 12  # 600 / 50


@dataclass
class Outcome:
    exact: bool
    told: bool | None  # None: this kind has nothing to tell
    lost: int
    note: str = ""


# -- processes and run directories -------------------------------------------------------------------------


def start(cwd: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [RLP, "train", *args], cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )


def run_dir_of(root: Path) -> Path | None:
    runs = [p for p in (root / "f").glob("*") if (p / "config.yaml").is_file()] if (root / "f").is_dir() else []
    return runs[0] if runs else None


def wait_for(proc: subprocess.Popen, condition: Callable[[], object], timeout: float = 300.0) -> object:
    """Poll ``condition`` until it is truthy (returned); ``None`` if the process ended first."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if proc.poll() is not None or time.monotonic() > deadline:
            return None
        time.sleep(0.005)


def latest_step(run_dir: Path) -> int:
    latest = CheckpointStore(run_dir).latest()
    return -1 if latest is None else int(latest.name.split("_")[1].split(".")[0])


def best_valid_step(run_dir: Path) -> int:
    """The newest checkpoint that passes every check a resume makes (-1: none)."""
    store = CheckpointStore(run_dir)
    for path in reversed(store.checkpoints()):
        try:
            return store.verify(path).step
        except CheckpointError:
            continue
    return -1


def resume(cwd: Path, run_dir: Path) -> tuple[int, str, int | None]:
    """``rlp train --resume`` in a new process: exit status, stderr, the step it resumed from."""
    done = subprocess.run(
        [RLP, "train", "--resume", str(run_dir)], check=False, cwd=cwd, capture_output=True, text=True, timeout=900
    )
    step = None
    for line in done.stderr.splitlines():
        if line.startswith(f"rlp: resuming {run_dir} from step_"):
            step = int(line.split(" from step_")[1].split()[0].split(".")[0])
        elif line.startswith(f"rlp: {run_dir} is complete ("):  # killed after its final checkpoint
            step = int(line.split(" is complete (")[1].split()[0])
    return done.returncode, done.stderr, step


def kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait()


# -- comparing with the reference ----------------------------------------------------------------------------


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {
        tag: [(e.step, e.value) for e in acc.Scalars(tag)]
        for tag in acc.Tags()["scalars"]
        if not tag.startswith("time/")
    }


def same_values(a: list[tuple[int, float]], b: list[tuple[int, float]]) -> bool:
    return len(a) == len(b) and all(
        s == t and (v == w or (math.isnan(v) and math.isnan(w))) for (s, v), (t, w) in zip(a, b)
    )


class Reference:
    """The uninterrupted run, read once."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        _, self.params, _ = load_from_zip_file(run_dir / "model.zip")
        self.scalars = scalars(run_dir)
        self.summary = (run_dir / "task_summary.csv").read_text()

    def equals(self, run_dir: Path) -> bool:
        if not (run_dir / "model.zip").is_file():
            return False
        _, params, _ = load_from_zip_file(run_dir / "model.zip")
        if any(not th.equal(params["policy"][k], v) for k, v in self.params["policy"].items()):
            return False
        for p, state in self.params["policy.optimizer"]["state"].items():
            if any(not th.equal(params["policy.optimizer"]["state"][p][k], v) for k, v in state.items()):
                return False
        got = scalars(run_dir)
        return (
            got.keys() == self.scalars.keys()
            and all(same_values(got[t], self.scalars[t]) for t in got)
            and (run_dir / "task_summary.csv").read_text() == self.summary
        )


# -- the faults --------------------------------------------------------------------------------------------


def finish(
    cwd: Path, run_dir: Path, ref: Reference, told: bool | None, expect: str | None = None, note: str = ""
) -> Outcome:
    """Resume after a fault to the end; exact? lost steps? (``expect``: a line the resume must print)."""
    best = best_valid_step(run_dir)
    code, err, step = resume(cwd, run_dir)
    if code != 0:
        return Outcome(False, told, 0, f"resume exited {code}: {err.strip().splitlines()[-1:]}")
    if expect is not None:
        told = expect in err
    lost = max(0, best - (step if step is not None else -1))
    return Outcome(ref.equals(run_dir), told, lost, note)


def kill_random(cwd: Path, ref: Reference, rng: random.Random, seconds: float) -> Outcome:
    while True:
        proc = start(cwd, "f.yaml")
        if wait_for(proc, lambda: run_dir_of(cwd / "out")) is None:
            raise SystemExit(f"the run did not start: {proc.communicate()}")
        time.sleep(rng.uniform(0, seconds))
        if proc.poll() is None:
            break
        shutil.rmtree(cwd / "out")  # it finished first: draw again
    kill(proc)
    run_dir = run_dir_of(cwd / "out")
    assert run_dir is not None
    if latest_step(run_dir) < 0 and best_valid_step(run_dir) < 0:  # killed before its first checkpoint
        shutil.rmtree(cwd / "out")
        return kill_random(cwd, ref, rng, seconds)
    return finish(cwd, run_dir, ref, None)


def kill_in_write(cwd: Path, ref: Reference, rng: random.Random) -> Outcome:
    # The k-th .tmp- entry seen (a write makes 1-3 of them); from the 2nd on, so that the first checkpoint folder
    # is in place (a run killed inside its first write has nothing to resume: rlp train --resume says so, exit 2).
    k = rng.randint(2, CHECKPOINTS)
    proc = start(cwd, "f.yaml")
    seen: set[str] = set()

    def kth_write() -> bool:
        run_dir = run_dir_of(cwd / "out")
        if run_dir is None:
            return False
        try:
            names = [e.name for e in os.scandir(run_dir / "checkpoints") if e.name.startswith(".tmp-")]
        except OSError:
            return False
        seen.update(names)
        if len(seen) >= k:
            proc.send_signal(signal.SIGKILL)  # at once: still inside the write, most of the time
            return True
        return False

    if wait_for(proc, kth_write) is None:  # fewer entries seen than drawn: draw again
        proc.wait()
        shutil.rmtree(cwd / "out")
        return kill_in_write(cwd, ref, rng)
    proc.wait()
    run_dir = run_dir_of(cwd / "out")
    assert run_dir is not None
    inside = any(p.name.startswith(".tmp-") for p in (run_dir / "checkpoints").iterdir())
    return finish(cwd, run_dir, ref, None, note="inside" if inside else "just after")


def second_writer(cwd: Path, ref: Reference, rng: random.Random) -> Outcome:
    k = rng.randint(1, CHECKPOINTS - 2) * 50
    proc = start(cwd, "f.yaml")
    try:
        if wait_for(proc, lambda: (r := run_dir_of(cwd / "out")) is not None and latest_step(r) >= k) is None:
            return Outcome(False, False, 0, f"the run ended before step {k}")
        run_dir = run_dir_of(cwd / "out")
        assert run_dir is not None
        proc.send_signal(signal.SIGSTOP)
        before = snapshot(run_dir)
        intruder = subprocess.run(
            [RLP, "train", "--resume", str(run_dir)], check=False, cwd=cwd, capture_output=True, text=True, timeout=300
        )
        lines = intruder.stderr.strip().splitlines()
        told = (
            intruder.returncode == 2
            and len(lines) == 1
            and f"PID {proc.pid}" in lines[0]
            and str(run_dir) in lines[0]
            and snapshot(run_dir) == before
        )
        proc.send_signal(signal.SIGCONT)
        code = proc.wait(timeout=900)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            kill(proc)
    return Outcome(code == 0 and ref.equals(run_dir), told, 0, "" if code == 0 else f"the first run exited {code}")


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def damaged(cwd: Path, ref: Reference, rng: random.Random) -> Outcome:
    k = rng.randint(3, CHECKPOINTS - 1) * 50
    proc = start(cwd, "f.yaml")
    if wait_for(proc, lambda: (r := run_dir_of(cwd / "out")) is not None and latest_step(r) >= k) is None:
        return Outcome(False, False, 0, f"the run ended before step {k}")
    kill(proc)
    run_dir = run_dir_of(cwd / "out")
    assert run_dir is not None
    store = CheckpointStore(run_dir)
    newest = store.checkpoints()[-1]
    # (a flipped byte in meta.json could change a recorded size: then another file is named, rightly)
    files = sorted(p for p in newest.rglob("*") if p.is_file())
    how = rng.choice(["truncate", "flip a byte", "delete", "latest names a missing folder"])
    if how == "latest names a missing folder":
        shutil.rmtree(newest)
        (store.root / "latest").write_text(newest.name + "\n")
        named = f"names '{newest.name}', which is not there"
    else:
        target = rng.choice([f for f in files if how != "flip a byte" or f.name != "meta.json"])
        {"truncate": _truncate, "flip a byte": _flip, "delete": Path.unlink}[how](target)
        named = target.name
    # Lost steps are counted from the newest checkpoint that is still good after the damage.
    return finish(cwd, run_dir, ref, None, expect=named, note=how)


def full_disk(cwd: Path, ref: Reference, rng: random.Random) -> Outcome:
    disk = cwd / "disk"
    disk.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)]
    if subprocess.run(mount, check=False, capture_output=True).returncode:
        raise PermissionError("cannot mount a tmpfs here")
    try:
        k = rng.randint(1, CHECKPOINTS - 2) * 50
        root = disk / "out"
        proc = start(cwd, "f.yaml", f"logging.root_dir={root}")
        if wait_for(proc, lambda: (r := run_dir_of(root)) is not None and latest_step(r) >= k) is None:
            return Outcome(False, False, 0, f"the run ended before step {k}")
        filler = disk / "filler"
        with filler.open("wb", buffering=0) as f:  # unbuffered: closing it writes nothing more
            try:
                while True:
                    f.write(b"\0" * (1 << 16))
            except OSError:
                pass
        _, err = proc.communicate(timeout=300)
        run_dir = run_dir_of(root)
        assert run_dir is not None
        line = err.strip().splitlines()[-1] if err.strip() else ""
        kept = CheckpointStore(run_dir).latest()
        told = (
            proc.returncode == 4
            and line.startswith("rlp: error: cannot write ")
            and f"last good checkpoint: {kept} (intact)" in line
        )
        filler.unlink()
        return finish(cwd, run_dir, ref, told)
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


# -- the table ---------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--trials",
        type=int,
        default=None,
        help="trials of each kind (default: 10 random kills, 10 kills in writes, 3 second "
        "writers, 6 damaged checkpoints, 4 full disks)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()
    logging.getLogger("tensorboard").setLevel(logging.ERROR)  # its note on each resume's purge_step
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="rlp-faults-"))
    print(f"load average {os.getloadavg()[0]:.1f}; work folder {work}", flush=True)

    refdir = work / "reference"
    refdir.mkdir()
    (refdir / "f.yaml").write_text(CONFIG)
    proc = start(refdir, "f.yaml")
    run_dir = wait_for(proc, lambda: run_dir_of(refdir / "out"))
    began = time.monotonic()
    _, err = proc.communicate()
    seconds = time.monotonic() - began
    if proc.returncode != 0 or run_dir is None:
        raise SystemExit(f"the reference run failed: {err}")
    ref = Reference(run_dir)  # type: ignore[arg-type]
    print(f"reference: {seconds:.1f} s of training (600 env steps, {CHECKPOINTS} checkpoints)", flush=True)

    n = args.trials
    kinds: list[tuple[str, int, Callable[[Path], Outcome]]] = [
        ("SIGKILL at a random time", n or 10, lambda cwd: kill_random(cwd, ref, rng, seconds)),
        ("SIGKILL inside a checkpoint write", n or 10, lambda cwd: kill_in_write(cwd, ref, rng)),
        ("second writer (rlp train --resume)", n or 3, lambda cwd: second_writer(cwd, ref, rng)),
        ("damaged newest checkpoint", n or 6, lambda cwd: damaged(cwd, ref, rng)),
        ("full disk (16 MB tmpfs)", n or 4, lambda cwd: full_disk(cwd, ref, rng)),
    ]
    rows = []
    for name, count, trial in kinds:
        outcomes: list[Outcome] = []
        for i in range(count):
            cwd = work / f"{name.split()[0].lower()}-{i}"
            cwd.mkdir()
            (cwd / "f.yaml").write_text(CONFIG)
            try:
                outcome = trial(cwd)
            except PermissionError as exc:
                print(f"  {name}: skipped ({exc})", flush=True)
                break
            outcomes.append(outcome)
            print(
                f"  {name} #{i + 1}: {'exact' if outcome.exact else 'NOT EXACT'}, lost {outcome.lost}"
                + ("" if outcome.told is None else f", told {'yes' if outcome.told else 'NO'}")
                + (f" ({outcome.note})" if outcome.note else ""),
                flush=True,
            )
            if not args.keep:
                shutil.rmtree(cwd, ignore_errors=True)
        if outcomes:
            told = [o.told for o in outcomes if o.told is not None]
            notes = sorted({o.note for o in outcomes if o.note in ("inside", "just after")})
            extra = ", ".join(f"{sum(o.note == k for o in outcomes)} {k}" for k in notes)
            extra = f" ({extra})" if extra else ""
            rows.append(
                (
                    name + extra,
                    len(outcomes),
                    sum(o.exact for o in outcomes),
                    f"{sum(told)}/{len(told)}" if told else "-",
                    sum(o.lost for o in outcomes),
                )
            )

    width = max(len(r[0]) for r in rows)
    print(f"\n| {'fault':<{width}} | trials | exact resumes | refused with a clear line | lost steps |")
    print(f"|{'-' * (width + 2)}|--------|---------------|---------------------------|------------|")
    for name, trials, exact, told, lost in rows:
        print(f"| {name:<{width}} | {trials:>6} | {exact:>13} | {told:>25} | {lost:>10} |")
    total, exact, lost = sum(r[1] for r in rows), sum(r[2] for r in rows), sum(r[4] for r in rows)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    print(f"faults: {exact}/{total} exact, {lost} steps lost")


if __name__ == "__main__":
    main()
