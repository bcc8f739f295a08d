"""PlasticPPO: SB3's PPO with the intervention hooks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3 import PPO
from stable_baselines3.common.buffers import RolloutBuffer, RolloutBufferSamples
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.preprocessing import preprocess_obs
from stable_baselines3.common.type_aliases import GymEnv, Schedule
from stable_baselines3.common.utils import explained_variance
from torch import nn
from torch.nn import functional as F

from agents.hooks import GramInputs, Intervention
from agents.networks import split_output_layer, trainable_output_layer
from agents.plastic import PlasticMixin


class PPOLoss(NamedTuple):
    """The PPO loss and its parts on one minibatch, as :meth:`PlasticPPO.loss_parts` returns them."""

    loss: th.Tensor
    policy_loss: th.Tensor
    value_loss: th.Tensor
    entropy_loss: th.Tensor
    ratio: th.Tensor
    log_prob: th.Tensor
    features: th.Tensor


class ValueOutput(nn.Module):
    """PPO's value path (critic torso and value head) as a module of its own, so the trainability probe can copy
    and fit it. The policy itself cannot be deep-copied: it caches its last action distribution, graph included."""

    def __init__(self, policy: Any) -> None:
        super().__init__()
        self.observation_space = policy.observation_space
        self.normalize_images = policy.normalize_images
        self.features_extractor = policy.vf_features_extractor
        self.mlp_extractor = policy.mlp_extractor
        self.value_net = policy.value_net

    def forward(self, obs: th.Tensor) -> th.Tensor:
        features = self.features_extractor(preprocess_obs(obs, self.observation_space, self.normalize_images))
        return self.value_net(self.mlp_extractor.forward_critic(features))


class PlasticPPO(PlasticMixin, PPO):
    """Proximal Policy Optimization (SB3's :class:`~stable_baselines3.PPO`) with plasticity hooks.

    Takes every argument :class:`~stable_baselines3.PPO` takes, with SB3's defaults, plus the keyword-only:

    :param interventions: interventions called from inside :meth:`train` (see :mod:`agents.hooks`).
        Empty by default, in which case training is bit-for-bit stock SB3. The features they see are
        the input of the value head (``policy.value_net``).
    """

    def __init__(
        self,
        policy: str | type[ActorCriticPolicy],
        env: GymEnv | str,
        learning_rate: float | Schedule = 3e-4,
        n_steps: int = 2048,
        batch_size: int = 64,
        n_epochs: int = 10,
        gamma: float = 0.99,
        gae_lambda: float = 0.95,
        clip_range: float | Schedule = 0.2,
        clip_range_vf: None | float | Schedule = None,
        normalize_advantage: bool = True,
        ent_coef: float = 0.0,
        vf_coef: float = 0.5,
        max_grad_norm: float = 0.5,
        use_sde: bool = False,
        sde_sample_freq: int = -1,
        rollout_buffer_class: type[RolloutBuffer] | None = None,
        rollout_buffer_kwargs: dict[str, Any] | None = None,
        target_kl: float | None = None,
        stats_window_size: int = 100,
        tensorboard_log: str | None = None,
        policy_kwargs: dict[str, Any] | None = None,
        verbose: int = 0,
        seed: int | None = None,
        device: th.device | str = "auto",
        _init_setup_model: bool = True,
        *,
        interventions: Sequence[Intervention] | None = None,
    ) -> None:
        self._init_plastic(interventions)
        super().__init__(
            policy,
            env,
            learning_rate=learning_rate,
            n_steps=n_steps,
            batch_size=batch_size,
            n_epochs=n_epochs,
            gamma=gamma,
            gae_lambda=gae_lambda,
            clip_range=clip_range,
            clip_range_vf=clip_range_vf,
            normalize_advantage=normalize_advantage,
            ent_coef=ent_coef,
            vf_coef=vf_coef,
            max_grad_norm=max_grad_norm,
            use_sde=use_sde,
            sde_sample_freq=sde_sample_freq,
            rollout_buffer_class=rollout_buffer_class,
            rollout_buffer_kwargs=rollout_buffer_kwargs,
            target_kl=target_kl,
            stats_window_size=stats_window_size,
            tensorboard_log=tensorboard_log,
            policy_kwargs=policy_kwargs,
            verbose=verbose,
            seed=seed,
            device=device,
            _init_setup_model=_init_setup_model,
        )

    algo_name: ClassVar[str] = "ppo"
    uses_replay: ClassVar[bool] = False

    @property
    def value_head(self) -> nn.Linear:
        """The policy's value head (``policy.value_net``): the last linear layer of the value estimate.

        After plasticity injection, the linear map from the three value heads' hidden layers, side by side,
        to the value (see :func:`agents.networks.split_output_layer`).
        """
        return split_output_layer(self.policy.value_net)[1]

    def online_network(self) -> nn.Module:
        """The actor-critic policy."""
        return self.policy

    def head_layers(self) -> list[nn.Module]:
        """The trainable output layers of the action head and the value head."""
        return [trainable_output_layer(self.policy.action_net), trainable_output_layer(self.policy.value_net)]

    def mlp_heads(self) -> dict[str, nn.Module]:
        """The actor's and the critic's heads after the torso, each as one module (its MLP of ``mlp_extractor``
        followed by ``action_net`` or ``value_net``), under the name :meth:`set_mlp_head` takes."""
        policy = self.policy
        parts = {"action_net": policy.mlp_extractor.policy_net, "value_net": policy.mlp_extractor.value_net}
        return {
            name: nn.Sequential(*mlp, getattr(policy, name)) if len(mlp) else getattr(policy, name)
            for name, mlp in parts.items()
        }

    def set_mlp_head(self, name: str, module: nn.Module) -> None:
        """Make ``module`` the whole head ``name`` (``action_net`` or ``value_net``): it goes in place of that
        output layer, and the MLP of ``mlp_extractor`` before it becomes empty (the identity)."""
        mlps = {"action_net": "policy_net", "value_net": "value_net"}
        if name not in mlps:
            raise KeyError(f"PlasticPPO's heads are {list(mlps)}, got {name!r}")
        setattr(self.policy.mlp_extractor, mlps[name], nn.Sequential())
        setattr(self.policy, name, module)

    def init_layer(self, layer: nn.Module) -> None:
        """SB3's initialiser: orthogonal with the gain of the layer's part of the policy, zero bias.

        The gain is 0.01 for the action head's output layer, 1 for the value head's, sqrt(2) for every
        other layer (as SB3 builds the policy).
        """
        policy = self.policy
        if not policy.ortho_init:
            layer.reset_parameters()
            return
        gains = [(trainable_output_layer(policy.action_net), 0.01), (trainable_output_layer(policy.value_net), 1.0)]
        gain = next((g for output, g in gains if output is layer), np.sqrt(2))
        policy.init_weights(layer, gain=gain)

    def value_features(self, obs: th.Tensor) -> th.Tensor:
        """Input of the value head's last linear layer (the critic's latent) for ``obs``, with its graph."""
        features = self.policy.extract_features(obs)
        critic_features = features if self.policy.share_features_extractor else features[1]
        hidden, _ = split_output_layer(self.policy.value_net)
        return hidden(self.policy.mlp_extractor.forward_critic(critic_features))

    def sample_batch(self, batch_size: int) -> RolloutBufferSamples:
        """The first minibatch of SB3's shuffled ``rollout_buffer.get`` (without replacement; the whole rollout if
        it is smaller)."""
        return next(self.rollout_buffer.get(batch_size))

    def value_model(self) -> nn.Module:
        """The critic path (torso and value head) as a module of its own (:class:`ValueOutput`)."""
        return ValueOutput(self.policy)

    def nc_classes(self, obs: th.Tensor, features: th.Tensor) -> tuple[th.Tensor, th.Tensor | None]:
        """The actor's mode (most likely action); no classifier weights."""
        return self.policy.get_distribution(obs).mode(), None

    def gram_inputs(self, batch: RolloutBufferSamples) -> GramInputs:
        """``f_i = V(s_i)``, curvature 1 (the value loss is a mean squared error)."""

        def value(model: nn.Module, obs: th.Tensor) -> th.Tensor:
            return model.predict_values(obs).squeeze(-1)  # type: ignore[operator]

        return GramInputs(batch.observations, value)

    def forward_all(self, batch: NamedTuple) -> None:
        """SB3's ``evaluate_actions``: torso, actor and critic, as PPO's loss runs them."""
        actions = batch.actions  # type: ignore[attr-defined]
        if isinstance(self.action_space, spaces.Discrete):
            actions = actions.long().flatten()
        self.policy.evaluate_actions(batch.observations, actions)  # type: ignore[attr-defined]

    def hidden_forward(self, obs: th.Tensor) -> None:
        """The shared or separate torsos and both MLP branches (actor and critic), each layer once, as PPO's own
        loss computes them; after plasticity injection the heads' MLPs up to their last linear map."""
        policy = self.policy
        features = policy.extract_features(obs)
        pi_features, vf_features = (features, features) if policy.share_features_extractor else features
        latent_pi = policy.mlp_extractor.forward_actor(pi_features)
        latent_vf = policy.mlp_extractor.forward_critic(vf_features)
        for head, latent in ((policy.action_net, latent_pi), (policy.value_net, latent_vf)):
            split_output_layer(head)[0](latent)

    def _evaluate_actions(
        self, obs: th.Tensor, actions: th.Tensor
    ) -> tuple[th.Tensor, th.Tensor, th.Tensor | None, th.Tensor]:
        """SB3's ``ActorCriticPolicy.evaluate_actions``, also returning the input of the value head's last linear
        layer (:meth:`value_features`)."""
        policy = self.policy
        features = policy.extract_features(obs)
        if policy.share_features_extractor:
            latent_pi, latent_vf = policy.mlp_extractor(features)
        else:
            pi_features, vf_features = features
            latent_pi = policy.mlp_extractor.forward_actor(pi_features)
            latent_vf = policy.mlp_extractor.forward_critic(vf_features)
        distribution = policy._get_action_dist_from_latent(latent_pi)
        log_prob = distribution.log_prob(actions)
        hidden, value_head = split_output_layer(policy.value_net)
        latent_vf = hidden(latent_vf)
        values = value_head(latent_vf)
        entropy = distribution.entropy()
        return values, log_prob, entropy, latent_vf

    def loss_parts(self, batch: RolloutBufferSamples, clip_range: float, clip_range_vf: float | None) -> PPOLoss:
        """SB3's PPO loss on a rollout minibatch, split into the parts ``train()`` logs."""
        actions = batch.actions
        if isinstance(self.action_space, spaces.Discrete):
            actions = batch.actions.long().flatten()

        values, log_prob, entropy, features = self._evaluate_actions(batch.observations, actions)
        values = values.flatten()
        advantages = batch.advantages
        # Normalization does not make sense if mini batchsize == 1 (SB3 GH issue #325)
        if self.normalize_advantage and len(advantages) > 1:
            advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)

        ratio = th.exp(log_prob - batch.old_log_prob)
        policy_loss_1 = advantages * ratio
        policy_loss_2 = advantages * th.clamp(ratio, 1 - clip_range, 1 + clip_range)
        policy_loss = -th.min(policy_loss_1, policy_loss_2).mean()

        if clip_range_vf is None:
            values_pred = values
        else:
            values_pred = batch.old_values + th.clamp(values - batch.old_values, -clip_range_vf, clip_range_vf)
        value_loss = F.mse_loss(batch.returns, values_pred)

        if entropy is None:
            entropy_loss = -th.mean(-log_prob)
        else:
            entropy_loss = -th.mean(entropy)

        loss = policy_loss + self.ent_coef * entropy_loss + self.vf_coef * value_loss
        return PPOLoss(loss, policy_loss, value_loss, entropy_loss, ratio, log_prob, features)

    def training_loss(self, batch: RolloutBufferSamples) -> tuple[th.Tensor, th.Tensor]:
        """The PPO loss on ``batch`` at the current clip ranges, and the value head's input features.

        ``train()`` computes exactly this; the curvature probes use it too, so they see the agent's own loss.
        """
        clip_range = self.clip_range(self._current_progress_remaining)  # type: ignore[operator]
        clip_range_vf = None
        if self.clip_range_vf is not None:
            clip_range_vf = self.clip_range_vf(self._current_progress_remaining)  # type: ignore[operator]
        parts = self.loss_parts(batch, clip_range, clip_range_vf)
        return parts.loss, parts.features

    def train(self) -> None:
        """SB3's ``PPO.train`` with the feature, loss-term and update hooks (see :mod:`agents.hooks`)."""
        self.policy.set_training_mode(True)
        self._update_learning_rate(self.policy.optimizer)
        clip_range = self.clip_range(self._current_progress_remaining)  # type: ignore[operator]
        clip_range_vf = None
        if self.clip_range_vf is not None:
            clip_range_vf = self.clip_range_vf(self._current_progress_remaining)  # type: ignore[operator]

        entropy_losses = []
        pg_losses, value_losses = [], []
        clip_fractions = []

        continue_training = True
        for epoch in range(self.n_epochs):
            self._before_epoch(epoch)
            approx_kl_divs = []
            for rollout_data in self.rollout_buffer.get(self.batch_size):
                parts = self.loss_parts(rollout_data, clip_range, clip_range_vf)
                pg_losses.append(parts.policy_loss.item())
                clip_fraction = th.mean((th.abs(parts.ratio - 1) > clip_range).float()).item()
                clip_fractions.append(clip_fraction)
                value_losses.append(parts.value_loss.item())
                entropy_losses.append(parts.entropy_loss.item())
                self._check_finite("train/policy_gradient_loss", pg_losses[-1])
                self._check_finite("train/value_loss", value_losses[-1])
                self._check_finite("train/entropy_loss", entropy_losses[-1])

                loss = parts.loss
                extra = self._intervention_loss(rollout_data, parts.features, parts.loss)
                if extra is not None:
                    loss = loss + extra

                # Approximate reverse KL for early stopping (SB3 GH issue #417)
                with th.no_grad():
                    log_ratio = parts.log_prob - rollout_data.old_log_prob
                    approx_kl_div = th.mean((th.exp(log_ratio) - 1) - log_ratio).cpu().numpy()
                    approx_kl_divs.append(approx_kl_div)

                if self.target_kl is not None and approx_kl_div > 1.5 * self.target_kl:
                    continue_training = False
                    if self.verbose >= 1:
                        print(f"Early stopping at step {epoch} due to reaching max kl: {approx_kl_div:.2f}")
                    break

                self._optimizer_step(loss)

            self._n_updates += 1
            if not continue_training:
                break
        self._check_grad_norms()

        explained_var = explained_variance(self.rollout_buffer.values.flatten(), self.rollout_buffer.returns.flatten())

        self.logger.record("train/entropy_loss", np.mean(entropy_losses))
        self.logger.record("train/policy_gradient_loss", np.mean(pg_losses))
        self.logger.record("train/value_loss", np.mean(value_losses))
        self.logger.record("train/approx_kl", np.mean(approx_kl_divs))
        self.logger.record("train/clip_fraction", np.mean(clip_fractions))
        self.logger.record("train/loss", loss.item())
        self.logger.record("train/explained_variance", explained_var)
        if hasattr(self.policy, "log_std"):
            self.logger.record("train/std", th.exp(self.policy.log_std).mean().item())

        self.logger.record("train/n_updates", self._n_updates, exclude="tensorboard")
        self.logger.record("train/clip_range", clip_range)
        if self.clip_range_vf is not None:
            self.logger.record("train/clip_range_vf", clip_range_vf)
        self._record_terms()
