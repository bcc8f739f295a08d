"""Put a run together: config -> task sequence -> agent -> callbacks -> ``learn()`` -> run directory.

Everything that can fail on bad input (the sequence and its options, the device) is built and checked
before the run directory is created, so a bad config leaves nothing behind.
"""

from __future__ import annotations

import datetime as dt
import warnings
from pathlib import Path
from typing import Any

import torch as th
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.logger import configure
from stable_baselines3.common.vec_env import DummyVecEnv, VecEnv
from torch import nn

from agents import AGENTS, POLICIES, CReLU, minatar_policy_kwargs, mlp_policy_kwargs
from envs import make_sequence
from rl_plasticity.config import ConfigError, RunConfig, to_yaml
from rl_plasticity.interventions import build_interventions
from rl_plasticity.monitor import MonitorCallback
from rl_plasticity.task_logging import TaskLogCallback


def build_env(cfg: RunConfig) -> VecEnv:
    """The task sequence as an SB3 ``DummyVecEnv`` of ``env.n_envs`` copies, each in a ``Monitor``."""
    env_cfg = cfg.env
    seed = cfg.seed if env_cfg.sequence_seed is None else env_cfg.sequence_seed
    kwargs: dict[str, Any] = dict(
        switch_every=env_cfg.switch_every,
        order=env_cfg.order,
        task_order=env_cfg.task_order,
        seed=seed,
        num_envs=env_cfg.n_envs,
        **env_cfg.options,
    )
    # Build one copy first so that bad options fail here, with the config key, not inside SB3.
    try:
        make_sequence(env_cfg.sequence, **kwargs).close()
    except ValueError as exc:
        raise ConfigError(f"env: {exc}") from None
    return make_vec_env(make_sequence, n_envs=env_cfg.n_envs, env_kwargs=dict(name=env_cfg.sequence, **kwargs),
                        vec_env_cls=DummyVecEnv)


def policy_kwargs(cfg: RunConfig, env: VecEnv) -> dict[str, Any]:
    """SB3 ``policy_kwargs`` for the configured network on this env (for the policy ``POLICIES[algo]``)."""
    net = cfg.net
    image_like = len(env.observation_space.shape or ()) == 3
    kind = ("minatar" if image_like else "mlp") if net.kind == "auto" else net.kind
    activation = {"relu": nn.ReLU, "tanh": nn.Tanh, "crelu": CReLU}[net.activation]
    if kind == "minatar":
        if not image_like:
            raise ConfigError(f"net.kind: 'minatar' needs (C, H, W) observations, got {env.observation_space.shape}")
        return minatar_policy_kwargs(cfg.agent.algo, width=net.width, depth=net.depth, channels=net.channels,
                                     activation_fn=activation, layer_norm=net.layer_norm)
    return mlp_policy_kwargs(cfg.agent.algo, width=net.width, depth=net.depth, activation_fn=activation,
                             layer_norm=net.layer_norm)


def resolve_device(device: str) -> str:
    """Check that a requested CUDA device exists; ``auto`` is left to SB3."""
    if device.startswith("cuda") and not th.cuda.is_available():
        raise ConfigError(f"device: '{device}' requested but torch sees no CUDA device here; valid here: auto, cpu")
    return device


def build_agent(cfg: RunConfig, env: VecEnv) -> BaseAlgorithm:
    """The configured PlasticDQN or PlasticPPO on ``env``, seeded with the run seed."""
    hyper = cfg.agent.model_dump(exclude={"algo"})
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
    flat: dict[str, Any] = {}

    def walk(value: Any, prefix: str) -> None:
        if isinstance(value, dict):
            for key, sub in value.items():
                walk(sub, f"{prefix}.{key}" if prefix else key)
        elif isinstance(value, (bool, int, float, str)):
            flat[prefix] = value
        else:  # lists and None: TensorBoard takes scalars and strings only
            flat[prefix] = str(value)

    walk(cfg.model_dump(mode="json"), "")
    return flat


def make_run_dir(cfg: RunConfig) -> Path:
    """``<root_dir>/<name>/<YYYYmmdd-HHMMSS>_seed<k>/``, made unique if two runs start in the same second."""
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(cfg.logging.root_dir) / cfg.name / f"{stamp}_seed{cfg.seed}"
    run_dir, n = base, 1
    while run_dir.exists():
        run_dir, n = base.with_name(f"{base.name}-{n}"), n + 1
    run_dir.mkdir(parents=True)
    return run_dir


def train(cfg: RunConfig, progress_bar: bool | None = None) -> Path:
    """Train one run as configured and return its directory.

    The directory holds ``config.yaml`` (the resolved config), the TensorBoard events file, with the
    monitor on ``task_summary.csv`` and ``probe_sets.pt``, and, unless ``logging.save_model`` is off,
    ``model.zip`` (SB3 ``save``).

    :param progress_bar: overrides ``logging.progress_bar`` when given.
    :raises ConfigError: before anything is written, if the config cannot be built.
    """
    if cfg.threads is not None:
        th.set_num_threads(cfg.threads)
    env = build_env(cfg)
    task_names = env.get_attr("task_names")[0]
    if cfg.total_steps is None:
        # One pass over the sequence, so a reduced-scale run is a single env.switch_every override.
        visits = len(cfg.env.task_order) if cfg.env.order == "explicit" and cfg.env.task_order else len(task_names)
        cfg = cfg.model_copy(update={"total_steps": cfg.env.switch_every * visits})
    agent = build_agent(cfg, env)

    run_dir = make_run_dir(cfg)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    show_progress = cfg.logging.progress_bar if progress_bar is None else progress_bar
    formats = ["tensorboard"] if show_progress else ["stdout", "tensorboard"]
    agent.set_logger(configure(str(run_dir), formats))
    # Probe rounds dump TensorBoard-only keys; SB3's stdout table then warns that it has nothing to show.
    warnings.filterwarnings("ignore", message="Tried to write empty key-value dict")

    learn_kwargs: dict[str, Any] = {}
    if cfg.logging.log_interval is not None:
        learn_kwargs["log_interval"] = cfg.logging.log_interval
    callbacks: list[BaseCallback] = [TaskLogCallback(flat_hparams(cfg), task_names)]
    if cfg.monitor.enabled:
        callbacks.append(MonitorCallback(cfg.monitor, run_dir, task_names))
    try:
        agent.learn(
            total_timesteps=cfg.total_steps,  # type: ignore[arg-type]
            callback=callbacks,
            progress_bar=show_progress,
            **learn_kwargs,
        )
    finally:
        agent.logger.close()
        env.close()
    if cfg.logging.save_model:
        agent.save(run_dir / "model.zip")
    return run_dir
