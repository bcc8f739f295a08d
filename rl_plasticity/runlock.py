"""One writer per run directory: an OS lock on ``<run dir>/.lock`` held while a process trains the run.

:func:`exclusive_lock` is the one ``flock(2)`` wrapper of the project: :func:`run_lock` takes it on a run
directory, ``rlp sweep`` on its sweep directory.

``rlp train`` (a new run or ``--resume``) takes the lock before it writes anything into the run directory
and keeps it until training ends. It is ``flock(2)`` on an open file, so the kernel releases it when the
process dies in any way (SIGKILL included): a killed run never leaves a stale lock behind. The holder
writes its PID and host name into the file, so a second writer is refused with one line naming both.
It imports neither torch nor SB3: ``rlp sweep`` asks it whether a trial's run is still being written.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from rl_plasticity.layout import LOCK_FILE


class RunInUse(Exception):
    """Another process holds the run's lock: the message is one line naming the run and the holder."""


def holder(run_dir: Path) -> str:
    """Who wrote the lock file last: ``"PID 1234 on host"``, or ``"an unknown process"``."""
    try:
        pid, _, host = (Path(run_dir) / LOCK_FILE).read_text().strip().partition(" ")
    except OSError:
        return "an unknown process"
    if not pid.isdigit():
        return "an unknown process"
    return f"PID {pid}" + (f" on {host}" if host and host != socket.gethostname() else "")


def is_locked(run_dir: Path) -> bool:
    """Whether a live process holds the run's lock now (``False`` if there is no lock file)."""
    path = Path(run_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # closing drops the shared lock taken just to test
    return False


def wait_unlocked(run_dir: Path, timeout: float, poll: float = 0.2) -> bool:
    """Wait up to ``timeout`` seconds for the run's lock to be free; ``True`` if it is."""
    deadline = time.monotonic() + timeout
    while is_locked(run_dir):
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll)
    return True


@contextlib.contextmanager
def exclusive_lock(path: Path, held: Callable[[], Exception]) -> Iterator[int]:
    """Hold an exclusive ``flock(2)`` on ``path`` (created if missing) for the ``with`` block; yields its file
    descriptor. The kernel releases it when the process ends in any way, so no stale lock is left behind.

    :param held: makes the exception raised when another process holds the lock (nothing is waited for).
    :raises OSError: ``path`` can neither be created nor opened.
    """
    # O_CLOEXEC (Python's default): a program this process executes does not inherit the lock.
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        # A read-only directory can still be locked through an existing file (a run then stops at its first
        # write, with that write's error); without the file, the caller gets this OSError.
        fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise held() from None
        yield fd
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold ``<run_dir>/.lock`` exclusively for the ``with`` block, with this process's PID and host in it.

    :raises RunInUse: another process holds it (nothing in the run directory is changed then).
    """

    def in_use() -> RunInUse:
        return RunInUse(
            f"{run_dir} is being written by {holder(run_dir)} (rlp train); one writer per run: "
            "wait for it to end or stop it, then resume"
        )

    with exclusive_lock(Path(run_dir) / LOCK_FILE, in_use) as fd:
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        except OSError:
            pass  # a full disk: the lock holds all the same, the holder is then named "an unknown process"
        yield
