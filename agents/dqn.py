"""PlasticDQN: SB3's DQN with a Double-DQN option and the intervention hooks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Literal, NamedTuple

import numpy as np
import torch as th
from stable_baselines3 import DQN
from stable_baselines3.common.buffers import ReplayBuffer, ReplayBufferSamples
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.noise import ActionNoise
from stable_baselines3.common.type_aliases import GymEnv, RolloutReturn, Schedule, TrainFreq
from stable_baselines3.common.utils import LinearSchedule
from stable_baselines3.common.vec_env import VecEnv
from stable_baselines3.dqn.policies import DQNPolicy
from torch import nn

from agents import fast_dqn
from agents.fast_dqn import TD_LOSSES
from agents.hooks import GramInputs, Intervention, TaskSwitch
from agents.networks import split_output_layer, trainable_output_layer
from agents.plastic import PlasticMixin


class PlasticDQN(PlasticMixin, DQN):
    """Deep Q-Network (SB3's :class:`~stable_baselines3.DQN`) with plasticity hooks.

    Takes every argument :class:`~stable_baselines3.DQN` takes, with SB3's defaults, plus the keyword-only options
    below. Their defaults are
    SB3's behaviour: with them and no intervention, training is bit-for-bit stock SB3.

    :param interventions: interventions called from inside :meth:`train` (see :mod:`agents.hooks`).
    :param double_q: use the Double-DQN target (van Hasselt et al., 2016): the online network picks the
        next action, the target network evaluates it.
    :param td_loss: ``"huber"`` (SB3's ``smooth_l1_loss``) or ``"mse"`` (the MinAtar and C-CHAIN code).
    :param exploration_steps: if given, epsilon decays linearly from ``exploration_initial_eps`` to
        ``exploration_final_eps`` over this many env steps, counted from the start of training (warm-up
        included, as SB3's schedule) except the random steps of ``random_steps_per_task``, whatever the run's
        length. Replaces SB3's ``exploration_fraction`` of the run (pass ``exploration_fraction=None``).
    :param exploration_reset_on_switch: restart that decay at every task switch (needs ``exploration_steps``).
    :param random_steps_per_task: at the start of every task visit (``info["task_switch"]`` of
        :class:`~envs.sequence.TaskSequenceEnv` ends one), this many env steps of uniform-random actions with no
        gradient update. As in C-CHAIN (``crl_minatar/crl_run_double_dqn.py`` in bluecontra/C-CHAIN: ``a`` is
        random and ``agent.train`` is skipped while ``global_step_count < INIT_RANDOM_STEPS``, and
        ``epsilon_decay`` and the update counter of the target copy only move on the agent's own steps), these
        steps advance neither the target-update phase (``_n_calls``) nor the ``exploration_steps`` counter.

    SB3's ``max_grad_norm`` may be ``math.inf``: no clipping (``clip_grad_norm_`` then scales the gradients by
    exactly 1.0 and still returns their norm, which the NaN guard checks).
    :param fast: train, act and collect on the fast path (:mod:`agents.fast_dqn`): the same maths with less
        overhead, equal to the stock path up to float rounding. Off by default: training is then stock SB3.
    """

    def __init__(
        self,
        policy: str | type[DQNPolicy],
        env: GymEnv | str,
        learning_rate: float | Schedule = 1e-4,
        buffer_size: int = 1_000_000,
        learning_starts: int = 100,
        batch_size: int = 32,
        tau: float = 1.0,
        gamma: float = 0.99,
        train_freq: int | tuple[int, str] = 4,
        gradient_steps: int = 1,
        replay_buffer_class: type[ReplayBuffer] | None = None,
        replay_buffer_kwargs: dict[str, Any] | None = None,
        optimize_memory_usage: bool = False,
        n_steps: int = 1,
        target_update_interval: int = 10000,
        exploration_fraction: float | None = 0.1,
        exploration_initial_eps: float = 1.0,
        exploration_final_eps: float = 0.05,
        max_grad_norm: float = 10,
        stats_window_size: int = 100,
        tensorboard_log: str | None = None,
        policy_kwargs: dict[str, Any] | None = None,
        verbose: int = 0,
        seed: int | None = None,
        device: th.device | str = "auto",
        _init_setup_model: bool = True,
        *,
        interventions: Sequence[Intervention] | None = None,
        double_q: bool = False,
        td_loss: Literal["huber", "mse"] = "huber",
        exploration_steps: int | None = None,
        exploration_reset_on_switch: bool = False,
        random_steps_per_task: int = 0,
        fast: bool = False,
    ) -> None:
        if td_loss not in TD_LOSSES:
            raise ValueError(f"td_loss must be one of {', '.join(TD_LOSSES)}, got {td_loss!r}")
        if exploration_steps is not None and exploration_steps <= 0:
            raise ValueError(f"exploration_steps must be positive, got {exploration_steps}")
        if exploration_steps is None and (exploration_reset_on_switch or exploration_fraction is None):
            raise ValueError("exploration_reset_on_switch and exploration_fraction=None need exploration_steps")
        if random_steps_per_task < 0:
            raise ValueError(f"random_steps_per_task must be non-negative, got {random_steps_per_task}")
        self._init_plastic(interventions)
        self.double_q = double_q
        self.td_loss = td_loss
        self.fast = fast
        self._fast_state: fast_dqn.FastState | None = None
        self.exploration_steps = exploration_steps
        self.exploration_reset_on_switch = exploration_reset_on_switch
        self.random_steps_per_task = random_steps_per_task
        #: Env steps of the current task visit so far, and those that count towards ``exploration_steps``.
        self._visit_steps = 0
        self._exploration_count = 0
        #: Whether the last action came from the random steps of a visit (set before each env step).
        self._random_step = False
        super().__init__(
            policy,
            env,
            learning_rate=learning_rate,
            buffer_size=buffer_size,
            learning_starts=learning_starts,
            batch_size=batch_size,
            tau=tau,
            gamma=gamma,
            train_freq=train_freq,
            gradient_steps=gradient_steps,
            replay_buffer_class=replay_buffer_class,
            replay_buffer_kwargs=replay_buffer_kwargs,
            optimize_memory_usage=optimize_memory_usage,
            n_steps=n_steps,
            target_update_interval=target_update_interval,
            exploration_fraction=exploration_fraction,  # type: ignore[arg-type]  # None: exploration_steps decides
            exploration_initial_eps=exploration_initial_eps,
            exploration_final_eps=exploration_final_eps,
            max_grad_norm=max_grad_norm,
            stats_window_size=stats_window_size,
            tensorboard_log=tensorboard_log,
            policy_kwargs=policy_kwargs,
            verbose=verbose,
            seed=seed,
            device=device,
            _init_setup_model=_init_setup_model,
        )

    def set_parameters(self, *args: Any, **kwargs: Any) -> None:
        """SB3's ``set_parameters``; the optimizer then runs this agent's path's Adam kernel, whichever path saved
        it."""
        super().set_parameters(*args, **kwargs)
        fast_dqn.set_adam_kernel(self.policy, self.fast)

    def _excluded_save_params(self) -> list[str]:
        return super()._excluded_save_params() + ["_fast_state"]

    # -- exploration and the random steps of each visit ------------------------------------------
    def _setup_model(self) -> None:
        super()._setup_model()
        self._fast_state = None
        fast_dqn.set_adam_kernel(self.policy, self.fast)
        if self.exploration_steps is not None:
            # SB3's linear schedule, taken over the fraction of exploration_steps done (see _epsilon).
            self.exploration_schedule = LinearSchedule(self.exploration_initial_eps, self.exploration_final_eps, 1.0)
            self.exploration_rate = self._epsilon()

    def _epsilon(self) -> float:
        """Epsilon for the next step: SB3's schedule at the run's progress, or at the ``exploration_steps`` done."""
        if self.exploration_steps is None:
            return self.exploration_schedule(self._current_progress_remaining)
        done = self._exploration_count / self.exploration_steps
        return self.exploration_final_eps if done >= 1.0 else self.exploration_schedule(1.0 - done)

    def _sample_action(
        self, learning_starts: int, action_noise: ActionNoise | None = None, n_envs: int = 1
    ) -> tuple[np.ndarray, np.ndarray]:
        """SB3's action choice; during a visit's random steps, its warm-up branch (uniform over the action space)."""
        self._random_step = self._visit_steps < self.random_steps_per_task
        if self._random_step:
            learning_starts = self.num_timesteps + 1
        return super()._sample_action(learning_starts, action_noise, n_envs)

    def _after_env_step(self, n_steps: int, switch: TaskSwitch | None) -> None:
        self._visit_steps += n_steps
        if not self._random_step:
            self._exploration_count += n_steps
        if switch is not None:
            self._visit_steps = 0
            if self.exploration_reset_on_switch:
                self._exploration_count = 0

    def _on_step(self) -> None:
        """SB3's ``_on_step`` (target-update phase and copy, then epsilon), except that a visit's random steps
        leave the target-update phase where it is (C-CHAIN counts updates, and there is none), and that with
        ``exploration_steps`` epsilon follows the agent's own step counter."""
        if not self._random_step:
            super()._on_step()
        if self._random_step or self.exploration_steps is not None:
            # Replaces what SB3's _on_step took from the run's progress, if it ran.
            self.exploration_rate = self._epsilon()
            self.logger.record("rollout/exploration_rate", self.exploration_rate)

    algo_name: ClassVar[str] = "dqn"
    uses_replay: ClassVar[bool] = True

    @property
    def value_head(self) -> nn.Linear:
        """The last linear layer of the online Q-network; its input is :meth:`value_features`.

        An ``nn.Linear``, or a module that acts as one and gives its ``weight`` and ``bias``: after plasticity
        injection, the linear map from the three heads' hidden layers, side by side, to the Q-values (see
        :func:`agents.networks.split_output_layer`).
        """
        head = split_output_layer(self.q_net.q_net)[1]
        if not (isinstance(head, nn.Linear) or (hasattr(head, "weight") and hasattr(head, "bias"))):
            raise TypeError(f"the Q-network must end in a linear layer, got {type(head).__name__}")
        return head

    def online_network(self) -> nn.Module:
        """The online Q-network (``q_net``); ``q_net_target`` mirrors it module for module."""
        return self.q_net

    def head_layers(self) -> list[nn.Module]:
        """The trainable output layer of the Q head."""
        return [trainable_output_layer(self.q_net.q_net)]

    def mlp_heads(self) -> dict[str, nn.Module]:
        """The Q head after the encoder (the MLP ``q_net.q_net``), under its path in :meth:`online_network`."""
        return {"q_net": self.q_net.q_net}

    def set_mlp_head(self, name: str, module: nn.Module) -> None:
        """Put ``module`` in place of the Q head (``name`` as in :meth:`mlp_heads`) of the online network."""
        if name != "q_net":
            raise KeyError(f"PlasticDQN has one head, 'q_net', got {name!r}")
        self.q_net.q_net = module

    def init_layer(self, layer: nn.Module) -> None:
        """PyTorch's default initialiser, which SB3's DQN networks are built with."""
        layer.reset_parameters()

    def sync_target(self, layers: Sequence[nn.Module]) -> None:
        """Copy ``layers`` of ``q_net`` into the same modules of ``q_net_target``."""
        names = {id(m): name for name, m in self.q_net.named_modules()}
        target = dict(self.q_net_target.named_modules())
        with th.no_grad():
            for layer in layers:
                target[names[id(layer)]].load_state_dict(layer.state_dict())

    def value_features(self, obs: th.Tensor) -> th.Tensor:
        """Input of the Q head for ``obs`` (a batch as the replay buffer stores it), with its graph."""
        hidden, _ = split_output_layer(self.q_net.q_net)
        return hidden(self.q_net.extract_features(obs, self.q_net.features_extractor))

    def sample_batch(self, batch_size: int) -> ReplayBufferSamples:
        """SB3's ``replay_buffer.sample`` (uniform, with replacement)."""
        assert self.replay_buffer is not None
        return self.replay_buffer.sample(batch_size, env=self._vec_normalize_env)

    def value_model(self) -> nn.Module:
        """The online Q-network."""
        return self.q_net

    def nc_classes(self, obs: th.Tensor, features: th.Tensor) -> tuple[th.Tensor, th.Tensor | None]:
        """The greedy action, with the Q head as classifier (its weights returned)."""
        head = self.value_head
        return head(features).argmax(dim=1), head.weight

    def gram_inputs(self, batch: ReplayBufferSamples) -> GramInputs:
        """``f_i = Q(s_i, a_i)`` with ``a_i`` the *stored* action of transition ``i``; its curvature is that of the
        agent's own per-sample TD loss (``TD_LOSSES[td_loss]``) at ``f_i - y_i``, ``y_i`` the TD target of the same
        transition (:meth:`compute_target`, a constant).

        Output and residual belong to the same action, so ``K_L = D^1/2 J J^T D^1/2`` has the non-zero spectrum of
        ``J^T D J``, the Gauss-Newton matrix of the TD loss the agent trains on (``n`` times that of the batch
        mean). (docs/reference/metrics.md names the greedy action; its Q-value is in no TD loss unless it is the
        stored one, so it would pair one output with another output's residual.)
        """
        inputs = (batch.observations, batch.actions.long().reshape(-1, 1))

        def q_taken(model: nn.Module, x: tuple[th.Tensor, th.Tensor]) -> th.Tensor:
            return th.gather(model(x[0]), 1, x[1]).squeeze(1)

        with th.no_grad():
            q = q_taken(self.q_net, inputs)
            targets = self.compute_target(batch).squeeze(1)
        return GramInputs(inputs, q_taken, TD_LOSSES[self.td_loss], q, targets)

    def forward_all(self, batch: NamedTuple) -> None:
        """The Q-network's own forward."""
        self.q_net(batch.observations)  # type: ignore[attr-defined]

    def hidden_forward(self, obs: th.Tensor) -> None:
        """The Q-network up to the head's input (after plasticity injection, the heads' MLPs up to their last
        linear map)."""
        self.value_features(obs)

    def sample_replay_observations(self, batch_size: int, rng: np.random.Generator) -> th.Tensor:
        """Observations drawn with ``rng`` from the filled part of the replay buffer, shape ``(batch_size, *obs)``.

        Uniform over the stored (position, env) rows, without replacement (with replacement while the buffer
        holds fewer than ``batch_size`` rows), as the buffer stores and normalises them for ``train()``. Unlike
        ``replay_buffer.sample`` it draws nothing from NumPy's global RNG, so the training batches stay those
        of the same run without the caller.
        """
        buffer = self.replay_buffer
        observations = None if buffer is None else buffer.observations
        if buffer is None or not isinstance(observations, np.ndarray):
            raise ValueError("sample_replay_observations needs a replay buffer of array (not Dict) observations")
        filled = (buffer.buffer_size if buffer.full else buffer.pos) * buffer.n_envs
        if filled == 0:
            raise ValueError("sample_replay_observations: the replay buffer is empty")
        rows = rng.choice(filled, size=batch_size, replace=filled < batch_size)
        obs = observations[rows // buffer.n_envs, rows % buffer.n_envs]
        return buffer.to_torch(buffer._normalize_obs(obs, self._vec_normalize_env))  # type: ignore[arg-type]

    def compute_target(self, batch: ReplayBufferSamples, discounts: th.Tensor | float | None = None) -> th.Tensor:
        """TD target ``r + (1 - done) * discount * Q_target(s', a')``, shape ``(batch_size, 1)``.

        ``a'`` is ``argmax Q_target(s')`` (stock DQN) or, with ``double_q``, ``argmax Q_online(s')``.
        ``discounts`` defaults to the batch's own (n-step replay) or ``gamma``.
        """
        if discounts is None:
            discounts = batch.discounts if batch.discounts is not None else self.gamma
        with th.no_grad():
            next_q_target = self.q_net_target(batch.next_observations)
            if self.double_q:
                next_actions = self.q_net(batch.next_observations).argmax(dim=1, keepdim=True)
                next_q_values = th.gather(next_q_target, dim=1, index=next_actions)
            else:
                # Same ops as SB3's DQN.train, so the stock path stays bit-identical.
                next_q_values, _ = next_q_target.max(dim=1)
                next_q_values = next_q_values.reshape(-1, 1)
            return batch.rewards + (1 - batch.dones) * discounts * next_q_values

    def training_loss(self, batch: ReplayBufferSamples) -> tuple[th.Tensor, th.Tensor]:
        """The TD loss (``td_loss``: Huber as SB3, or MSE) on ``batch``, and the Q head's input features, both
        with their graph.

        ``train()`` uses exactly this; the curvature probes use it too, so they see the agent's own loss.
        """
        target_q_values = self.compute_target(batch)
        # Split the forward pass at the head so the interventions see its input, with its graph.
        features = self.value_features(batch.observations)
        current_q_values = th.gather(self.value_head(features), dim=1, index=batch.actions.long())
        loss = TD_LOSSES[self.td_loss]
        return loss(current_q_values, target_q_values), features

    def train(self, gradient_steps: int, batch_size: int = 100) -> None:
        """SB3's ``DQN.train`` with the feature, loss-term and update hooks (see :mod:`agents.hooks`).

        Does nothing after a rollout that ended in a visit's random steps (``random_steps_per_task``).
        """
        if self._random_step:
            return
        if self.fast:
            return fast_dqn.train(self, gradient_steps, batch_size)
        self.policy.set_training_mode(True)
        self._update_learning_rate(self.policy.optimizer)

        losses = []
        for _ in range(gradient_steps):
            replay_data = self.replay_buffer.sample(batch_size, env=self._vec_normalize_env)  # type: ignore[union-attr]
            loss, features = self.training_loss(replay_data)
            losses.append(loss.item())
            self._check_finite("train/loss", losses[-1])
            extra = self._intervention_loss(replay_data, features, loss)
            if extra is not None:
                loss = loss + extra

            self._optimizer_step(loss)
        self._check_grad_norms()

        self._n_updates += gradient_steps

        self.logger.record("train/n_updates", self._n_updates, exclude="tensorboard")
        self.logger.record("train/loss", np.mean(losses))
        self._record_terms()

    def collect_rollouts(
        self,
        env: VecEnv,
        callback: BaseCallback,
        train_freq: TrainFreq,
        replay_buffer: ReplayBuffer,
        action_noise: ActionNoise | None = None,
        learning_starts: int = 0,
        log_interval: int | None = None,
    ) -> RolloutReturn:
        """SB3's ``collect_rollouts``; on the fast path, :func:`agents.fast_dqn.collect_rollouts` where it applies
        (:func:`agents.fast_dqn.lean_collection_applies`)."""
        if self.fast and fast_dqn.lean_collection_applies(self, env, action_noise):
            return fast_dqn.collect_rollouts(
                self,
                env,
                callback,
                train_freq,
                replay_buffer,
                learning_starts,
                log_interval,  # type: ignore[arg-type]
            )
        return super().collect_rollouts(
            env, callback, train_freq, replay_buffer, action_noise, learning_starts, log_interval
        )

    def predict(
        self,
        observation: Any,
        state: tuple[np.ndarray, ...] | None = None,
        episode_start: np.ndarray | None = None,
        deterministic: bool = False,
    ) -> tuple[np.ndarray, tuple[np.ndarray, ...] | None]:
        """SB3's ``DQN.predict``; on the fast path, :func:`agents.fast_dqn.predict` where it applies."""
        if self.fast:
            out = fast_dqn.predict(self, observation, deterministic)
            if out is not None:
                return out
        return super().predict(observation, state, episode_start, deterministic)
