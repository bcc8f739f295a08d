"""Run directories on disk: finding them and telling how far each got.

Shared by ``rlp sweep`` (skip finished trials, resume interrupted ones) and ``rlp report`` (mark incomplete
runs); both take a sweep trial's run that counts from :func:`trial_state`, so they agree on it. It reads files
only (``config.yaml`` and ``checkpoints/``) and imports neither torch nor SB3, so it is cheap to call on a whole
sweep.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from rl_plasticity.layout import CHECKPOINTS_DIR, CONFIG_FILE


@dataclass(frozen=True)
class RunProgress:
    """How far a run directory got.

    :param checkpoint_step: env step of the checkpoint ``checkpoints/latest`` names (``None``: none yet).
    :param total_steps: the run's resolved ``total_steps`` from ``config.yaml`` (``None`` if unreadable).
    """

    run_dir: Path
    checkpoint_step: int | None
    total_steps: int | None

    @property
    def complete(self) -> bool:
        """The run reached its ``total_steps``: a run always writes a checkpoint when training ends, so a
        final checkpoint at ``total_steps`` is what marks a finished run (``model.zip`` comes after it)."""
        return (
            self.checkpoint_step is not None
            and self.total_steps is not None
            and self.checkpoint_step >= self.total_steps
        )

    @property
    def resumable(self) -> bool:
        """Not complete, but has a checkpoint that ``rlp train --resume`` can continue from."""
        return self.checkpoint_step is not None and not self.complete

    def describe(self) -> str:
        """``"complete"``, ``"at step 400 of 600"`` or ``"no checkpoint yet (of 600 steps)"``."""
        if self.complete:
            return "complete"
        total = "?" if self.total_steps is None else str(self.total_steps)
        if self.checkpoint_step is None:
            return f"no checkpoint yet (of {total} steps)"
        return f"at step {self.checkpoint_step} of {total}"


def is_run_dir(path: Path) -> bool:
    """A directory that ``rlp train`` made: it has a ``config.yaml``."""
    return (path / CONFIG_FILE).is_file()


def read_config(run_dir: Path) -> dict:
    """The run's ``config.yaml`` as a plain dict (empty if missing or unreadable)."""
    try:
        data = yaml.safe_load((Path(run_dir) / CONFIG_FILE).read_text())
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _meta_step(folder: Path) -> int | None:
    try:
        return int(json.loads((folder / "meta.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def latest_checkpoint_step(run_dir: Path) -> int | None:
    """Env step of the newest checkpoint, from its ``meta.json`` (``None``: none).

    Normally the one ``checkpoints/latest`` names; a newer complete folder (a kill between its rename and the
    move of ``latest``) or, if ``latest`` names nothing, any folder counts too, as ``rlp train --resume``
    would find them (it also checks every file, which this quick look does not).
    """
    root = Path(run_dir) / CHECKPOINTS_DIR
    try:
        folders = [p for p in root.iterdir() if p.name.startswith("step_") and p.is_dir()]
    except OSError:
        return None
    steps = [step for step in map(_meta_step, folders) if step is not None]
    return max(steps) if steps else None


def run_progress(run_dir: Path) -> RunProgress:
    """How far the run in ``run_dir`` got (see :class:`RunProgress`)."""
    total = read_config(run_dir).get("total_steps")
    return RunProgress(Path(run_dir), latest_checkpoint_step(run_dir), total if isinstance(total, int) else None)


def find_run_dirs(root: Path) -> list[Path]:
    """Every run directory at or below ``root``, sorted; hidden folders and ``checkpoints/`` are not entered."""
    root = Path(root)
    found: list[Path] = []

    def walk(path: Path) -> None:
        if is_run_dir(path):
            found.append(path)
            return  # a run directory holds no other runs
        try:
            children = sorted(p for p in path.iterdir() if p.is_dir())
        except OSError:
            return
        for child in children:
            if not child.name.startswith(".") and child.name != CHECKPOINTS_DIR:
                walk(child)

    walk(root)
    return found


def _run_name(seed: int) -> re.Pattern[str]:
    """Names :func:`rl_plasticity.runner.make_run_dir` gives: ``<YYYYmmdd-HHMMSS>_seed<k>``, maybe ``-<n>``."""
    return re.compile(rf"\d{{8}}-\d{{6}}_seed{seed}(-\d+)?")


def trial_runs(sweep_dir: Path, label: str, seed: int) -> list[RunProgress]:
    """The run directories of a sweep trial (``<sweep_dir>/<label>/<run>``; normally at most one), furthest first:
    complete ones, then by checkpoint step, then newest."""
    folder = Path(sweep_dir) / label
    if not folder.is_dir():
        return []
    pattern = _run_name(seed)
    runs = [run_progress(p) for p in folder.iterdir() if pattern.fullmatch(p.name) and is_run_dir(p)]
    return sorted(runs, key=lambda r: (r.complete, r.checkpoint_step or -1, r.run_dir.name), reverse=True)


def trial_state(sweep_dir: Path, label: str, seed: int) -> RunProgress | None:
    """The trial's run that counts: a complete one, else the furthest resumable one, else ``None``."""
    runs = trial_runs(sweep_dir, label, seed)
    return runs[0] if runs and runs[0].checkpoint_step is not None else None
