"""Run one trial of a sweep: an ordinary ``rlp train`` in a subprocess, resumed if it had started before.

A subprocess keeps each trial's torch threads, signal handling and exit status its own, exactly as when
the run is started by hand. :func:`execute_trial` is what a Ray task (or the sequential fallback) calls.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as dt
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from rl_plasticity.rundirs import trial_runs, trial_state
from rl_plasticity.runlock import holder, is_locked, wait_unlocked

#: Seconds a trial gets to write its checkpoint after SIGTERM before it is killed.
STOP_GRACE = 300.0
#: Exit statuses of ``rlp train`` that mean "stopped by a signal, after writing a checkpoint".
SIGNAL_EXITS = {130: "SIGINT", 143: "SIGTERM"}


@dataclass(frozen=True)
class TrialJob:
    """What a worker needs to run one trial (plain data, so it pickles to any Ray node).

    :param overrides: the full overrides of ``rlp train CONFIG ...`` (:meth:`Trial.run_overrides`).
    """

    trial_id: str
    label: str
    seed: int
    config: str
    overrides: tuple[str, ...]
    sweep_dir: str
    cpus: int


@dataclass(frozen=True)
class TrialOutcome:
    """How a trial ended.

    :param status: ``finished`` (reached total_steps), ``failed`` or ``interrupted`` (stopped by a signal
        after writing a checkpoint: the next run of the sweep resumes it).
    :param mode: ``started``, ``resumed`` or ``skipped`` (it was complete already).
    :param error: for a failed or interrupted trial, one line: the run's last error line and exit status.
    """

    trial_id: str
    status: str
    mode: str
    run_dir: str | None
    exit_code: int | None
    error: str | None
    seconds: float


def _load_prctl() -> Callable[..., int] | None:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None


# Looked up here, not in the child: between fork and exec (in a threaded Ray worker) only a plain call is safe.
_PRCTL = _load_prctl() if sys.platform == "linux" else None


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: SIGTERM the trial if its worker dies (a killed Ray worker would otherwise leave it running);
    ``rlp train`` then writes a checkpoint and stops, so the trial resumes on the next run of the sweep."""
    if _PRCTL is not None:
        _PRCTL(1, int(signal.SIGTERM))  # 1 = PR_SET_PDEATHSIG


def _last_error_line(text: str) -> str:
    """The line that says what went wrong: ``rlp``'s own error line, else the last line (a traceback's)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines[-50:]):
        if line.startswith("rlp: ") and "checkpoint at env step" not in line:
            return line
    return lines[-1] if lines else "(no output on stderr)"


def execute_trial(job: TrialJob) -> TrialOutcome:
    """Run (or resume) one trial to its end and say how it ended. Never raises for a failed run.

    A complete run is skipped; a run with a checkpoint is continued with ``rlp train --resume``; a run that
    died before its first checkpoint holds nothing to continue and is removed (said in the log), and the
    trial starts anew. A run still held by a live process (an earlier attempt whose worker died: it got
    SIGTERM and writes its checkpoint) is waited for, up to :data:`STOP_GRACE` seconds.
    Its stdout and stderr are appended to ``logs/<label>_seed<k>.out`` and ``.err`` of the sweep directory.
    On KeyboardInterrupt (Ray's task cancellation, or Ctrl-C in the sequential fallback) the run gets
    SIGTERM, writes its checkpoint and stops; the outcome is then ``interrupted``.
    """
    start = time.monotonic()
    sweep_dir = Path(job.sweep_dir)
    notes = []
    for run in trial_runs(sweep_dir, job.label, job.seed):
        if is_locked(run.run_dir):
            notes.append(f"waited for {holder(run.run_dir)} to stop writing {run.run_dir} (an earlier attempt)")
            wait_unlocked(run.run_dir, STOP_GRACE)
    state = trial_state(sweep_dir, job.label, job.seed)
    if state is not None and state.complete:
        return TrialOutcome(job.trial_id, "finished", "skipped", str(state.run_dir), 0, None, 0.0)
    for run in trial_runs(sweep_dir, job.label, job.seed):
        if run.checkpoint_step is None and not is_locked(run.run_dir):
            shutil.rmtree(run.run_dir, ignore_errors=True)
            notes.append(f"removed {run.run_dir}: it stopped before its first checkpoint (nothing to resume)")

    if state is not None:
        mode, args = "resumed", ["--resume", str(state.run_dir)]
    else:
        mode, args = "started", [job.config, *job.overrides]
    cmd = [sys.executable, "-m", "rl_plasticity", "train", *args, "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS=str(job.cpus), MKL_NUM_THREADS=str(job.cpus))
    logs = sweep_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    out_path, err_path = logs / f"{job.label}_seed{job.seed}.out", logs / f"{job.label}_seed{job.seed}.err"
    header = f"== {dt.datetime.now().isoformat(timespec='seconds')} {mode}: {' '.join(cmd)}\n"
    with out_path.open("a") as out, err_path.open("a") as err:
        out.write(header)
        err.write(header + "".join(f"rlp sweep: {note}\n" for note in notes))
        out.flush()
        err.flush()
        err_offset = err.tell()
        # preexec_fn only makes one plain libc call, looked up beforehand (safe in a threaded worker).
        death_signal = _die_with_parent if _PRCTL is not None else None
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env, cwd=str(sweep_dir), preexec_fn=death_signal
        )  # noqa: PLW1509
        code, interrupted = _run_to_end(proc)
    with err_path.open() as err:
        err.seek(err_offset)
        stderr = err.read()

    seconds = time.monotonic() - start
    final = trial_state(sweep_dir, job.label, job.seed)
    run_dir = str(final.run_dir) if final is not None else _newest_run(sweep_dir, job.label, job.seed)
    if code == 0 and final is not None and final.complete:
        return TrialOutcome(job.trial_id, "finished", mode, run_dir, 0, None, seconds)
    if interrupted or code in SIGNAL_EXITS:
        why = SIGNAL_EXITS.get(code, f"exit {code}")
        where = final.describe() if final is not None else "no checkpoint yet"
        return TrialOutcome(job.trial_id, "interrupted", mode, run_dir, code, f"stopped by {why} ({where})", seconds)
    if code == 0:
        error = f"exited 0 but the run is not complete ({final.describe() if final else 'no run directory'})"
    elif code < 0:
        error = f"killed by {signal.Signals(-code).name}; last line: {_last_error_line(stderr)}"
    else:
        error = f"{_last_error_line(stderr)} (exit {code})"
    return TrialOutcome(job.trial_id, "failed", mode, run_dir, code, error, seconds)


def _run_to_end(proc: subprocess.Popen) -> tuple[int, bool]:
    """Wait for the run; on KeyboardInterrupt stop it (see :func:`_stop`). Returns its exit status and
    whether it was interrupted."""
    with _interruptible():
        try:
            return _wait(proc), False
        except KeyboardInterrupt:
            return _stop(proc), True


@contextlib.contextmanager
def _interruptible() -> Iterator[None]:
    """Let SIGINT raise KeyboardInterrupt here even where it is ignored, and put it back afterwards.

    Ray cancels a running task with ``_thread.interrupt_main()``, which does nothing while SIGINT is ignored
    (Python >= 3.10), and it is ignored in every process started in the background by a non-interactive
    shell (``nohup rlp sweep ... &``), which Ray's workers inherit: the trials then ran on after the driver
    was stopped. Only the main thread may set handlers; elsewhere this changes nothing.
    """
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) != signal.SIG_IGN:
        yield
        return
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def _wait(proc: subprocess.Popen) -> int:
    """Wait for the run in short slices: Ray cancels a task by raising KeyboardInterrupt in it, which
    only happens while Python code runs, not inside one long blocking wait."""
    while True:
        try:
            return proc.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            continue


def _stop(proc: subprocess.Popen) -> int:
    """SIGTERM the run, give it :data:`STOP_GRACE` seconds to write its checkpoint, then kill it."""
    proc.send_signal(signal.SIGTERM)
    while True:
        try:
            return proc.wait(timeout=STOP_GRACE)
        except subprocess.TimeoutExpired:
            proc.kill()
        except KeyboardInterrupt:  # a second interrupt: stop at once
            proc.kill()


def _newest_run(sweep_dir: Path, label: str, seed: int) -> str | None:
    runs = trial_runs(sweep_dir, label, seed)
    return str(max(runs, key=lambda r: r.run_dir.name).run_dir) if runs else None
