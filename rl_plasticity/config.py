"""The typed run configuration: YAML presets plus ``key.sub=value`` overrides, validated by pydantic.

OmegaConf loads the YAML and applies the overrides (its grammar parses ``[a,b]`` lists, numbers and
booleans); pydantic checks every key and type against the schema below, and the names (task sequence,
interventions and their parameters, probes) against the :class:`Registries` the caller passes in
(:func:`rl_plasticity.catalog.registries` gathers the project's): this module imports no registry. Any problem
becomes a :class:`ConfigError` whose message is one line naming the key and the valid choices.
"""

from __future__ import annotations

import difflib
import types
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol, Union, get_args, get_origin

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

#: Presets shipped with the project (the repository's ``configs/`` folder).
CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"

PositiveInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]


class ConfigError(ValueError):
    """A bad config: the message is one line naming the key and what would be valid."""


class InterventionEntry(Protocol):
    """What the config reads of a registered intervention (:class:`rl_plasticity.interventions.InterventionSpec`)."""

    @property
    def algos(self) -> tuple[str, ...]:
        """The agents it supports."""

    @property
    def why_not(self) -> str:
        """Why an agent left out is not supported."""

    @property
    def params(self) -> type[BaseModel]:
        """The pydantic model of its parameters."""


@dataclass(frozen=True)
class Registries:
    """The names a config may use, passed in by whoever validates it (the CLI, the runner, the sweep plan).

    :param sequences: the task sequences (``env.sequence``).
    :param interventions: intervention name -> its entry (``interventions``, ``intervention_params``).
    :param probe_kinds: probe name -> ``light`` or ``heavy`` (``monitor.probes`` and ``monitor.batch_probes``
        take light ones, ``monitor.switch_probes`` heavy ones).
    """

    sequences: Collection[str]
    interventions: Mapping[str, InterventionEntry]
    probe_kinds: Mapping[str, str]


def _registries(info: ValidationInfo) -> Registries | None:
    """The registries :func:`validate_config` put in the validation context; ``None`` for a section built
    directly (e.g. ``MonitorConfig()`` in a test), whose names are then left unchecked."""
    context = info.context if isinstance(info.context, dict) else {}
    return context.get("registries")


def _did_you_mean(name: str, valid: Collection[str]) -> str:
    close = difflib.get_close_matches(name, list(valid), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


class _Section(BaseModel):
    # Unknown keys are errors (with a "did you mean"), and values are not coerced across kinds silently.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DQNConfig(_Section):
    """SB3 DQN hyperparameters (SB3's defaults), plus the Double-DQN and fast-path switches and the
    C-CHAIN settings.

    The options beyond SB3 (``exploration_steps``, ``exploration_reset_on_switch``, ``random_steps_per_task``,
    ``td_loss``, ``max_grad_norm: null``) default to SB3's behaviour; see :class:`agents.dqn.PlasticDQN`.
    """

    algo: Literal["dqn"] = Field("dqn", description="Agent: 'dqn' (PlasticDQN) or 'ppo' (PlasticPPO).")
    double_q: bool = Field(
        False, description="Double-DQN target: the online net picks a', the target net evaluates it."
    )
    fast: bool = Field(
        False,
        description="Fast path (agents/fast_dqn.py): the same DQN maths with less overhead (fused Adam, one "
        "gather per batch field, lean acting), equal to the stock path up to float rounding; off: stock SB3.",
    )
    learning_rate: Annotated[float, Field(gt=0)] = Field(1e-4, description="Adam learning rate.")
    buffer_size: PositiveInt = Field(1_000_000, description="Replay buffer capacity (transitions).")
    learning_starts: NonNegInt = Field(100, description="Env steps collected before the first update.")
    batch_size: PositiveInt = Field(32, description="Minibatch size per gradient step.")
    tau: Annotated[float, Field(gt=0, le=1)] = Field(1.0, description="Target update coefficient (1 = hard copy).")
    gamma: Fraction = Field(0.99, description="Discount factor.")
    train_freq: PositiveInt = Field(4, description="Env steps (per env) between updates.")
    gradient_steps: PositiveInt = Field(1, description="Gradient steps per update.")
    target_update_interval: PositiveInt = Field(10_000, description="Env steps between target network updates.")
    exploration_fraction: Fraction | None = Field(
        0.1,
        description="Fraction of total_steps over which epsilon decays (SB3's schedule; null with exploration_steps).",
    )
    exploration_steps: PositiveInt | None = Field(
        None,
        validate_default=True,  # so that a null exploration_fraction without it is an error too
        description="Env steps over which epsilon decays, whatever total_steps is (so a run on one task alone decays "
        "as a sequence's first task); not counting random_steps_per_task. Replaces exploration_fraction "
        "(null: use it).",
    )
    exploration_reset_on_switch: bool = Field(
        False,
        description="Restart the epsilon decay at every task switch (needs exploration_steps).",
    )
    exploration_initial_eps: Fraction = Field(1.0, description="Initial epsilon.")
    exploration_final_eps: Fraction = Field(0.05, description="Final epsilon.")
    random_steps_per_task: NonNegInt = Field(
        0,
        description="At the start of every task visit, env steps of uniform-random actions with no update; they do "
        "not advance the target-update or the exploration_steps counters (C-CHAIN's 10k).",
    )
    td_loss: Literal["huber", "mse"] = Field("huber", description="TD loss: huber (SB3) or mse (C-CHAIN).")
    max_grad_norm: Annotated[float, Field(gt=0)] | None = Field(
        10.0,
        description="Gradient clipping norm (null: no clipping, as C-CHAIN).",
    )

    @model_validator(mode="before")
    @classmethod
    def _exploration_steps_replace_fraction(cls, data: Any) -> Any:
        # exploration_steps alone means "instead of the fraction": store the fraction as null, so the saved
        # config.yaml gives one of the two and loads again (on resume) as it was.
        if isinstance(data, dict) and data.get("exploration_steps") is not None and "exploration_fraction" not in data:
            data = {**data, "exploration_fraction": None}
        return data

    @field_validator("exploration_steps")
    @classmethod
    def _one_schedule(cls, value: int | None, info: Any) -> int | None:
        fraction = info.data.get("exploration_fraction")
        if value is not None and fraction is not None:
            raise ValueError(
                f"give one exploration schedule: exploration_steps or exploration_fraction "
                f"(it is {fraction}); set agent.exploration_fraction=null to use exploration_steps"
            )
        if value is None and fraction is None and "exploration_fraction" in info.data:
            raise ValueError("no exploration schedule: give agent.exploration_steps or agent.exploration_fraction")
        return value

    @field_validator("exploration_reset_on_switch")
    @classmethod
    def _reset_needs_steps(cls, value: bool, info: Any) -> bool:
        if value and info.data.get("exploration_steps") is None:
            raise ValueError(
                "needs agent.exploration_steps (the decay it restarts; exploration_fraction's follows total_steps)"
            )
        return value


class PPOConfig(_Section):
    """SB3 PPO hyperparameters (SB3's defaults)."""

    algo: Literal["ppo"] = Field("ppo", description="Agent: 'dqn' (PlasticDQN) or 'ppo' (PlasticPPO).")
    learning_rate: Annotated[float, Field(gt=0)] = Field(3e-4, description="Adam learning rate.")
    n_steps: PositiveInt = Field(2048, description="Env steps per env per rollout.")
    batch_size: PositiveInt = Field(64, description="Minibatch size.")
    n_epochs: PositiveInt = Field(10, description="Epochs over each rollout.")
    gamma: Fraction = Field(0.99, description="Discount factor.")
    gae_lambda: Fraction = Field(0.95, description="GAE lambda.")
    clip_range: Annotated[float, Field(gt=0)] = Field(0.2, description="Policy clip range.")
    clip_range_vf: Annotated[float, Field(gt=0)] | None = Field(None, description="Value clip range (null: none).")
    normalize_advantage: bool = Field(True, description="Normalize advantages per minibatch.")
    ent_coef: Annotated[float, Field(ge=0)] = Field(0.0, description="Entropy bonus coefficient.")
    vf_coef: Annotated[float, Field(ge=0)] = Field(0.5, description="Value loss coefficient.")
    max_grad_norm: Annotated[float, Field(gt=0)] = Field(0.5, description="Gradient clipping norm.")
    target_kl: Annotated[float, Field(gt=0)] | None = Field(
        None, description="Early-stop epochs above this KL (null: off)."
    )


AgentConfig = Annotated[DQNConfig | PPOConfig, Field(discriminator="algo")]


class NetConfig(_Section):
    """The network. ``auto`` uses the MinAtar network for (C, H, W) observations and SB3's MLP otherwise.

    ``layer_norm`` and ``activation: crelu`` are the architecture options of the study (see
    :mod:`agents.networks`); both are off by default, which builds SB3's own networks.
    """

    kind: Literal["auto", "minatar", "mlp"] = Field("auto", description="Torso: auto, minatar (conv) or mlp.")
    width: PositiveInt = Field(128, description="Units per hidden layer (128 in the MinAtar network).")
    depth: NonNegInt = Field(1, description="Hidden layers before the head (1 in the MinAtar network).")
    channels: PositiveInt = Field(16, description="Conv channels of the MinAtar torso.")
    activation: Literal["relu", "tanh", "crelu"] = Field(
        "relu",
        description="Hidden activation: relu, tanh (SB3's PPO default) or crelu = cat(relu(x), relu(-x)) "
        "(Abbas et al. 2023), also in the MinAtar conv; crelu keeps width and channels by halving the units "
        "before it, so both must be even.",
    )
    layer_norm: bool = Field(
        False,
        description="LayerNorm after each hidden linear layer, before its activation (Lyle et al. 2024); "
        "not after the heads nor in the MinAtar conv.",
    )

    @field_validator("activation")
    @classmethod
    def _crelu_width(cls, value: str, info: Any) -> str:
        # info is pydantic's ValidationInfo; data holds the fields above, already validated.
        if value == "crelu":
            keys = ("width",) if info.data.get("kind") == "mlp" else ("width", "channels")
            for key in keys:
                size = info.data.get(key)
                if size is not None and size % 2:
                    raise ValueError(
                        f"crelu keeps the width by halving the units before it, so net.{key} "
                        f"must be even (it is {size})"
                    )
        return value


class EnvConfig(_Section):
    """The task sequence and its schedule (see ``rlp list sequences``)."""

    sequence: str = Field("continual_minatar", description="Registered task sequence (rlp list sequences).")
    switch_every: PositiveInt = Field(100_000, description="Env steps per task, counted over all parallel envs.")
    order: Literal["cyclic", "random", "explicit"] = Field("cyclic", description="Task order.")
    task_order: list[NonNegInt] | None = Field(None, description="Task indices for order=explicit (repeated).")
    n_envs: PositiveInt = Field(1, description="Parallel environments (DummyVecEnv).")
    sequence_seed: int | None = Field(None, description="Seed of the task family and random order (null: run seed).")
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="Sequence options, e.g. games, game, num_tasks, sticky_action_prob, and for every sequence "
        "low_return_cutoff: {steps, min_return, games} (rlp list sequences).",
    )

    @field_validator("sequence")
    @classmethod
    def _sequence(cls, value: str, info: ValidationInfo) -> str:
        registries = _registries(info)
        if registries is not None and value not in registries.sequences:
            valid = registries.sequences
            raise ValueError(
                f"'{value}' is not a task sequence{_did_you_mean(value, valid)}; valid: {', '.join(valid)}"
            )
        return value


class LoggingConfig(_Section):
    """Where and how the run logs."""

    root_dir: str = Field("runs", description="Runs go to <root_dir>/<name>/<date-time>_seed<k>/.")
    progress_bar: bool = Field(True, description="Show a progress bar.")
    log_interval: PositiveInt | None = Field(
        None, description="SB3 log interval (null: SB3's: 4 episodes DQN, 1 rollout PPO)."
    )
    save_model: bool = Field(True, description="Save the final model (SB3 zip) as model.zip.")


def _check_probe_names(names: list[str], kind: str, info: ValidationInfo) -> list[str]:
    """Every name must be a registered probe of ``kind`` (:attr:`Registries.probe_kinds`)."""
    registries = _registries(info)
    if registries is None:
        return names
    kinds = registries.probe_kinds
    valid = [name for name, k in kinds.items() if k == kind]
    for name in names:
        if name in valid:
            continue
        if name in kinds:
            other = "switch_probes" if kinds[name] == "heavy" else "probes or monitor.batch_probes"
            raise ValueError(
                f"'{name}' is a {kinds[name]} probe: it goes in monitor.{other}; "
                f"valid {kind} probes: {', '.join(valid)}"
            )
        raise ValueError(
            f"'{name}' is not a {kind} probe{_did_you_mean(name, valid)}; valid: {', '.join(valid)} (rlp list probes)"
        )
    return names


class MonitorConfig(_Section):
    """The plasticity monitor: which probes run, how often and on how much data (see docs/reference/metrics.md)."""

    enabled: bool = Field(True, description="Run the plasticity probes during training.")
    probe_every: PositiveInt = Field(2_000, description="Gradient steps between probe rounds (also at every switch).")
    probes: list[str] = Field(
        validate_default=True,  # the default names are checked against the registry too
        default_factory=lambda: ["rank", "dormant", "collapse", "weights", "kfac"],
        description="Light probes of every round (rlp list probes), e.g. rank, dormant, collapse, weights, kfac.",
    )
    switch_probes: list[str] = Field(
        validate_default=True,  # the default names are checked against the registry too
        default_factory=lambda: ["hessian", "gram", "trainability"],
        description="Heavy probes, run at task switches only (rlp list probes): hessian, gram, trainability.",
    )
    on_batch: bool = Field(True, description="Also probe the current training batch (besides the fixed probe set).")
    batch_probes: list[str] = Field(
        validate_default=True,  # the default names are checked against the registry too
        default_factory=lambda: ["rank", "dormant", "collapse"],
        description="Probes run on the training batch (K-FAC is left to the probe set: it is most of the cost).",
    )
    probe_set_size: Annotated[int, Field(ge=2)] = Field(
        1024,
        description="Samples in each task's probe set (@probe_set): transitions of a seeded uniform-random "
        "policy on a separate copy of the task, the same for every arm and network with the same seed.",
    )
    probe_set_episodes: PositiveInt = Field(
        10,
        description="Episodes the random policy plays at least for a probe set (it plays at least 4x "
        "probe_set_size transitions, then subsamples).",
    )
    probe_set_max_episode_steps: PositiveInt = Field(
        1000, description="Steps after which a random-policy episode of a probe set is cut (it bootstraps)."
    )
    first_visit: bool = Field(
        False,
        description="Also probe a second set per task (@first_visit): the run's own first samples of "
        "the task on its first visit (depends on the arm: a continual network's are its previous policy's).",
    )
    first_visit_size: Annotated[int, Field(ge=2)] = Field(256, description="Samples in each @first_visit set.")
    dormant_tau: Annotated[float, Field(ge=0)] = Field(0.025, description="Dormancy threshold tau (Sokar et al. 2023).")
    hessian_order: PositiveInt = Field(
        100, description="Lanczos order of the Hessian spectrum (docs/reference/metrics.md)."
    )
    hessian_vectors: PositiveInt = Field(
        4, description="Start vectors the Hessian spectrum (SLQ) averages over; each costs hessian_order HVPs."
    )
    gram_size: Annotated[int, Field(ge=2)] = Field(256, description="Probe samples in the Gram matrix.")
    trainability_steps: PositiveInt = Field(200, description="Adam steps of the trainability probe.")
    trainability_lr: Annotated[float, Field(gt=0)] = Field(
        1e-3, description="Adam learning rate of the trainability probe."
    )
    histograms: bool = Field(True, description="Log histograms of feature singular values and K-FAC eigenvalues.")

    @field_validator("probes", "batch_probes")
    @classmethod
    def _light_probes(cls, value: list[str], info: ValidationInfo) -> list[str]:
        return _check_probe_names(value, "light", info)

    @field_validator("switch_probes")
    @classmethod
    def _heavy_probes(cls, value: list[str], info: ValidationInfo) -> list[str]:
        return _check_probe_names(value, "heavy", info)


class EvalConfig(_Section):
    """Evaluation of the agent's own policy on separate env copies (C-CHAIN: 10 greedy episodes every 50k steps).

    Evaluation draws nothing from training's RNGs and steps none of its envs, so training is the same with it
    on or off; each episode's game is seeded from ``eval.seed``, the task index and the episode index, so
    every round, arm and resumed run plays the same evaluation episodes.
    """

    enabled: bool = Field(True, description="Evaluate the policy during training (eval/<task>/mean_return).")
    every: PositiveInt | None = Field(
        None,
        description="Env steps between evaluations (null: env.switch_every / 10); also at the start and "
        "at the end of every task visit.",
    )
    episodes: PositiveInt = Field(10, description="Episodes per task and evaluation (played side by side).")
    epsilon: Fraction = Field(
        0.0, description="Epsilon of the evaluation policy (0: greedy; PPO: its deterministic action)."
    )
    tasks: Literal["current", "all"] = Field(
        "current",
        description="current: the task being trained; all: every task of the sequence each time "
        "(a task-by-task matrix: forgetting and forward transfer).",
    )
    seed: NonNegInt | None = Field(None, description="Seed of the evaluation episodes (null: seed x 1234, as C-CHAIN).")
    max_episode_steps: PositiveInt = Field(
        10_000, description="Steps after which an evaluation episode is cut (counted as it stands), so it cannot hang."
    )


class CheckpointConfig(_Section):
    """Checkpoints for ``rlp train --resume`` (see rl_plasticity/checkpoint.py for what they hold)."""

    every: PositiveInt | None = Field(
        100_000,
        description="Env steps between checkpoints, written at the next rollout boundary (DQN: every train_freq "
        "steps; PPO: every n_steps x n_envs); also at the end and on SIGINT/SIGTERM (null: only those).",
    )
    replay_buffer: bool = Field(
        True,
        description="DQN: put the replay buffer in the checkpoint (its size is printed and in meta.json); "
        "without it a resumed run refills it for agent.learning_starts steps and is no longer exact.",
    )
    keep: PositiveInt = Field(
        1,
        description="Checkpoints kept in <run dir>/checkpoints/, newest first; a new one replaces the "
        "previous one only once it is complete.",
    )


class RunConfig(_Section):
    """One training run."""

    name: str = Field(
        "run",
        pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$",
        description="Run name: the folder under logging.root_dir (letters, digits, _ . -).",
    )
    seed: NonNegInt = Field(0, description="Seed of the agent, the env and (by default) the task family.")
    total_steps: PositiveInt | None = Field(
        None, description="Env steps over all parallel envs (null: one pass, env.switch_every x tasks in the order)."
    )
    device: str = Field("auto", description="Torch device: auto, cpu, cuda or cuda:N.")
    threads: PositiveInt | None = Field(None, description="torch.set_num_threads (null: torch's default).")
    cpu_kernels: Literal["native", "portable"] = Field(
        "native",
        description="CPU kernels: native (each library picks for this CPU) or portable (the same kernels "
        "on any x86-64 CPU with AVX2, about 20% slower; needs threads; README, Provenance).",
    )
    agent: AgentConfig = Field(default_factory=DQNConfig, description="The agent and its SB3 hyperparameters.")
    net: NetConfig = Field(default_factory=NetConfig, description="The network.")
    env: EnvConfig = Field(default_factory=EnvConfig, description="The task sequence.")
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description="Logging.")
    monitor: MonitorConfig = Field(default_factory=MonitorConfig, description="The plasticity monitor.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation of the policy.")
    checkpoint: CheckpointConfig = Field(
        default_factory=CheckpointConfig, description="Checkpoints (rlp train --resume)."
    )
    interventions: list[str] = Field(
        default_factory=list, description="Interventions, combined in this order (rlp list interventions)."
    )
    intervention_params: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Parameters per intervention, e.g. intervention_params.reset.layers=all (rlp list interventions).",
    )

    @model_validator(mode="after")
    def _check_interventions(self, info: ValidationInfo) -> RunConfig:
        registries = _registries(info)
        if registries is None:
            return self
        registered = registries.interventions
        valid_names = ", ".join(sorted(registered)) or "(none registered yet)"
        for i, name in enumerate(self.interventions):
            spec = registered.get(name)
            if spec is None:
                raise ValueError(
                    f"interventions[{i}]: '{name}' is not an intervention{_did_you_mean(name, registered)}; "
                    f"valid: {valid_names}"
                )
            if self.agent.algo not in spec.algos:
                raise ValueError(
                    f"interventions[{i}]: '{name}' does not support agent '{self.agent.algo}': {spec.why_not}"
                )
        if len(set(self.interventions)) != len(self.interventions):
            raise ValueError(f"interventions: each may appear once, got {self.interventions}")
        for name, values in self.intervention_params.items():
            spec = registered.get(name)
            if spec is None:
                raise ValueError(f"intervention_params.{name}: not an intervention; valid: {valid_names}")
            try:
                spec.params.model_validate(values)
            except ValidationError as exc:
                err = exc.errors()[0]
                key = ".".join(str(p) for p in err["loc"])
                if err["type"] == "extra_forbidden":
                    valid = list(spec.params.model_fields)
                    raise ValueError(
                        f"unknown config key 'intervention_params.{name}.{key}'{_did_you_mean(key, valid)}; "
                        f"valid keys for {name}: {', '.join(valid) or '(none)'}"
                    ) from None
                raise ValueError(f"intervention_params.{name}.{key}: {err['msg']} (got {err.get('input')!r})") from None
        return self

    @model_validator(mode="after")
    def _check_cpu_kernels(self) -> RunConfig:
        if self.cpu_kernels == "portable" and self.threads is None:
            raise ValueError(
                "cpu_kernels: 'portable' needs threads set (e.g. threads=1): the thread count decides "
                "how sums are split, so it must not follow the machine"
            )
        return self

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        base, _, index = value.partition(":")
        if base not in ("auto", "cpu", "cuda", "mps") or (index and (base != "cuda" or not index.isdigit())):
            raise ValueError(f"'{value}' is not a device; valid: auto, cpu, cuda, cuda:N, mps")
        return value


# -- loading ---------------------------------------------------------------------------------------


def _models_at(loc: tuple[Any, ...], data: dict[str, Any]) -> list[type[BaseModel]]:
    """The schema section(s) that a pydantic error location points into."""
    model: type[BaseModel] = RunConfig
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        if field is None:
            break
        if part == "agent":
            algo = data.get("agent", {}).get("algo", "dqn") if isinstance(data.get("agent"), dict) else "dqn"
            model = PPOConfig if algo == "ppo" else DQNConfig
            continue
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
    return [model]


def _format_error(err: dict[str, Any], data: dict[str, Any]) -> str:
    # Pydantic puts the union member's tag in the location ("agent.dqn.lr"); drop it.
    loc = tuple(p for p in err["loc"] if p not in ("dqn", "ppo") or err["loc"][0] != "agent")
    key = ".".join(str(p) for p in loc)
    if err["type"] == "extra_forbidden":
        model = _models_at(loc, data)[0]
        valid = list(model.model_fields)
        prefix = ".".join(str(p) for p in loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
        hint = f" (did you mean '{prefix + '.' if prefix else ''}{close[0]}'?)" if close else ""
        where = f" in {prefix}" if prefix else ""
        if loc[0] == "agent":
            where += f" for algo={'ppo' if model is PPOConfig else 'dqn'}"
        return f"unknown config key '{key}'{hint}; valid keys{where}: {', '.join(valid)}"
    if err["type"] == "missing":
        return f"config key '{key}' is required"
    if err["type"] == "union_tag_invalid":
        given = err["input"].get("algo") if isinstance(err["input"], dict) else err["input"]
        return f"{key}.algo: '{given}' is not an agent; valid: dqn, ppo"
    msg = err["msg"].removeprefix("Value error, ")
    if not key:  # a whole-config check, whose message names its own keys
        return msg
    return f"{key}: {msg} (got {err.get('input')!r})"


def _load_yaml(path: Path, seen: tuple[Path, ...]) -> Any:
    """One YAML preset, merged over the preset its ``base:`` key names (a path relative to the file)."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise ConfigError(f"{path}: 'base:' loops back to {path.name}")
    try:
        conf = OmegaConf.load(path)
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text (UTF-8) file") from None
    except (yaml.YAMLError, OmegaConfBaseException) as exc:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
    if not OmegaConf.is_dict(conf):
        raise ConfigError(f"{path}: the top level must be a mapping of config keys")
    base = conf.pop("base", None)
    if base is None:
        return conf
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base: must be the path of another preset, got {base!r}")
    return OmegaConf.merge(_load_yaml(path.parent / base, (*seen, path.resolve())), conf)


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = (), *, registries: Registries) -> RunConfig:
    """Load a YAML preset, apply ``key.sub=value`` overrides and validate.

    A preset may start from another one with ``base: <path relative to it>``; its keys override the base's.

    :param registries: the names the config may use, as :func:`validate_config` takes them.
    :raises ConfigError: with a one-line message for any missing file, bad YAML, bad override,
        unknown key or bad value.
    """
    base = _load_yaml(Path(path), seen=())
    for item in overrides:
        if "=" not in item or not item.split("=", 1)[0].strip():
            raise ConfigError(f"override '{item}' is not of the form key.sub=value")
    try:
        merged = OmegaConf.merge(base, OmegaConf.from_dotlist(list(overrides)))
        data = OmegaConf.to_container(merged, resolve=True)
    except (yaml.YAMLError, OmegaConfBaseException) as exc:
        raise ConfigError(f"bad override in {list(overrides)}: {' '.join(str(exc).splitlines()[0].split())}") from None
    return validate_config(data, registries=registries)  # type: ignore[arg-type]


def validate_config(data: dict[str, Any], *, registries: Registries) -> RunConfig:
    """Validate a plain dict against :class:`RunConfig`, raising :class:`ConfigError` on the first problem.

    :param registries: the task sequences, interventions and probes the config may name (the project's:
        :func:`rl_plasticity.catalog.registries`).
    """
    try:
        return RunConfig.model_validate(data, context={"registries": registries})
    except ValidationError as exc:
        raise ConfigError(_format_error(exc.errors()[0], data)) from None


def _type_name(annotation: Any) -> str:
    """A readable type for ``--help``: ``cyclic|random|explicit``, ``int or null``, ``list of int``."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return "|".join(str(a) for a in args)
    if origin is Annotated:
        return _type_name(args[0])
    if origin in (Union, types.UnionType):
        names = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(names) + (" or null" if type(None) in args else "")
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if origin is dict:
        return "mapping"
    return getattr(annotation, "__name__", str(annotation))


def config_help() -> str:
    """Every config key with its type, default and description, for ``rlp train --help``."""
    lines: list[str] = []

    def walk(model: type[BaseModel], prefix: str, skip: tuple[str, ...] = ()) -> None:
        for name, field in model.model_fields.items():
            if name in skip:
                continue
            default = "required" if field.is_required() else repr(field.get_default(call_default_factory=True))
            lines.append(f"{prefix}{name} ({_type_name(field.annotation)}; default {default}): {field.description}")

    walk(RunConfig, "", skip=("agent", "net", "env", "logging", "monitor", "eval", "checkpoint"))
    walk(DQNConfig, "agent.")
    lines.append("with agent.algo=ppo, the agent keys are instead:")
    walk(PPOConfig, "agent.", skip=("algo",))
    for section in (NetConfig, EnvConfig, LoggingConfig, MonitorConfig, EvalConfig, CheckpointConfig):
        name = section.__name__.removesuffix("Config").lower()
        walk(section, f"{name}.")
    return "\n".join(lines)


def to_yaml(cfg: RunConfig) -> str:
    """The resolved config as YAML (what the run directory stores)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def flat_config(cfg: RunConfig, keep_empty: bool = False) -> dict[str, Any]:
    """The config flattened to ``section.key -> value`` (lists and None kept as they are).

    :param keep_empty: keep an empty mapping (e.g. ``intervention_params: {}``) as a key of its own with the
        value ``{}``; by default it leaves no key. A sweep keeps them: its manifest records every trial's
        config this way, and a re-run compares against it.
    """
    flat: dict[str, Any] = {}

    def walk(value: Any, prefix: str) -> None:
        if isinstance(value, dict) and (value or not keep_empty):
            for key, sub in value.items():
                walk(sub, f"{prefix}.{key}" if prefix else key)
        else:
            flat[prefix] = value

    walk(cfg.model_dump(mode="json"), "")
    return flat
