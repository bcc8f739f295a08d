"""SB3 agents with plasticity hooks: :class:`PlasticDQN` and :class:`PlasticPPO`.

They behave exactly like stock SB3 ``DQN`` and ``PPO`` when no intervention is given, expose the
value-head features, and call the hooks of :mod:`agents.hooks` from inside ``train()``.
"""

from agents.dqn import PlasticDQN
from agents.hooks import Intervention, TaskSwitch
from agents.networks import (
    POLICIES,
    CReLU,
    MinAtarCNN,
    PlasticActorCriticPolicy,
    PlasticDQNPolicy,
    minatar_policy_kwargs,
    mlp_policy_kwargs,
)
from agents.ppo import PlasticPPO

#: Agent name (as used in configs) -> class.
AGENTS = {"dqn": PlasticDQN, "ppo": PlasticPPO}

__all__ = [
    "AGENTS",
    "POLICIES",
    "CReLU",
    "Intervention",
    "MinAtarCNN",
    "PlasticActorCriticPolicy",
    "PlasticDQN",
    "PlasticDQNPolicy",
    "PlasticPPO",
    "TaskSwitch",
    "minatar_policy_kwargs",
    "mlp_policy_kwargs",
]
