"""SB3's logger on a run directory: TensorBoard (with ``purge_step`` on resume) and, if asked, SB3's stdout table.

Two changes to SB3's own: a key is written at most once per step (:class:`OncePerStepLogger`), and a write
the storage cannot take is a :class:`~rl_plasticity.checkpoint.StorageError` naming the events file, told in
one line (:class:`TensorBoardOutput`). A resumed run waits for the next second before its first events file
(:func:`after_earlier_events_files`).
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import Any

from stable_baselines3.common.logger import HumanOutputFormat, KVWriter, Logger, TensorBoardOutputFormat
from torch.utils.tensorboard import SummaryWriter

from rl_plasticity.checkpoint import StorageError


def make_logger(run_dir: Path, stdout: bool, purge_step: int | None = None) -> Logger:
    """SB3's logger on ``run_dir`` (TensorBoard, plus the stdout table if asked).

    :param purge_step: on resume, the checkpoint step + 1: TensorBoard then drops what earlier processes
        logged at or after that step, so the curves continue with no step logged twice.
    """
    formats: list[KVWriter] = [HumanOutputFormat(sys.stdout)] if stdout else []
    formats.append(TensorBoardOutput(str(run_dir), purge_step))
    logger = OncePerStepLogger(str(run_dir), formats)
    if stdout:
        logger.log(f"Logging to {run_dir}")  # as SB3's configure() does
    return logger


class OncePerStepLogger(Logger):
    """SB3's logger, except that a key is written at most once per step.

    A task switch (and a probe round) dumps the logger at its step, and SB3 may dump again at the same
    step when an episode ends there; a key recorded in between (``rollout/exploration_rate``) would then
    get two points at one step. Such a key stays pending until the next dump instead.
    """

    def __init__(self, folder: str | None, output_formats: list[KVWriter]) -> None:
        super().__init__(folder, output_formats)
        self._dumped_step: int | None = None
        self._dumped_keys: set[str] = set()

    def dump(self, step: int = 0) -> None:
        if step != self._dumped_step:
            self._dumped_step, self._dumped_keys = step, set()
        held = {
            key: (self.name_to_value.pop(key), self.name_to_count.pop(key, None), self.name_to_excluded.pop(key, None))
            for key in list(self.name_to_value)
            if key in self._dumped_keys
        }
        self._dumped_keys.update(self.name_to_value)
        super().dump(step)
        for key, (value, count, excluded) in held.items():
            self.name_to_value[key] = value
            if count is not None:
                self.name_to_count[key] = count
            if excluded is not None:
                self.name_to_excluded[key] = excluded


_other_excepthook = threading.excepthook


def _quiet_writer_thread(args: Any) -> None:
    """A write error in TensorBoard's writer thread is handed to the training thread's next write (and told
    there in one line, :class:`StorageError`); Python would also print the thread's traceback."""
    if isinstance(args.exc_value, OSError) and type(args.thread).__name__ == "_AsyncWriterThread":
        return
    _other_excepthook(args)


class TensorBoardOutput(TensorBoardOutputFormat):
    """SB3's TensorBoard output, with ``purge_step`` passed to the ``SummaryWriter``; a write that fails
    (TensorBoard's writer thread hands its error to the next call) is a :class:`StorageError` naming the file."""

    def __init__(self, folder: str, purge_step: int | None = None) -> None:
        self.writer = SummaryWriter(log_dir=folder, purge_step=purge_step)
        self._is_closed = False
        if threading.excepthook is not _quiet_writer_thread:
            global _other_excepthook
            _other_excepthook, threading.excepthook = threading.excepthook, _quiet_writer_thread

    @property
    def path(self) -> str:
        return self.writer.file_writer.event_writer._file_name  # type: ignore[attr-defined]

    def write(self, *args: Any, **kwargs: Any) -> None:
        try:
            super().write(*args, **kwargs)
        except OSError as exc:
            raise StorageError(self.path, exc.strerror or str(exc)) from None

    def close(self) -> None:
        try:
            super().close()
        except OSError as exc:
            raise StorageError(self.path, exc.strerror or str(exc)) from None


def after_earlier_events_files(run_dir: Path, longest: float = 2.0) -> None:
    """Wait (at most ``longest`` seconds) until this second is later than every events file's creation second.

    TensorBoard reads a run's events files in name order, and a name starts with the second it was created
    in, then the host and the PID. A process killed within the same second as its resume started would
    otherwise be read after it, and its steps past the checkpoint would escape the resume's ``purge_step``.
    """
    seconds = [
        int(p.name.split(".")[3])
        for p in run_dir.glob("events.out.tfevents.*")
        if len(p.name.split(".")) > 3 and p.name.split(".")[3].isdigit()
    ]
    deadline = time.monotonic() + longest
    while seconds and int(time.time()) <= max(seconds) and time.monotonic() < deadline:
        time.sleep(0.05)
