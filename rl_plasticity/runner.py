"""Put a run together: config -> task sequence -> agent -> callbacks -> ``learn()`` -> run directory.

Everything that can fail on bad input (the sequence and its options, the device) is built and checked
before the run directory is created, so a bad config leaves nothing behind. :func:`resume` continues a run
from its latest checkpoint (:mod:`rl_plasticity.checkpoint`), and refuses a changed config unless forced.
A training process holds the run directory's lock (:mod:`rl_plasticity.runlock`) from before its first write
to its end, so a second writer is refused; a write the storage cannot take stops the run with a
:class:`~rl_plasticity.checkpoint.StorageError`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import math
import shutil
import sys
import warnings
from dataclasses import fields
from pathlib import Path
from typing import Any, TypeVar

import torch as th
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback, ProgressBarCallback
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import DummyVecEnv, VecEnv
from torch import nn

from agents import AGENTS, POLICIES, CReLU, minatar_policy_kwargs, mlp_policy_kwargs
from agents.plastic import NonFiniteError
from envs import make_sequence
from rl_plasticity.catalog import registries
from rl_plasticity.checkpoint import (
    STORAGE_ERRNOS,
    Checkpoint,
    CheckpointCallback,
    CheckpointError,
    CheckpointSettings,
    CheckpointStore,
    SignalGuard,
    StorageError,
    Trainee,
    TrainingInterrupted,
    restore,
    write_checkpoint,
)
from rl_plasticity.config import ConfigError, RunConfig, flat_config, load_config, to_yaml
from rl_plasticity.evaluation import EvalCallback, EvalSettings
from rl_plasticity.interventions import build_interventions
from rl_plasticity.kernels import check as check_kernels
from rl_plasticity.kernels import kernels
from rl_plasticity.layout import CONFIG_FILE, MODEL_FILE
from rl_plasticity.monitor import MonitorCallback, MonitorSettings
from rl_plasticity.provenance import record_session
from rl_plasticity.run_logger import after_earlier_events_files, make_logger
from rl_plasticity.runlock import run_lock
from rl_plasticity.task_envs import TaskEnvs, sequence_args
from rl_plasticity.task_logging import TaskLogCallback

Settings = TypeVar("Settings")


def settings_from(section: Any, settings: type[Settings]) -> Settings:
    """A validated config section as the settings dataclass of the module below the runner that uses it
    (:class:`~rl_plasticity.monitor.MonitorSettings`, :class:`~rl_plasticity.evaluation.EvalSettings`,
    :class:`~rl_plasticity.checkpoint.CheckpointSettings`): the section's values of the fields it names."""
    return settings(**{f.name: getattr(section, f.name) for f in fields(settings)})  # type: ignore[arg-type]


def build_env(cfg: RunConfig) -> VecEnv:
    """The task sequence as an SB3 ``DummyVecEnv`` of ``env.n_envs`` copies, each in a ``Monitor``."""
    kwargs = sequence_args(cfg.env.model_dump(), cfg.seed)
    # Build one copy first so that bad options fail here, with the config key, not inside SB3.
    try:
        make_sequence(**kwargs).close()
    except ValueError as exc:
        raise ConfigError(f"env: {exc}") from None
    return make_vec_env(make_sequence, n_envs=cfg.env.n_envs, env_kwargs=kwargs, vec_env_cls=DummyVecEnv)


def policy_kwargs(cfg: RunConfig, env: VecEnv) -> dict[str, Any]:
    """SB3 ``policy_kwargs`` for the configured network on this env (for the policy ``POLICIES[algo]``)."""
    net = cfg.net
    image_like = len(env.observation_space.shape or ()) == 3
    kind = ("minatar" if image_like else "mlp") if net.kind == "auto" else net.kind
    activation = {"relu": nn.ReLU, "tanh": nn.Tanh, "crelu": CReLU}[net.activation]
    if kind == "minatar":
        if not image_like:
            raise ConfigError(f"net.kind: 'minatar' needs (C, H, W) observations, got {env.observation_space.shape}")
        return minatar_policy_kwargs(
            cfg.agent.algo,
            width=net.width,
            depth=net.depth,
            channels=net.channels,
            activation_fn=activation,
            layer_norm=net.layer_norm,
        )
    return mlp_policy_kwargs(
        cfg.agent.algo, width=net.width, depth=net.depth, activation_fn=activation, layer_norm=net.layer_norm
    )


def resolve_device(device: str) -> str:
    """Check that a requested CUDA device exists; ``auto`` is left to SB3."""
    if device.startswith("cuda") and not th.cuda.is_available():
        raise ConfigError(f"device: '{device}' requested but torch sees no CUDA device here; valid here: auto, cpu")
    if device == "mps" and not th.backends.mps.is_available():
        raise ConfigError("device: 'mps' requested but this torch has no MPS device here; valid here: auto, cpu")
    return device


def build_agent(cfg: RunConfig, env: VecEnv) -> BaseAlgorithm:
    """The configured PlasticDQN or PlasticPPO on ``env``, seeded with the run seed."""
    hyper = cfg.agent.model_dump(exclude={"algo"})
    if hyper.get("max_grad_norm", 0.0) is None:
        hyper["max_grad_norm"] = math.inf  # no clipping: SB3 wants a float, and clip_grad_norm_ scales by 1.0
    return AGENTS[cfg.agent.algo](
        POLICIES[cfg.agent.algo],
        env,
        seed=cfg.seed,
        device=resolve_device(cfg.device),
        policy_kwargs=policy_kwargs(cfg, env),
        interventions=build_interventions(cfg.interventions, cfg.intervention_params),
        **hyper,
    )


def flat_hparams(cfg: RunConfig) -> dict[str, bool | str | float | int | None]:
    """The config flattened to ``section.key`` -> scalar, for TensorBoard's HPARAMS tab."""
    # Lists and None as strings: TensorBoard takes scalars and strings only.
    return {
        key: value if isinstance(value, (bool, int, float, str)) else str(value)
        for key, value in flat_config(cfg).items()
    }


def make_run_dir(cfg: RunConfig) -> Path:
    """``<root_dir>/<name>/<YYYYmmdd-HHMMSS>_seed<k>/``, made unique if two runs start in the same second."""
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(cfg.logging.root_dir) / cfg.name / f"{stamp}_seed{cfg.seed}"
    run_dir, n = base, 1
    while run_dir.exists():
        run_dir, n = base.with_name(f"{base.name}-{n}"), n + 1
    try:
        run_dir.mkdir(parents=True)
    except OSError as exc:
        raise ConfigError(f"logging.root_dir: cannot create {run_dir} ({exc.strerror})") from None
    return run_dir


def resolve_total_steps(cfg: RunConfig, task_names: list[str]) -> RunConfig:
    """``total_steps: null`` -> one pass over the sequence, so a reduced-scale run is one ``env.switch_every``."""
    if cfg.total_steps is not None:
        return cfg
    visits = len(cfg.env.task_order) if cfg.env.order == "explicit" and cfg.env.task_order else len(task_names)
    return cfg.model_copy(update={"total_steps": cfg.env.switch_every * visits})


def train(cfg: RunConfig, progress_bar: bool | None = None) -> Path:
    """Train one run as configured and return its directory.

    The directory holds ``config.yaml`` (the resolved config), ``provenance.json`` (code, libraries, CPU and
    command of each session: :mod:`rl_plasticity.provenance`), the TensorBoard events file, with the
    monitor on ``task_summary.csv`` and ``probe_sets.pt``, ``checkpoints/`` (see
    :mod:`rl_plasticity.checkpoint`) and, unless ``logging.save_model`` is off, ``model.zip`` (SB3 ``save``).

    :param progress_bar: overrides ``logging.progress_bar`` when given.
    :raises ConfigError: before anything is written, if the config cannot be built.
    :raises KernelError: before anything is written, ``cpu_kernels: portable`` whose pins did not take effect.
    :raises TrainingInterrupted: stopped by SIGINT/SIGTERM (after writing a checkpoint).
    :raises StorageError: a file of the run could not be written (full disk, read-only); the last good
        checkpoint is kept.
    :raises NonFiniteError: a loss, loss term, gradient, parameter or probe became non-finite; its
        ``checkpoint`` attribute names the last good checkpoint (or ``None``).
    """
    cfg, env = _prepare(cfg)
    agent = build_agent(cfg, env)

    run_dir = make_run_dir(cfg)
    with run_lock(run_dir):
        _write_config(run_dir, cfg)
        return _learn(cfg, env, agent, run_dir, progress_bar)


def _prepare(cfg: RunConfig) -> tuple[RunConfig, VecEnv]:
    """What a new and a resumed run do first, before anything is written: torch's thread count, the kernel
    check, the env (bad options fail here) and ``total_steps: null`` resolved against its tasks."""
    if cfg.threads is not None:
        th.set_num_threads(cfg.threads)
    check_kernels(cfg.cpu_kernels)
    env = build_env(cfg)
    return resolve_total_steps(cfg, env.get_attr("task_names")[0]), env


def _write_config(run_dir: Path, cfg: RunConfig) -> None:
    path = run_dir / CONFIG_FILE
    try:
        path.write_text(to_yaml(cfg))
    except OSError as exc:
        raise StorageError(path, exc.strerror or str(exc), CheckpointStore(run_dir).latest()) from None


#: Keys a checkpoint fixes: a resume cannot change them, even with ``--force``.
FIXED_KEYS = ("seed", "agent.algo", "agent.buffer_size", "interventions", "net.", "env.")


def config_diff(old: RunConfig, new: RunConfig) -> dict[str, tuple[Any, Any]]:
    """``key -> (old, new)`` for every flattened config key whose value differs."""
    a, b = flat_config(old), flat_config(new)
    missing = "(unset)"
    return {
        key: (a.get(key, missing), b.get(key, missing))
        for key in sorted(set(a) | set(b))
        if a.get(key, missing) != b.get(key, missing)
    }


def resume(
    run_dir: str | Path, cfg: RunConfig | None = None, force: bool = False, progress_bar: bool | None = None
) -> Path:
    """Continue the run in ``run_dir`` from its latest checkpoint, to its ``total_steps``.

    :param cfg: the config to resume with (default: the run's ``config.yaml``). If it differs from the
        saved one, the resume is refused with the differing keys listed, unless ``force``; keys the
        checkpoint fixes (:data:`FIXED_KEYS`) are refused even then. With ``force`` the new values apply to
        what is built from the config (e.g. ``total_steps``, learning rate, probes, checkpoints) and
        ``config.yaml`` is rewritten; the checkpoint's state is restored as saved.
    :raises CheckpointError: no run directory, or no checkpoint that passes its checks (one line naming the
        file); a damaged newest checkpoint with a good older one is told on stderr and the older one used.
    :raises ConfigError: a changed config (see ``cfg``).
    :raises RunInUse: another process is training the run (nothing is written).
    """
    run_dir = Path(run_dir)
    saved_file = run_dir / CONFIG_FILE
    if not saved_file.is_file():
        raise CheckpointError(f"{saved_file} not found: {run_dir} is not a run directory")
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(run_lock(run_dir))
        except OSError as exc:  # no lock file, and none can be made: a read-only or full run directory
            raise _storage_error(exc, run_dir, CheckpointStore(run_dir)) from None
        return _resume(run_dir, cfg, force, progress_bar)


def _resume(run_dir: Path, cfg: RunConfig | None, force: bool, progress_bar: bool | None) -> Path:
    saved_file = run_dir / CONFIG_FILE
    saved = load_config(saved_file, registries=registries())
    store = CheckpointStore(run_dir)
    ckpt = store.read()

    new, env = _prepare(saved if cfg is None else cfg)
    diff = config_diff(saved, new)
    if diff:
        listed = ", ".join(f"{k} ({old!r} -> {val!r})" for k, (old, val) in diff.items())
        fixed = [k for k in diff if k in FIXED_KEYS or k.startswith(tuple(p for p in FIXED_KEYS if p.endswith(".")))]
        if fixed:
            env.close()
            raise ConfigError(
                f"cannot resume {run_dir} with a different {', '.join(fixed)}: the checkpoint fixes "
                f"{'it' if len(fixed) == 1 else 'them'}, even with --force (changed: {listed})"
            )
        if not force:
            env.close()
            raise ConfigError(
                f"the config differs from {saved_file} at: {listed}; pass --force to resume with the new values"
            )
        print(f"rlp: resuming with changed config keys (--force): {listed}", file=sys.stderr, flush=True)
    if ckpt.step >= new.total_steps:  # type: ignore[operator]
        env.close()
        print(
            f"rlp: {run_dir} is complete ({ckpt.step} of total_steps={new.total_steps} env steps); nothing to do",
            file=sys.stderr,
            flush=True,
        )
        final = run_dir / MODEL_FILE
        if new.logging.save_model and not final.is_file():
            # Killed between its final checkpoint and model.zip: the checkpoint's model is that very save.
            shutil.copyfile(ckpt.path / MODEL_FILE, final)
            print(
                f"rlp: {final} was missing (stopped before it was saved): copied from {ckpt.path}",
                file=sys.stderr,
                flush=True,
            )
        return run_dir
    agent = build_agent(new, env)
    print(
        f"rlp: resuming {run_dir} from {ckpt.path.name} (env step {ckpt.step} of {new.total_steps})",
        file=sys.stderr,
        flush=True,
    )
    return _learn(new, env, agent, run_dir, progress_bar, resume_from=ckpt, rewrite_config=bool(diff))


def _learn(
    cfg: RunConfig,
    env: VecEnv,
    agent: BaseAlgorithm,
    run_dir: Path,
    progress_bar: bool | None,
    resume_from: Checkpoint | None = None,
    rewrite_config: bool = False,
) -> Path:
    """Callbacks, checkpoints, signal handling and ``learn()`` for a new or a resumed run.

    :param rewrite_config: a forced resume: write the new ``config.yaml`` once the checkpoint has loaded.
    """
    task_names = env.get_attr("task_names")[0]
    task_log = TaskLogCallback(flat_hparams(cfg), task_names)
    task_envs = TaskEnvs.from_config(cfg)
    evaluation = (
        EvalCallback(settings_from(cfg.eval, EvalSettings), task_envs, cfg.env.switch_every)
        if cfg.eval.enabled
        else None
    )
    monitor = (
        MonitorCallback(settings_from(cfg.monitor, MonitorSettings), run_dir, task_envs, evaluation=evaluation)
        if cfg.monitor.enabled
        else None
    )
    checkpoints = settings_from(cfg.checkpoint, CheckpointSettings)
    trainee = Trainee(agent, env, list(agent.interventions), task_log, monitor, evaluation)  # type: ignore[arg-type]
    store = CheckpointStore(run_dir)
    if resume_from is not None:
        # Before anything is written: a checkpoint that does not load leaves the run directory as it was.
        try:
            restore(trainee, resume_from, learning_starts=getattr(cfg.agent, "learning_starts", 0))
        except BaseException:
            env.close()
            raise
    show_progress = cfg.logging.progress_bar if progress_bar is None else progress_bar
    try:
        store.clean(keep_up_to=None if resume_from is None else resume_from.path)
        if rewrite_config:
            _write_config(run_dir, cfg)
        record_session(run_dir, None if resume_from is None else resume_from.step, cfg.cpu_kernels)  # provenance.json
        purge = None if resume_from is None else resume_from.step + 1
        if resume_from is not None:
            after_earlier_events_files(run_dir)
        agent.set_logger(make_logger(run_dir, stdout=not show_progress, purge_step=purge))
    except (StorageError, OSError) as exc:
        env.close()
        raise _storage_error(exc, run_dir, store) from None
    # Probe rounds dump TensorBoard-only keys; SB3's stdout table then warns that it has nothing to show.
    warnings.filterwarnings("ignore", message="Tried to write empty key-value dict")
    learn_kwargs: dict[str, Any] = {}
    if cfg.logging.log_interval is not None:
        learn_kwargs["log_interval"] = cfg.logging.log_interval
    guard = SignalGuard()
    pbar = ProgressBarCallback() if show_progress else None
    try:
        # Evaluation before the monitor: a visit's row in task_summary.csv takes the evaluation at its end.
        callbacks: list[BaseCallback] = [task_log] + [cb for cb in (evaluation, monitor) if cb is not None]
        callbacks.append(CheckpointCallback(store, trainee, checkpoints, guard, resume_from))
        if pbar is not None:
            callbacks.append(pbar)
        # Weight decay drives weights and Adam moments towards denormal floats, up to 3x slower on CPU. The
        # setting is process-wide (it would break other code, e.g. hypothesis), so it is undone afterwards.
        th.set_flush_denormal(True)
        with guard, kernels(cfg.cpu_kernels):
            agent.learn(
                total_timesteps=cfg.total_steps - agent.num_timesteps,  # type: ignore[operator]
                callback=callbacks,
                reset_num_timesteps=resume_from is None,
                **learn_kwargs,
            )
            write_checkpoint(store, trainee, checkpoints)
    except TrainingInterrupted as exc:
        _close_progress(pbar)
        exc.run_dir = run_dir
        exc.checkpoint = exc.checkpoint or store.latest()
        _close_quietly(agent, env)
        raise
    except NonFiniteError as exc:
        _close_progress(pbar)
        try:
            agent.logger.dump(step=agent.num_timesteps)  # what was recorded up to the failure
        except OSError:
            pass  # the NaN guard's line is the one to show; the events end at the last good dump
        exc.checkpoint = store.latest()  # type: ignore[attr-defined]
        _close_quietly(agent, env)
        raise
    except (StorageError, OSError) as exc:  # or a write elsewhere (task_summary.csv, probe sets) that failed
        if isinstance(exc, OSError) and exc.errno not in STORAGE_ERRNOS:
            _close_quietly(agent, env)
            raise
        _close_progress(pbar)
        _close_quietly(agent, env)
        raise _storage_error(exc, run_dir, store) from None
    except BaseException:
        _close_quietly(agent, env)
        raise
    finally:
        th.set_flush_denormal(False)
    try:
        agent.logger.close()  # flushes the events file: it may fail too
        if cfg.logging.save_model:
            agent.save(run_dir / MODEL_FILE)
    except (StorageError, OSError) as exc:
        raise _storage_error(exc, run_dir, store) from None
    finally:
        env.close()
    return run_dir


def _close_quietly(agent: BaseAlgorithm, env: VecEnv) -> None:
    """Close the logger and the env on the way out of a failed or stopped run; the first error is the one
    to report, so a second one here (the same full disk) is not raised."""
    try:
        agent.logger.close()
    except (StorageError, OSError):
        pass
    env.close()


def _storage_error(exc: StorageError | OSError, run_dir: Path, store: CheckpointStore) -> StorageError:
    """``exc`` as a :class:`StorageError` naming the run and its last good checkpoint."""
    if not isinstance(exc, StorageError):
        exc = StorageError(exc.filename or run_dir, exc.strerror or str(exc))
    exc.run_dir = run_dir
    exc.checkpoint = exc.checkpoint or store.latest()
    return exc


def _close_progress(pbar: ProgressBarCallback | None) -> None:
    if pbar is not None and hasattr(pbar, "pbar"):
        pbar.pbar.close()
