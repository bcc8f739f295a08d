"""What PlasticDQN and PlasticPPO share: the intervention list, its hooks and task-switch detection."""

from __future__ import annotations

import math
from abc import abstractmethod
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch as th
from torch import nn

from agents.hooks import GramInputs, Intervention, TaskSwitch


class NonFiniteError(RuntimeError):
    """A non-finite loss, loss term, gradient, parameter or probe value: training cannot go on.

    :param term: what was non-finite, as logged: ``train/loss``, ``interventions/<name>/<term>``,
        ``train/grad_norm``, ``parameters/<name>`` or ``plasticity/<probe>@<source>``.
    :param value: the value (``nan``, ``inf`` or ``-inf``).
    :param env_step: the agent's ``num_timesteps`` when it was found.
    :param gradient_step: the gradient step it belongs to (counted from 1), if any.
    """

    def __init__(self, term: str, value: float, env_step: int, gradient_step: int | None = None) -> None:
        self.term, self.value, self.env_step, self.gradient_step = term, value, env_step, gradient_step
        where = f"env step {env_step}" + (f" (gradient step {gradient_step})" if gradient_step is not None else "")
        super().__init__(f"non-finite {term} = {value} at {where}")


def _scalar(name: str, key: str, term: th.Tensor) -> float:
    """The value of an intervention's scalar tensor ``name/key``; a clear error if it is not a scalar."""
    if term.dim() != 0:
        raise ValueError(f"term {name}/{key} must be a scalar, got shape {tuple(term.shape)}")
    return term.item()


class PlasticMixin:
    """Mixed in before an SB3 algorithm class. It adds, and only adds, the hook calls.

    With an empty intervention list every computation is the parent's, so parameters match stock SB3
    bit for bit (see ``tests/test_agents.py``).
    """

    interventions: list[Intervention]
    #: Optimizer steps taken so far. Unlike SB3's ``_n_updates`` (epochs for PPO), this counts every step.
    num_gradient_steps: int
    #: Total gradient norm of the last step before clipping (what ``clip_grad_norm_`` returns).
    last_grad_norm: th.Tensor | None

    def _init_plastic(self, interventions: Sequence[Intervention] | None) -> None:
        interventions = list(interventions or [])
        for iv in interventions:
            if not isinstance(iv, Intervention):
                raise TypeError(f"interventions must be Intervention instances, got {type(iv).__name__}")
        self.interventions = interventions
        self.num_gradient_steps = 0
        self.last_grad_norm = None
        self._term_logs: dict[str, list[float]] = defaultdict(list)
        # (gradient step, its pre-clipping gradient norm) of the current train() call, checked at its end.
        self._grad_norms: list[tuple[int, th.Tensor]] = []

    def _setup_model(self) -> None:
        super()._setup_model()  # type: ignore[misc]
        for iv in self.interventions:
            iv.attach(self)  # type: ignore[arg-type]

    def _excluded_save_params(self) -> list[str]:
        # Interventions carry their own state_dict(); the SB3 zip holds the algorithm only.
        return super()._excluded_save_params() + ["interventions", "_term_logs", "_grad_norms"]  # type: ignore[misc]

    # -- accessors the interventions and the monitor use ------------------------------------------
    # SB3's BaseAlgorithm is an ABC, so these stay abstract until each algorithm defines them.
    @property
    @abstractmethod
    def value_head(self) -> nn.Linear:
        """The last linear layer of the value estimate (DQN's Q head, PPO's value head)."""

    @abstractmethod
    def value_features(self, obs: th.Tensor) -> th.Tensor:
        """The input of :attr:`value_head` for a batch of observations (as the buffers store them)."""

    @abstractmethod
    def online_network(self) -> nn.Module:
        """The network trained by the optimizer (DQN: the online Q-network; PPO: the actor-critic policy)."""

    @abstractmethod
    def head_layers(self) -> list[nn.Module]:
        """The trainable output layers (DQN: the Q head; PPO: the action and value heads)."""

    @abstractmethod
    def mlp_heads(self) -> dict[str, nn.Module]:
        """Each head after the shared encoder as one module, from the encoder's output to the head's output
        (DQN: ``q_net.q_net``; PPO: each MLP of ``mlp_extractor`` and its output layer), by name."""

    @abstractmethod
    def set_mlp_head(self, name: str, module: nn.Module) -> None:
        """Make ``module`` the head ``name`` of :meth:`mlp_heads` in the online network."""

    @abstractmethod
    def init_layer(self, layer: nn.Module) -> None:
        """Re-initialise ``layer`` in place with the initialiser the algorithm built it with."""

    #: The config's name of the algorithm (``"dqn"``, ``"ppo"``), for published per-algorithm defaults.
    algo_name: ClassVar[str]
    #: Whether the agent trains on a replay buffer of transitions collected one env step at a time (DQN) rather
    #: than on epochs over a rollout (PPO): it has ``replay_buffer`` and :meth:`sample_replay_observations`, its
    #: batches are SB3's ``ReplayBufferSamples``, and it calls ``on_epoch_start`` never.
    uses_replay: ClassVar[bool]

    @abstractmethod
    def sample_batch(self, batch_size: int) -> NamedTuple:
        """A fresh batch of the type :meth:`training_loss` takes, drawn from the agent's buffer with NumPy's global
        RNG as SB3's own sampling does (DQN: the replay buffer, with replacement; PPO: the current rollout)."""

    @abstractmethod
    def value_model(self) -> nn.Module:
        """A deep-copyable module mapping observations to the value estimate (DQN: the Q-network; PPO: the critic
        path), for the trainability probe, which copies and fits it."""

    @abstractmethod
    def nc_classes(self, obs: th.Tensor, features: th.Tensor) -> tuple[th.Tensor, th.Tensor | None]:
        """Neural-collapse classes of ``obs``, shape ``(batch_size,)``, and the classifier weights if the value head
        is one (DQN: the greedy action, with the Q head as classifier; PPO: the actor's mode, ``None``).

        :param features: :meth:`value_features` of ``obs``.
        """

    @abstractmethod
    def gram_inputs(self, batch: NamedTuple) -> GramInputs:
        """What the Gram (empirical NTK) probe differentiates on ``batch``: see :class:`agents.hooks.GramInputs`."""

    @abstractmethod
    def forward_all(self, batch: NamedTuple) -> None:
        """Run every branch of :meth:`online_network` on ``batch.observations`` through its own modules (each
        head's layers called as modules, in order), outputs discarded; for forward-hook traces."""

    @abstractmethod
    def hidden_forward(self, obs: th.Tensor) -> None:
        """Run every hidden layer of :meth:`online_network` once on ``obs`` (output layers skipped: they have no
        activation), outputs discarded; for forward-hook records."""

    def sample_replay_observations(self, batch_size: int, rng: np.random.Generator) -> th.Tensor:
        """Observations drawn from the replay buffer; only an agent that :attr:`uses_replay` has one."""
        raise TypeError(f"{type(self).__name__} has no replay buffer (uses_replay is False)")

    @property
    def optimizer(self) -> th.optim.Optimizer:
        """The optimizer of the online network (SB3's ``policy.optimizer``)."""
        return self.policy.optimizer  # type: ignore[attr-defined]

    def parametrized_layers(self) -> list[tuple[str, nn.Module]]:
        """Every ``nn.Linear`` and ``nn.Conv2d`` of :meth:`online_network`, by module path, input to output."""
        return [(name, m) for name, m in self.online_network().named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]

    def sync_target(self, layers: Sequence[nn.Module]) -> None:
        """Copy ``layers`` of the online network into the target network, where there is one (DQN)."""

    # -- hook calls -------------------------------------------------------------------------------
    def _intervention_loss(self, batch: NamedTuple, features: th.Tensor, loss: th.Tensor) -> th.Tensor | None:
        """Sum of every intervention's loss terms for this batch, or ``None`` if there are none."""
        total: th.Tensor | None = None
        for iv in self.interventions:
            for key, term in iv.loss_terms(self, batch, features, loss).items():  # type: ignore[arg-type]
                self._log_term(iv.name, key, term)
                total = term if total is None else total + term
        return total

    def _gradient_terms(self) -> None:
        """Let every intervention add its closed-form penalty gradients to ``.grad`` (after backward, before
        clipping), and log the values it returns."""
        for iv in self.interventions:
            for key, term in iv.gradient_terms(self).items():  # type: ignore[arg-type]
                self._log_term(iv.name, key, term)

    def _log_term(self, name: str, key: str, term: th.Tensor) -> None:
        """Check that ``term`` is a finite scalar and keep its value for the logs."""
        value = _scalar(name, key, term)
        self._check_finite(f"interventions/{name}/{key}", value)
        self._term_logs[f"{name}/{key}"].append(value)

    def record_logged_values(self) -> None:
        """Record every intervention's :meth:`~agents.hooks.Intervention.logged_values` in the logger.

        Called right before each dump: by :meth:`dump_logs` and by the callbacks that dump the logger
        themselves (the monitor, the task logger). Nothing is recorded before the first gradient step.

        :raises NonFiniteError: if a value is not finite.
        """
        if self.num_gradient_steps == 0:
            return
        for iv in self.interventions:
            for key, term in iv.logged_values(self).items():  # type: ignore[arg-type]
                value = _scalar(iv.name, key, term)
                tag = f"{iv.name}/{key}"
                if not math.isfinite(value):
                    step = int(self.num_timesteps)  # type: ignore[attr-defined]
                    raise NonFiniteError(f"interventions/{tag}", value, step, self.num_gradient_steps)
                self.logger.record(f"train/{tag}", value)  # type: ignore[attr-defined]
                self.logger.record(f"interventions/{tag}", value)  # type: ignore[attr-defined]

    def dump_logs(self, *args: Any, **kwargs: Any) -> None:
        """SB3's ``dump_logs``, with the interventions' :meth:`record_logged_values` first."""
        self.record_logged_values()
        super().dump_logs(*args, **kwargs)  # type: ignore[misc]

    def _before_epoch(self, epoch: int) -> None:
        for iv in self.interventions:
            iv.on_epoch_start(self, epoch)  # type: ignore[arg-type]

    def _optimizer_step(
        self,
        loss: th.Tensor,
        clip: Callable[[], th.Tensor] | None = None,
        backward: Callable[[], None] | None = None,
        step: Callable[[], None] | None = None,
    ) -> None:
        """One gradient step on ``loss`` as SB3's ``train`` makes it, with the interventions' hooks in place.

        ``zero_grad``, ``backward``, the interventions' gradient terms (:meth:`_gradient_terms`), clipping to
        ``max_grad_norm``, the optimizer's ``step``, then :meth:`_after_gradient_step`. Shared by DQN's and PPO's
        ``train`` and DQN's fast path, so the order of these cannot differ between them.

        :param loss: the scalar loss, already with the interventions' loss terms.
        :param clip: clips the gradients in place and returns their total norm before clipping; default
            ``torch.nn.utils.clip_grad_norm_`` over ``policy.parameters()``, as SB3.
        :param backward: writes the gradients of ``loss`` into ``.grad``, replacing any previous value; default
            ``optimizer.zero_grad()`` then ``loss.backward()``, as SB3 (the fast path's explicit networks pass
            their own).
        :param step: the optimizer's step; default ``optimizer.step()``.
        """
        optimizer = self.policy.optimizer  # type: ignore[attr-defined]
        if backward is None:
            optimizer.zero_grad()
            loss.backward()
        else:
            backward()
        self._gradient_terms()
        if clip is None:
            norm = th.nn.utils.clip_grad_norm_(self.policy.parameters(), self.max_grad_norm)  # type: ignore[attr-defined]
        else:
            norm = clip()
        self.last_grad_norm = norm
        if step is None:
            optimizer.step()
        else:
            step()
        self._after_gradient_step()

    def _after_gradient_step(self) -> None:
        self.num_gradient_steps += 1
        if self.last_grad_norm is not None:
            self._grad_norms.append((self.num_gradient_steps, self.last_grad_norm))
        for iv in self.interventions:
            iv.on_update(self, self.num_gradient_steps)  # type: ignore[arg-type]

    # -- NaN guard --------------------------------------------------------------------------------
    # Losses and loss terms are checked on the Python floats train() reads with .item() anyway; the gradient
    # norms (non-finite iff a gradient is) stay tensors until the end of each train() call, so the guard adds
    # no device sync per gradient step (one per train() call, and none on CPU where it is free).
    def _check_finite(self, term: str, value: float) -> None:
        """Raise :class:`NonFiniteError` if ``value`` (a loss or a loss term of the step in progress) is not finite."""
        if not math.isfinite(value):
            # A non-finite gradient earlier in this train() call poisons the parameters, and so every loss
            # after it: name the first cause.
            self._check_grad_norms()
            step = int(self.num_timesteps)  # type: ignore[attr-defined]
            raise NonFiniteError(term, value, step, self.num_gradient_steps + 1)

    def _check_grad_norms(self) -> None:
        """Raise :class:`NonFiniteError` for the first non-finite gradient norm of this train() call."""
        norms, self._grad_norms = self._grad_norms, []
        if not norms:
            return
        # One transfer of all of them (a single .item() for DQN's one step per call).
        values = [norms[0][1].item()] if len(norms) == 1 else th.stack([n.detach().float() for _, n in norms]).tolist()
        if all(math.isfinite(v) for v in values):
            return
        for (step, _), value in zip(norms, values):
            if not math.isfinite(value):
                env_step = int(self.num_timesteps)  # type: ignore[attr-defined]
                raise NonFiniteError("train/grad_norm", value, env_step, step)

    def _record_terms(self) -> None:
        # Each term shows with the losses (train/) and with what its intervention did (interventions/).
        for key, values in self._term_logs.items():
            mean = float(np.mean(values))
            self.logger.record(f"train/{key}", mean)  # type: ignore[attr-defined]
            self.logger.record(f"interventions/{key}", mean)  # type: ignore[attr-defined]
        self._term_logs.clear()

    def _update_info_buffer(self, infos: list[dict[str, Any]], dones: np.ndarray | None = None) -> None:
        # SB3 calls this after every env step, before storing or training on the transition.
        super()._update_info_buffer(infos, dones)  # type: ignore[misc]
        switch = None
        for info in infos:
            if info.get("task_switch"):
                # All parallel copies switch on the same step: notify once.
                switch = TaskSwitch(
                    num_timesteps=int(self.num_timesteps),  # type: ignore[attr-defined]
                    from_task=int(info["task_id"]),
                    to_task=int(info["next_task_id"]),
                    from_name=str(info.get("task_name", "")),
                )
                for iv in self.interventions:
                    iv.on_task_switch(self, switch)  # type: ignore[arg-type]
                break
        self._after_env_step(len(infos), switch)

    def _after_env_step(self, n_steps: int, switch: TaskSwitch | None) -> None:
        """Called after every vec-env step of ``n_steps`` env steps (one per copy); ``switch`` if it ended a task.

        Nothing by default; the algorithms count their per-visit schedules here.
        """
