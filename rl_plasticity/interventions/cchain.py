"""Churn reduction (``cchain``), Tang & Berseth 2025 (C-CHAIN)."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch as th
from pydantic import Field
from torch.nn import functional as F

from agents.hooks import PlasticAgent
from rl_plasticity.interventions.base import Params, PlasticityIntervention
from rl_plasticity.interventions.registry import register

#: Added to the running churn loss in the automatic coefficient's denominator, as the code does.
COEF_EPS = 1e-8
#: Mixed with the agent's seed to seed the reference batches' own generator (any fixed value would do).
RNG_SALT = 0xC4A1


class CChainParams(Params):
    """Parameters of :class:`CChain`. Defaults: ``bluecontra/C-CHAIN``, ``crl_minatar`` (Double DQN)."""

    coef: float | None = Field(
        None, ge=0, description="Fixed coefficient of the churn term; None = automatic (target_rel_loss_scale)."
    )
    target_rel_loss_scale: float = Field(
        0.01, ge=0, description="Automatic coefficient: the churn term is kept at this fraction of the TD loss."
    )
    init_coef: float = Field(50.0, ge=0, description="Automatic coefficient: its value up to update auto_after.")
    auto_after: int = Field(
        10_000, ge=1, description="Automatic coefficient: recomputed after every update from this one (counted from 1)."
    )
    window: int = Field(50_000, gt=0, description="Automatic coefficient: running means over the last `window` values.")
    ref_batch_size: int | None = Field(
        None, gt=0, description="Reference batch size; None = the agent's batch_size (the code uses its own, 32)."
    )


class WindowMean:
    """Mean of the last ``window`` values pushed, in O(1) per push (float64 ring buffer and running sum).

    The running sum is recomputed from the ring each time it wraps, so rounding cannot build up.
    """

    def __init__(self, window: int) -> None:
        self.values = np.zeros(window, dtype=np.float64)
        self.count = 0  # values pushed so far (the ring holds min(count, window) of them)
        self.total = 0.0

    def push(self, value: float) -> None:
        pos = self.count % len(self.values)
        self.total += value - self.values[pos]
        self.values[pos] = value
        self.count += 1
        if pos == len(self.values) - 1:
            self.total = float(self.values.sum())

    def __len__(self) -> int:
        return min(self.count, len(self.values))

    def mean(self) -> float:
        """The mean of the values in the window (NaN when empty)."""
        return self.total / len(self) if len(self) else float("nan")

    def state_dict(self) -> dict[str, Any]:
        return {"values": self.values.copy(), "count": self.count, "total": self.total}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["values"]) != len(self.values):
            raise ValueError(f"cchain: a window of {len(state['values'])} saved, the config has {len(self.values)}")
        self.values = np.array(state["values"], dtype=np.float64)
        self.count, self.total = int(state["count"]), float(state["total"])


@register("cchain", algos=("dqn",), why_not="the code defines it for Double DQN on replay data (its PPO form differs)")
class CChain(PlasticityIntervention):
    """C-CHAIN: penalise the change of the Q-values on a reference replay batch since the previous update.

    Tang & Berseth 2025, "Mitigating Plasticity Loss in Continual Reinforcement Learning by Reducing Churn"
    (ICML). Code: repository ``bluecontra/C-CHAIN``, ``crl_minatar/agents/double_dqn_c_chain.py`` (class
    ``DoubleDQN_CCHAIN``, cited below as ``agent:<line>``) run by ``crl_minatar/crl_run_double_dqn_c_chain.py``
    (``run``). At gradient update ``k`` (parameters ``theta_{k-1}`` before it), the loss becomes::

        L_TD + c_k * mean_{s in B_ref, a} (Q_theta(s, a) - Q_{theta_{k-2}}(s, a))^2

    * **Reference network**: the network before the previous update, ``theta_{k-2}``. The code keeps a
      copy of the network after each update (agent:191) and regularises towards ``his_qf_list[-2]``
      (``reg_his_idx = 2``, agent:60, 150), the copy before the last update; there is no term at the first
      update, when no such copy exists (agent:144-145).
    * **Churn loss**: ``F.mse_loss`` of the current network's outputs for **all actions** (with gradient)
      against the reference network's (without), the mean over batch x actions (agent:151-155). The TD
      loss's own batch is not involved.
    * **Reference batch**: a second replay batch of the training batch's size, drawn uniformly without
      replacement, independently of the training batch (agent:147; ``random.sample`` in
      ``crl_minatar/agents/agent_utils.py``); the code's batch size is 32 (agent:57, ``run``).
    * **Coefficient**: the term is ``c * churn`` added to the TD loss (agent:157). ``c = 50`` (agent:82) until
      update 10000; from then on, after each update ``c = target_rel_loss_scale * mean|L_TD| / (mean churn +
      1e-8)`` over the last 50000 updates' TD losses and churn losses, each its own window (agent:180-188),
      used from the next update; ``target_rel_loss_scale = 0.01`` (agent:60, ``run``'s
      ``--target_rel_loss_scale``). ``coef`` set to a number fixes ``c`` instead (the code has no such mode).
      The updates are counted as ``agent.num_gradient_steps``, over the whole run, across task switches, as
      the code's ``update_cnt`` (agent:164), which its runner never resets.

    How this version computes it, and where it differs from the code:

    * The reference outputs ``Q_{theta_{k-2}}(B_ref)`` are computed at update ``k-1``, on the live network
      right before its step (no gradient), for a reference batch drawn then; update ``k`` evaluates the
      current network on the same batch. That is the same term without keeping a copy of the network. The
      difference: the batch is drawn from the buffer as it is one update earlier, so the transition(s)
      stored in between cannot be in it.
    * The reference batch has its own generator (``numpy.random.Generator``, seeded from the agent's seed),
      through :meth:`agents.hooks.PlasticAgent.sample_replay_observations`. The code draws it from the RNG of the
      training batches, so that there a run's training batches depend on whether C-CHAIN is on; here they
      do not (with ``coef = 0`` training is bit for bit that of no intervention; tested).
    * ``L_TD`` in the coefficient is the agent's own loss (Huber for SB3's DQN unless the config picks MSE;
      the code's is MSE, agent:141), the loss before any intervention's term.
    * Anything that changes the network between two updates (another intervention's reset, a layer added
      at a task switch) counts as churn at the next update, and the term pulls it back, as a copy of the
      network taken before the previous update would; C-CHAIN alone never does this.
    * The term's gradient is added to the parameters' ``.grad`` in :meth:`gradient_terms` (its own
      ``backward()``, after the TD loss's and before clipping), which equals adding the term to the loss up
      to float rounding. Doing it there puts the churn forward pass after every intervention's
      ``loss_terms``, so an intervention that records the training forward pass by forward hooks
      (``kfac_rank``) sees only that one, in any order of the list (tested).

    DQN only (the code's PPO versions regularise other outputs with other settings). Logged under
    ``interventions/cchain/`` and ``train/cchain/``: ``churn_term`` (``c * churn``, the loss term),
    ``churn`` (the unscaled churn, mean over the updates since the last dump) and ``coef`` (``c`` for the
    next update).
    """

    Params = CChainParams
    params: CChainParams

    def __init__(self, params: CChainParams | None = None) -> None:
        super().__init__(params)
        p = self.params
        self.coef = p.coef if p.coef is not None else p.init_coef
        self.td_losses = WindowMean(p.window)
        self.churns = WindowMean(p.window)
        self._rng: np.random.Generator | None = None
        # The next update's reference batch and the outputs of the network before this update on it.
        self._reference: tuple[th.Tensor, th.Tensor] | None = None
        # Churn values since the last dump (sum, count), for the logged mean.
        self._since_dump = (0.0, 0)
        self._td_loss = float("nan")  # this update's TD loss, from loss_terms

    def attach(self, agent: PlasticAgent) -> None:
        if not agent.uses_replay:
            raise ValueError(f"cchain supports DQN only (a replay buffer and Q-values), got {type(agent).__name__}")
        if self._rng is None:  # not after load_state_dict
            seed = agent.seed
            self._rng = np.random.default_rng(None if seed is None else [int(seed), RNG_SALT])

    def loss_terms(
        self, agent: PlasticAgent, batch: NamedTuple, features: th.Tensor, loss: th.Tensor
    ) -> dict[str, th.Tensor]:
        # Only the TD loss, for the coefficient; the churn term's gradient is added in gradient_terms.
        self._td_loss = loss.item()
        return {}

    def gradient_terms(self, agent: PlasticAgent) -> dict[str, th.Tensor]:
        if self._rng is None:
            raise RuntimeError("cchain: gradient_terms() before attach()")
        network = agent.online_network()
        values: dict[str, th.Tensor] = {}
        churn_value = None
        if self._reference is not None:
            ref_obs, ref_q = (t.to(agent.device) for t in self._reference)
            with th.enable_grad():
                churn = F.mse_loss(network(ref_obs), ref_q)
                term = self.coef * churn
            term.backward()  # accumulates into each parameter's .grad, as if the term were part of the loss
            values["churn_term"] = term.detach()
            churn_value = churn.item()
        # The next update's reference: a batch drawn now and the outputs of the network as it is before this update.
        ref_obs = agent.sample_replay_observations(self.params.ref_batch_size or agent.batch_size, self._rng)
        with th.no_grad():
            self._reference = (ref_obs, network(ref_obs))
        self._track(agent.num_gradient_steps + 1, self._td_loss, churn_value)
        return values

    def _track(self, update: int, td_loss: float, churn: float | None) -> None:
        """Record update ``update``'s TD and churn losses; from update ``auto_after`` on, recompute ``coef``."""
        self.td_losses.push(abs(td_loss))
        if churn is not None:
            self.churns.push(churn)
            total, n = self._since_dump
            self._since_dump = (total + churn, n + 1)
        if self.params.coef is None and update >= self.params.auto_after and len(self.churns):
            self.coef = self.params.target_rel_loss_scale * self.td_losses.mean() / (self.churns.mean() + COEF_EPS)

    def logged_values(self, agent: PlasticAgent) -> dict[str, th.Tensor]:
        values = {"coef": th.tensor(self.coef, dtype=th.float64)}
        total, n = self._since_dump
        if n:
            values["churn"] = th.tensor(total / n, dtype=th.float64)
            self._since_dump = (0.0, 0)
        return values

    def state_dict(self) -> dict[str, Any]:
        reference = None if self._reference is None else tuple(t.detach().cpu().clone() for t in self._reference)
        return {
            **super().state_dict(),
            "coef": self.coef,
            "td_losses": self.td_losses.state_dict(),
            "churns": self.churns.state_dict(),
            "rng": None if self._rng is None else self._rng.bit_generator.state,
            "reference": reference,
            "since_dump": self._since_dump,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.coef = float(state["coef"])
        self.td_losses.load_state_dict(state["td_losses"])
        self.churns.load_state_dict(state["churns"])
        if state["rng"] is not None:
            self._rng = np.random.default_rng()
            self._rng.bit_generator.state = state["rng"]
        self._reference = None if state["reference"] is None else tuple(t.clone() for t in state["reference"])
        total, n = state["since_dump"]
        self._since_dump = (float(total), int(n))
