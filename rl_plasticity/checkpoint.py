"""Checkpoints and resume: a killed, pre-empted or stopped run comes back exactly where it was.

Where and when
--------------
Checkpoints go to ``<run dir>/checkpoints/step_<env step>/``; ``checkpoints/latest`` names the newest
complete one. One is written every ``checkpoint.every`` env steps, at the end of training and on SIGINT or
SIGTERM, always at a *rollout boundary*: at the start of SB3's ``collect_rollouts``, when the previous
rollout has been collected and trained on (DQN: every ``train_freq`` vec steps; PPO: every ``n_steps`` vec
steps). Only there can everything be restored exactly: SB3 trains after a fixed number of collected steps
counted from the start of ``learn()``, and PPO's rollout buffer is empty there. So "every N steps" means at
the first boundary at or after each multiple of N, and a signal is acted on at the next boundary (after
finishing the current rollout and its update). A second signal stops at once, without a new checkpoint.

A checkpoint is written into ``checkpoints/.tmp-<name>-<pid>/``, every file is fsync'ed, the directory is
renamed into place and only then is ``latest`` replaced (a temporary file, fsync, ``os.replace``). A kill
at any point leaves ``latest`` naming a complete checkpoint; the next run removes the leftovers and says so.
Older checkpoints beyond ``checkpoint.keep`` are deleted after ``latest`` moves on (renamed to a ``.tmp-``
name first, so that a half-deleted one is never taken for a checkpoint). A checkpoint is never written
from a state with a non-finite parameter (:class:`~agents.plastic.NonFiniteError` instead), so after a
divergence ``latest`` still names the last good one. A write that fails for lack of space or a read-only
directory (:class:`StorageError`) removes its own unfinished folder and leaves the previous checkpoint as it
was.

Which checkpoint a resume reads: the newest complete one that passes its checks (every file present, with
the size and SHA-256 ``meta.json`` gives, and ``state.pt`` loadable). That is the one ``latest`` names,
unless a kill came between a new checkpoint's rename and the move of ``latest`` (then the newer, complete
one), or the newest is damaged: then one line names the bad file and the resume falls back to the next
older one (there is one only with ``checkpoint.keep`` >= 2, or during a write); with none left it stops
with exit status 2. Damaged checkpoints newer than the one resumed from are removed once it has loaded,
each with a line.

What a checkpoint holds, and how each piece is restored
-------------------------------------------------------
- ``model.zip`` (SB3 ``save``): the networks (online and target) and the optimizer state. Restored with
  ``set_parameters`` into an agent built from the config, after the interventions' states are loaded (an
  intervention such as plasticity injection rebuilds the network's structure from its state first).
- ``replay_buffer/*.npy`` (DQN, unless ``checkpoint.replay_buffer`` is off): the filled part of each array of
  SB3's replay buffer, copied back into the freshly allocated buffer, with its position. ``meta.json`` gives
  its size in bytes. Without it, the resumed agent refills the buffer for ``agent.learning_starts`` env
  steps (uniform random actions, no updates), then trains on.
- ``state.pt`` (``torch.save``):

  - SB3's counters and loop state: ``num_timesteps``, ``_episode_num``, ``_n_updates``,
    ``_current_progress_remaining``, ``_last_obs``, ``_last_episode_starts``, ``_last_original_obs``,
    ``ep_info_buffer``, ``ep_success_buffer``, and for DQN ``_n_calls`` (target-update phase) and
    ``exploration_rate``; the agent's ``num_gradient_steps`` and ``last_grad_norm``, and PlasticDQN's step
    counters of the visit and of the ``exploration_steps`` schedule. ``learn()`` is then
    called with the *remaining* steps and ``reset_num_timesteps=False``, so SB3 sets ``_total_timesteps``
    back to ``total_steps``: the exploration schedule, the learning-rate schedule and the progress are the
    uninterrupted run's, and with ``_last_obs`` set SB3 does not reset the env.
  - every env copy of the ``DummyVecEnv``, pickled whole (cloudpickle): the ``Monitor`` wrapper's episode
    accumulators, the :class:`~envs.sequence.TaskSequenceEnv` schedule position, every task env created so
    far with its full game state (MinAtar's board, its ``RandomState`` and sticky ``last_action``; CartPole's
    state, ``np_random`` and time-limit counter). Each copy's ``get_state()`` is stored too and checked with
    ``set_state()`` against the config's schedule before the copy replaces the fresh one. The episode in
    flight continues; nothing is reset.
  - every intervention's ``state_dict()``, by name and in order;
  - the monitor's state (:meth:`~rl_plasticity.monitor.MonitorCallback.state_dict`: the first-visit probe
    sets, frozen and partial (the random-policy probe sets are rebuilt, identically), the initial weights, the probe
    schedule, visit counters and the visit in progress with its
    returns, ``task_summary.csv``'s header and length, the latest training batch); the task logger's switch
    count; the evaluation's schedule and latest results (its episodes are seeded, so no env state);
  - the values recorded in SB3's logger since its last dump (so the next dump writes what the uninterrupted
    run wrote);
  - the RNG states: Python ``random``, NumPy's global RNG (replay sampling, epsilon draws, PPO minibatch
    order), torch CPU (and CUDA if present), and the agent's ``action_space`` RNG (epsilon-greedy's random
    actions). They are set last, right before the first rollout.

- ``meta.json``: step, gradient steps, agent, replay buffer size, and each file's size and SHA-256 (checked
  on resume, so a truncated or altered file is named before anything is loaded).

On resume, TensorBoard's events continue in a new events file in the run directory, opened with
``purge_step`` = checkpoint step + 1: TensorBoard drops whatever an earlier process logged after the
checkpoint (a run killed without a checkpoint), so no step is logged twice. ``task_summary.csv`` is cut back
to its length at the checkpoint and appended to.

What is exact: on CPU, with the same config, a resumed run's parameters, optimizer state, TensorBoard scalars
(except wall-clock ones) and ``task_summary.csv`` equal the uninterrupted run's (tested). Not exact: a run
resumed without its replay buffer; wall-clock values (``time/fps``, episode times); with PPO and
``logging.log_interval`` > 1, the rollout-log phase restarts at the resume (SB3 counts iterations from each
``learn()`` call); a resume with ``--force`` and changed values.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import random
import re
import shutil
import signal
import sys
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cloudpickle
import numpy as np
import torch as th
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.vec_env import DummyVecEnv

from agents import Intervention
from agents.plastic import NonFiniteError
from rl_plasticity.layout import CHECKPOINTS_DIR, LATEST, MODEL_FILE

FORMAT = 1
_NAME = re.compile(r"^step_(\d+)(?:\.(\d+))?$")
_DELETING = ".tmp-deleting-"  # an old checkpoint on its way out

#: SB3 and agent attributes a checkpoint restores (those an agent does not have are skipped).
AGENT_ATTRS = (
    "num_timesteps",
    "_episode_num",
    "_n_updates",
    "_current_progress_remaining",
    "_last_obs",
    "_last_episode_starts",
    "_last_original_obs",
    "ep_info_buffer",
    "ep_success_buffer",
    "num_gradient_steps",
    "last_grad_norm",
    "_term_logs",
    "_n_calls",
    "exploration_rate",
    "_visit_steps",
    "_exploration_count",  # PlasticDQN: random steps per visit, the exploration_steps schedule
)
#: Arrays of SB3's ``ReplayBuffer`` (``next_observations`` is ``None`` with ``optimize_memory_usage``).
REPLAY_ARRAYS = ("observations", "next_observations", "actions", "rewards", "dones", "timeouts")


class CheckpointError(Exception):
    """A missing, corrupt or unusable checkpoint: the message is one line naming the file."""


#: ``errno`` values of a write the storage cannot take: full disk or quota, read-only filesystem, no permission,
#: too large, a device error.
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.EIO})


class StorageError(Exception):
    """A file of the run could not be written (a full disk, a read-only directory): training stops, exit 4.

    :param path: the file or folder that could not be written.
    :param reason: the system's words, e.g. ``No space left on device``.
    :param checkpoint: the last good checkpoint, left intact (``None``: none was written yet).
    :param removed: the unfinished checkpoint folder removed on the way out (it held the failed write).
    """

    def __init__(
        self, path: Path | str, reason: str, checkpoint: Path | None = None, removed: Path | None = None
    ) -> None:
        path = os.fsdecode(path) if isinstance(path, bytes) else path  # some writers name files in bytes
        self.path, self.reason, self.checkpoint, self.removed = path, reason, checkpoint, removed
        self.run_dir: Path | None = None
        super().__init__(f"cannot write {path} ({reason})")

    def message(self) -> str:
        removed = f"; removed the unfinished checkpoint {self.removed}" if self.removed is not None else ""
        if self.checkpoint is None:
            return f"cannot write {self.path} ({self.reason}); training stopped{removed}; no checkpoint was written yet"
        resume = (
            f"; make room (or make it writable), then: rlp train --resume {self.run_dir}"
            if self.run_dir is not None
            else ""
        )
        return (
            f"cannot write {self.path} ({self.reason}); training stopped{removed}; "
            f"last good checkpoint: {self.checkpoint} (intact){resume}"
        )


class TrainingInterrupted(Exception):
    """Training stopped on SIGINT/SIGTERM.

    :param signum: the signal.
    :param env_step: the agent's step when it stopped.
    :param checkpoint: the checkpoint written on the way out, or the last one if it stopped at once.
    :param immediate: a second signal stopped it without writing a checkpoint.
    """

    def __init__(
        self, signum: int, env_step: int | None = None, checkpoint: Path | None = None, immediate: bool = False
    ) -> None:
        self.signum, self.env_step, self.checkpoint, self.immediate = signum, env_step, checkpoint, immediate
        self.run_dir: Path | None = None
        super().__init__(signal.Signals(signum).name)

    @property
    def exit_status(self) -> int:
        """The shell's convention for a process ended by a signal: 128 + signal (130 SIGINT, 143 SIGTERM)."""
        return 128 + self.signum

    def message(self) -> str:
        name = signal.Signals(self.signum).name
        resume = f"; resume with: rlp train --resume {self.run_dir}" if self.run_dir else ""
        if not self.immediate:
            return f"stopped by {name} at env step {self.env_step}; checkpoint written to {self.checkpoint}{resume}"
        last = f"the last checkpoint is {self.checkpoint}" if self.checkpoint else "no checkpoint was written"
        return f"stopped at once by a second {name}; {last}{resume if self.checkpoint else ''}"


@dataclass(frozen=True)
class CheckpointSettings:
    """When checkpoints are written and what they keep: the ``checkpoint:`` config keys (their defaults and
    meanings are the config's; the runner builds this from the validated section).

    :param every: env steps between checkpoints (``None``: only at the end and on a signal).
    :param replay_buffer: DQN: put the replay buffer in the checkpoint.
    :param keep: checkpoints kept, newest first.
    """

    every: int | None
    replay_buffer: bool
    keep: int


@dataclass
class Trainee:
    """Everything of a run that a checkpoint covers."""

    agent: BaseAlgorithm
    env: DummyVecEnv
    interventions: list[Intervention]  # the configured ones (not the monitor's observer)
    task_log: Any  # TaskLogCallback
    monitor: Any | None = None  # MonitorCallback
    evaluation: Any | None = None  # EvalCallback


@dataclass
class Checkpoint:
    """A checkpoint read back from disk (the replay buffer stays on disk until restored)."""

    path: Path
    state: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)
    #: newer checkpoint folders that failed their checks (removed once this one has loaded)
    skipped: list[Path] = field(default_factory=list)

    @property
    def step(self) -> int:
        return int(self.state["agent"]["num_timesteps"])


# -- capture and restore ---------------------------------------------------------------------------------


def rng_state(agent: BaseAlgorithm) -> dict[str, Any]:
    """Every RNG training draws from (see the module docstring)."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": th.get_rng_state(),
        "action_space": agent.action_space.np_random.bit_generator.state,
    }
    if th.cuda.is_available():
        state["cuda"] = th.cuda.get_rng_state_all()
    return state


def set_rng_state(agent: BaseAlgorithm, state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    th.set_rng_state(state["torch"])
    agent.action_space.np_random.bit_generator.state = state["action_space"]
    if "cuda" in state and th.cuda.is_available():
        th.cuda.set_rng_state_all(state["cuda"])


def capture(run: Trainee) -> dict[str, Any]:
    """The state of ``state.pt`` (everything but the networks, the optimizer and the replay buffer)."""
    agent = run.agent
    attrs: dict[str, Any] = {}
    for name in AGENT_ATTRS:
        if not hasattr(agent, name):
            continue
        value = getattr(agent, name)
        if isinstance(value, deque):
            value = list(value)
        elif isinstance(value, defaultdict):
            value = {k: list(v) for k, v in value.items()}
        elif isinstance(value, th.Tensor):
            value = value.detach().cpu()
        attrs[name] = value
    logger = agent.logger
    return {
        "format": FORMAT,
        "algo": type(agent).__name__,
        "agent": attrs,
        "env": {
            "copies": [cloudpickle.dumps(copy) for copy in run.env.envs],
            "schedule": [copy.unwrapped.get_state() for copy in run.env.envs],
        },
        "interventions": [(iv.name, iv.state_dict()) for iv in run.interventions],
        "task_log": run.task_log.state_dict(),
        "monitor": run.monitor.state_dict() if run.monitor is not None else None,
        "eval": run.evaluation.state_dict() if run.evaluation is not None else None,
        "logger": {
            "values": dict(logger.name_to_value),
            "counts": dict(logger.name_to_count),
            "excluded": dict(logger.name_to_excluded),
        },
        "rng": rng_state(agent),
    }


def _replay_buffer(agent: BaseAlgorithm) -> Any | None:
    return getattr(agent, "replay_buffer", None)


def save_replay_buffer(buffer: Any, folder: Path) -> dict[str, Any]:
    """Write the filled part of each replay-buffer array as ``<name>.npy``; return its description."""
    folder.mkdir()
    filled = buffer.buffer_size if buffer.full else buffer.pos
    arrays, nbytes = [], 0
    for name in REPLAY_ARRAYS:
        array = getattr(buffer, name, None)
        if array is None:
            continue
        with (folder / f"{name}.npy").open("wb") as f:
            np.save(f, array[:filled])
            f.flush()
            os.fsync(f.fileno())
        arrays.append(name)
        nbytes += array[:filled].nbytes
    return {
        "pos": int(buffer.pos),
        "full": bool(buffer.full),
        "filled": int(filled),
        "transitions": int(filled * buffer.n_envs),
        "bytes": int(nbytes),
        "arrays": arrays,
    }


def load_replay_buffer(buffer: Any, folder: Path, info: dict[str, Any]) -> None:
    """Copy what :func:`save_replay_buffer` wrote back into ``buffer`` (allocated by the agent)."""
    filled = int(info["filled"])
    for name in info["arrays"]:
        path = folder / f"{name}.npy"
        target = getattr(buffer, name, None)
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: unreadable ({' '.join(str(exc).split())})") from None
        if target is None or array.shape != (filled, *target.shape[1:]) or array.dtype != target.dtype:
            expected = None if target is None else ((filled, *target.shape[1:]), target.dtype)
            raise CheckpointError(f"{path}: holds {array.shape} {array.dtype}, this agent's buffer needs {expected}")
        target[:filled] = array
    buffer.pos, buffer.full = int(info["pos"]), bool(info["full"])


def restore(run: Trainee, ckpt: Checkpoint, learning_starts: int) -> None:
    """Put the checkpoint's state into a freshly built run, before ``learn()``.

    The logger's pending values and the RNG states are set later, by :class:`CheckpointCallback` when
    training starts, after everything that might draw a random number.

    :param learning_starts: the config's ``agent.learning_starts``, for refilling a replay buffer that the
        checkpoint does not hold.
    """
    agent, state, path = run.agent, ckpt.state, ckpt.path
    state_file = path / "state.pt"
    if state["algo"] != type(agent).__name__:
        raise CheckpointError(
            f"{state_file}: a checkpoint of {state['algo']}, but the config builds {type(agent).__name__}"
        )

    names = [name for name, _ in state["interventions"]]
    if names != [iv.name for iv in run.interventions]:
        configured = [iv.name for iv in run.interventions]
        raise CheckpointError(f"{state_file}: holds interventions {names}, the config has {configured}")
    for iv, (_, iv_state) in zip(run.interventions, state["interventions"]):
        iv.load_state_dict(iv_state)

    try:
        agent.set_parameters(str(path / MODEL_FILE), exact_match=True, device=agent.device)
    except Exception as exc:  # noqa: BLE001 - anything that stops the load means the file does not fit
        raise CheckpointError(
            f"{path / MODEL_FILE}: cannot be loaded into this config's agent "
            f"({type(exc).__name__}: {' '.join(str(exc).split())[:300]})"
        ) from None

    buffer = _replay_buffer(agent)
    info = state.get("replay_buffer")
    if buffer is not None:
        if info is not None:
            load_replay_buffer(buffer, path / "replay_buffer", info)
        else:
            agent.learning_starts = int(state["agent"]["num_timesteps"]) + learning_starts
            print(
                f"rlp: the checkpoint holds no replay buffer: refilling it for {learning_starts} env steps "
                f"(agent.learning_starts) before training goes on",
                file=sys.stderr,
                flush=True,
            )

    for name, value in state["agent"].items():
        current = getattr(agent, name)
        if name in ("ep_info_buffer", "ep_success_buffer"):  # None until learn() starts
            value = deque(value, maxlen=agent._stats_window_size)
        elif isinstance(current, defaultdict):
            restored = defaultdict(current.default_factory)
            restored.update(value)
            value = restored
        elif isinstance(value, th.Tensor):
            value = value.to(agent.device)
        setattr(agent, name, value)

    copies, schedules = state["env"]["copies"], state["env"]["schedule"]
    if len(copies) != run.env.num_envs:
        raise CheckpointError(
            f"{state_file}: holds {len(copies)} env copies, the config has env.n_envs={run.env.num_envs}"
        )
    for i, (blob, schedule) in enumerate(zip(copies, schedules)):
        fresh = run.env.envs[i]
        try:
            fresh.unwrapped.set_state(schedule)  # checks the position against this config's schedule
        except ValueError as exc:
            raise CheckpointError(f"{state_file}: env copy {i} does not fit this config's schedule ({exc})") from None
        loaded = cloudpickle.loads(blob)
        if loaded.unwrapped.get_state() != schedule:
            raise CheckpointError(f"{state_file}: env copy {i} is not at the schedule position saved with it")
        fresh.close()
        run.env.envs[i] = loaded

    run.task_log.load_state_dict(state["task_log"])
    if run.monitor is not None and state["monitor"] is not None:
        run.monitor.load_state_dict(state["monitor"])
    if run.evaluation is not None and state.get("eval") is not None:
        run.evaluation.load_state_dict(state["eval"])


def check_parameters(agent: BaseAlgorithm) -> None:
    """Raise :class:`NonFiniteError` naming the first non-finite parameter or buffer of the policy."""
    tensors = [(n, t) for n, t in agent.policy.state_dict().items() if th.is_floating_point(t)]
    if all(bool(th.isfinite(t).all()) for _, t in tensors):
        return
    name, tensor = next((n, t) for n, t in tensors if not bool(th.isfinite(t).all()))
    bad = tensor[~th.isfinite(tensor)].flatten()[0].item()
    raise NonFiniteError(
        f"parameters/{name}", bad, int(agent.num_timesteps), getattr(agent, "num_gradient_steps", None)
    )


# -- on disk -------------------------------------------------------------------------------------------------


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def torch_bytes(obj: Any) -> bytes:
    """``torch.save`` into memory: written to a file with a plain ``write``, a full disk is an ``OSError`` with
    its ``errno`` (``torch.save`` on a file reports it as a ``RuntimeError`` about stream positions)."""
    buffer = io.BytesIO()
    th.save(obj, buffer)
    return buffer.getvalue()


def _sort_key(path: Path) -> tuple[int, int]:
    match = _NAME.match(path.name)
    assert match is not None
    return int(match.group(1)), int(match.group(2) or 0)


def _say(message: str) -> None:
    print(f"rlp: {message}", file=sys.stderr, flush=True)


class CheckpointStore:
    """The checkpoints of one run directory (see the module docstring for the layout)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.root = self.run_dir / CHECKPOINTS_DIR

    def checkpoints(self) -> list[Path]:
        """Checkpoint directories (renamed into place, so complete when written), oldest first."""
        if not self.root.is_dir():
            return []
        return sorted((p for p in self.root.iterdir() if p.is_dir() and _NAME.match(p.name)), key=_sort_key)

    def latest(self) -> Path | None:
        """The checkpoint ``latest`` names, or ``None`` if there is none yet."""
        pointer = self.root / LATEST
        if not pointer.is_file():
            return None
        name = pointer.read_text().strip()
        return self.root / name if _NAME.match(name) else None

    def clean(self, keep_up_to: Path | None = None) -> None:
        """Remove unfinished writes and deletions; with ``keep_up_to`` (the checkpoint a resume loaded), also
        the checkpoints newer than it (they failed their checks) and point ``latest`` at it. One line each."""
        if not self.root.is_dir():
            return
        for path in sorted(self.root.iterdir()):
            if not path.name.startswith(".tmp"):
                continue
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            what = (
                "the rest of an old checkpoint whose deletion was cut short"
                if path.name.startswith(_DELETING)
                else f"an unfinished update of {LATEST}"
                if path.name.startswith(f".tmp-{LATEST}-")
                else "an unfinished checkpoint write (its process stopped before the checkpoint was complete)"
            )
            _say(f"removed {path}: {what}")
        if keep_up_to is None:
            return
        for path in self.checkpoints():
            if _sort_key(path) > _sort_key(keep_up_to):
                shutil.rmtree(path, ignore_errors=True)
                _say(f"removed {path}: newer than the checkpoint resumed from, and unusable (see above)")
        if self.latest() != keep_up_to:
            self._point_latest(keep_up_to.name)

    def _point_latest(self, name: str) -> None:
        """Replace ``latest`` atomically (temporary file, fsync, rename, fsync of the folder)."""
        pointer_tmp = self.root / f".tmp-{LATEST}-{os.getpid()}"
        with pointer_tmp.open("w") as f:
            f.write(name + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(pointer_tmp, self.root / LATEST)
        _fsync(self.root)

    def write(self, run: Trainee, settings: CheckpointSettings) -> Path:
        """Write a checkpoint of ``run`` atomically, point ``latest`` at it and drop the oldest beyond ``keep``.

        :raises StorageError: a file could not be written (full disk, read-only directory): the unfinished
            folder is removed, the previous checkpoint and ``latest`` are as they were.
        """
        agent = run.agent
        check_parameters(agent)
        step = int(agent.num_timesteps)
        at = self.root  # what is being written, named if it fails
        tmp = final = None
        try:
            self.root.mkdir(exist_ok=True)
            name, n = f"step_{step:012d}", 1
            while (self.root / name).exists():
                name, n = f"step_{step:012d}.{n}", n + 1
            tmp, final = self.root / f".tmp-{name}-{os.getpid()}", self.root / name
            shutil.rmtree(tmp, ignore_errors=True)
            at = tmp
            tmp.mkdir()

            at = tmp / MODEL_FILE
            agent.save(at)
            _fsync(at)
            buffer = _replay_buffer(agent)
            rb_info = None
            if buffer is not None and settings.replay_buffer:
                at = tmp / "replay_buffer"
                rb_info = save_replay_buffer(buffer, at)
            state = capture(run)
            state["replay_buffer"] = rb_info
            at = tmp / "state.pt"
            with at.open("wb") as f:
                f.write(torch_bytes(state))
                f.flush()
                os.fsync(f.fileno())
            files = sorted(p for p in tmp.rglob("*") if p.is_file())
            meta = {
                "format": FORMAT,
                "step": step,
                "num_gradient_steps": int(getattr(agent, "num_gradient_steps", 0)),
                "agent": type(agent).__name__,
                "written": time.strftime("%Y-%m-%d %H:%M:%S"),
                "replay_buffer": (
                    None
                    if buffer is None
                    else {"saved": False, "note": "checkpoint.replay_buffer=false: refilled on resume"}
                    if rb_info is None
                    else {"saved": True, "transitions": rb_info["transitions"], "bytes": rb_info["bytes"]}
                ),
                "files": {str(p.relative_to(tmp)): p.stat().st_size for p in files},
                "sha256": {str(p.relative_to(tmp)): _sha256(p) for p in files},
            }
            at = tmp / "meta.json"
            with at.open("w") as f:
                json.dump(meta, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            if rb_info is not None:
                _fsync(tmp / "replay_buffer")
            _fsync(tmp)
            at = final
            os.replace(tmp, final)
            _fsync(self.root)
            at = self.root / LATEST
            self._point_latest(name)
        except OSError as exc:
            complete = final is not None and final.is_dir()  # renamed into place: a good checkpoint
            if tmp is not None and not complete:
                shutil.rmtree(tmp, ignore_errors=True)  # frees the space it took; the line says so
            raise StorageError(
                at,
                exc.strerror or str(exc),
                final if complete else self.latest(),
                removed=None if complete or tmp is None else tmp,
            ) from None

        for old in self.checkpoints()[: -settings.keep]:
            if old != final:
                # Renamed before it is deleted: a deletion cut short leaves a .tmp- folder, never a damaged step_.
                doomed = self.root / f"{_DELETING}{old.name}-{os.getpid()}"
                try:
                    os.replace(old, doomed)
                except OSError:
                    continue
                shutil.rmtree(doomed, ignore_errors=True)
        return final

    def verify(self, path: Path) -> Checkpoint:
        """Check the checkpoint folder ``path`` against its ``meta.json`` and load its ``state.pt``.

        :raises CheckpointError: one line naming the missing, truncated or altered file.
        """
        meta_file = path / "meta.json"
        try:
            meta = json.loads(meta_file.read_text())
            files, digests = dict(meta["files"]), dict(meta.get("sha256", {}))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{meta_file}: missing or corrupt ({type(exc).__name__})") from None
        if meta.get("format") != FORMAT:
            raise CheckpointError(f"{meta_file}: checkpoint format {meta.get('format')}, this version reads {FORMAT}")
        for rel, size in files.items():
            file = path / rel
            if not file.is_file():
                raise CheckpointError(f"{file}: missing from the checkpoint")
            if file.stat().st_size != size:
                raise CheckpointError(f"{file}: truncated or changed ({file.stat().st_size} bytes, {size} written)")
            if rel in digests and _sha256(file) != digests[rel]:
                raise CheckpointError(f"{file}: altered (its SHA-256 differs from the one written in meta.json)")
        state_file = path / "state.pt"
        try:
            state = th.load(state_file, map_location="cpu", weights_only=False)
            if not isinstance(state, dict) or state.get("format") != FORMAT:
                raise ValueError("not a checkpoint state")
            for key in ("algo", "agent", "env", "interventions", "task_log", "monitor", "logger", "rng"):
                state[key]  # noqa: B018 - presence check
        except Exception as exc:  # noqa: BLE001 - any failure to read it means the file is corrupt
            raise CheckpointError(
                f"{state_file}: corrupt checkpoint ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})"
            ) from None
        return Checkpoint(path, state, meta)

    def read(self) -> Checkpoint:
        """The newest checkpoint that passes :meth:`verify` (normally the one ``latest`` names).

        A damaged newer one, a ``latest`` that names a missing folder, or a complete checkpoint newer than
        ``latest`` (a kill between the two renames) is told in one line on stderr each.

        :raises CheckpointError: no checkpoint passes: one line naming the newest one's bad file.
        """
        pointer = self.root / LATEST
        found = self.checkpoints()[::-1]
        if not found:
            if pointer.is_file():
                raise CheckpointError(
                    f"{pointer}: names {pointer.read_text().strip()[:60]!r}, which is not there, "
                    "and there is no other checkpoint to resume from"
                )
            unfinished = self.root.is_dir() and any(p.name.startswith(".tmp-") for p in self.root.iterdir())
            why = " (the run stopped inside its first checkpoint write: start it anew)" if unfinished else ""
            raise CheckpointError(f"no checkpoint to resume from: {pointer} not found{why}")
        bad: list[tuple[Path, str]] = []
        for path in found:
            try:
                ckpt = self.verify(path)
            except CheckpointError as exc:
                bad.append((path, str(exc)))
                continue
            ckpt.skipped = [p for p, _ in bad]
            self._tell_fallback(ckpt, bad)
            return ckpt
        older = f"; the {len(bad) - 1} older one(s) are unusable too" if len(bad) > 1 else ""
        raise CheckpointError(f"{bad[0][1]}{older}; no complete checkpoint to resume from")

    def _tell_fallback(self, ckpt: Checkpoint, bad: list[tuple[Path, str]]) -> None:
        """One line for each reason the resume does not start from the checkpoint ``latest`` names."""
        pointer, named = self.root / LATEST, self.latest()
        for _, why in bad:
            _say(f"{why}: resuming from the newest complete checkpoint before it, {ckpt.path}")
        if named == ckpt.path or (named is not None and named in [p for p, _ in bad]):
            return
        if not pointer.is_file():
            _say(f"{pointer} is missing: resuming from the newest complete checkpoint, {ckpt.path}")
        elif named is None or not named.is_dir():
            _say(
                f"{pointer} names {pointer.read_text().strip()[:60]!r}, which is not there: resuming from the "
                f"newest complete checkpoint, {ckpt.path}"
            )
        elif _sort_key(named) < _sort_key(ckpt.path):
            _say(
                f"{ckpt.path} is complete and newer than {named.name}, which {pointer} names (a write was stopped "
                "before latest moved on): resuming from it"
            )


# -- during training ----------------------------------------------------------------------------------------


class SignalGuard:
    """SIGINT/SIGTERM handlers while training: the first signal asks for a checkpoint and a clean stop at the
    next rollout boundary; a second one stops at once (:class:`TrainingInterrupted` with ``immediate``)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> SignalGuard:
        # Handlers can only be installed from the main thread; elsewhere signals keep their defaults.
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: object) -> None:
        if self.received is None:
            self.received = signum
            print(
                f"rlp: {signal.Signals(signum).name} received: finishing the current rollout, then writing a "
                "checkpoint (send it again to stop at once)",
                file=sys.stderr,
                flush=True,
            )
            return
        self.__exit__()
        raise TrainingInterrupted(signum, immediate=True)


def write_checkpoint(store: CheckpointStore, run: Trainee, settings: CheckpointSettings) -> Path:
    """:meth:`CheckpointStore.write`, and one line on stderr with the path and the replay buffer's size."""
    path = store.write(run, settings)
    rb = json.loads((path / "meta.json").read_text())["replay_buffer"]
    size = (
        ""
        if rb is None
        else (
            f" (replay buffer: {rb['transitions']} transitions, {rb['bytes']:,} bytes)"
            if rb["saved"]
            else " (without the replay buffer)"
        )
    )
    print(f"rlp: checkpoint at env step {run.agent.num_timesteps}: {path}{size}", file=sys.stderr, flush=True)
    return path


class CheckpointCallback(BaseCallback):
    """Writes checkpoints at rollout boundaries (every ``checkpoint.every`` steps and on a signal), and on
    resume restores the logger's pending values and the RNG states right before the first rollout.

    Put it after the other callbacks, so that its rollout-start runs last.
    """

    def __init__(
        self,
        store: CheckpointStore,
        run: Trainee,
        settings: CheckpointSettings,
        guard: SignalGuard,
        resume: Checkpoint | None = None,
    ) -> None:
        super().__init__()
        self.store, self.run, self.settings, self.guard = store, run, settings, guard
        self._resume = resume
        self.next_due: int | None = None

    def write(self) -> Path:
        return write_checkpoint(self.store, self.run, self.settings)

    def _on_training_start(self) -> None:
        if self._resume is not None:
            state = self._resume.state
            logger = self.logger
            for store, saved in (
                (logger.name_to_value, state["logger"]["values"]),
                (logger.name_to_count, state["logger"]["counts"]),
                (logger.name_to_excluded, state["logger"]["excluded"]),
            ):
                store.clear()
                store.update(saved)
            set_rng_state(self.model, state["rng"])
            self._resume = None
        if self.settings.every is not None:
            self.next_due = (self.model.num_timesteps // self.settings.every + 1) * self.settings.every

    def _on_rollout_start(self) -> None:
        step = int(self.model.num_timesteps)
        path = None
        if self.next_due is not None and step >= self.next_due:
            path = self.write()
            self.next_due = (step // self.settings.every + 1) * self.settings.every  # type: ignore[operator]
        if self.guard.received is not None:  # a signal, possibly during the write just made
            raise TrainingInterrupted(self.guard.received, step, path or self.write())

    def _on_step(self) -> bool:
        return True
