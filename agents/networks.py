"""The networks: the MinAtar CNN (Young & Tian, 2019), SB3 ``policy_kwargs`` for it and for the MLP, and
the two architecture options of the study, LayerNorm and CReLU.

The options are built into the network, so they need policies that build it:
:class:`PlasticDQNPolicy` and :class:`PlasticActorCriticPolicy` (``POLICIES[algo]``). They take SB3's
``net_arch`` and ``activation_fn`` plus ``layer_norm``, and with ``layer_norm=False`` and a ReLU or tanh
activation they build SB3's own networks module for module, drawing the same initial weights for the same
seed. Everything else keeps its SB3 meaning: DQN's ``q_net.q_net`` is an ``nn.Sequential`` ending in the
Q head, PPO's ``mlp_extractor`` has ``policy_net``, ``value_net``, ``forward_actor`` and ``forward_critic``.

- **layer_norm** (Lyle et al., 2024, "Disentangling the Causes of Plasticity Loss in Neural Networks"):
  ``nn.LayerNorm`` on the pre-activations of each hidden linear layer, i.e. ``Linear -> LayerNorm ->
  activation``, where it counters the drift of the pre-activation distribution. Not after the heads, and
  not in the conv torso (the option is about linear layers). LayerNorm keeps PyTorch's initialisation
  (scale 1, offset 0); SB3's orthogonal initialisation (PPO) touches ``Linear`` and ``Conv2d`` only.
- **crelu** (Abbas et al., 2023, "Loss of Plasticity in Continual Deep Reinforcement Learning"):
  ``activation_fn=CReLU``, which outputs ``cat(relu(x), relu(-x))`` and so doubles the width. The width
  is kept by halving units: a hidden layer of ``width`` has ``width // 2`` linear units (conv: ``channels
  // 2`` filters), their CReLU gives ``width`` features, and the next layer, the head included, sees
  ``width`` inputs as without CReLU. The value-head features keep their size and the hidden layers have
  about half the weights.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import gymnasium as gym
import torch as th
from gymnasium import spaces
from stable_baselines3.common.policies import ActorCriticPolicy, BasePolicy
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor, MlpExtractor
from stable_baselines3.common.utils import get_device
from stable_baselines3.dqn.policies import DQNPolicy, QNetwork
from torch import nn
from torch.nn import functional as F


class CReLU(nn.Module):
    """Concatenated ReLU (Shang et al., 2016; for plasticity, Abbas et al., 2023): ``cat(relu(x), relu(-x))``.

    Output ``i`` is ``relu(x_i)`` and output ``i + d`` is ``relu(-x_i)``, so the output has twice the
    features (or channels) of the input, and each input unit is active on one side unless it is exactly 0.

    :param dim: the feature (or channel) dimension; 1 for SB3's batch-first tensors.
    """

    #: Output features per input feature. Network builders divide a layer's units by it to keep its width.
    expansion: ClassVar[int] = 2

    def __init__(self, dim: int = 1) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, x: th.Tensor) -> th.Tensor:
        return th.cat([F.relu(x), F.relu(-x)], dim=self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


def hidden_units(width: int, activation_fn: type[nn.Module]) -> int:
    """Linear units (or conv filters) of a hidden layer whose activation output has ``width`` features.

    ``width`` for elementwise activations; ``width // 2`` for :class:`CReLU`, which doubles them back.

    :raises ValueError: if CReLU cannot keep ``width`` (an odd width).
    """
    expansion = getattr(activation_fn, "expansion", 1)
    if width % expansion:
        raise ValueError(
            f"{activation_fn.__name__} keeps the width by halving units, so it needs an even width, got {width}"
        )
    return width // expansion


def build_mlp(
    input_dim: int,
    output_dim: int,
    net_arch: list[int],
    activation_fn: type[nn.Module] = nn.ReLU,
    layer_norm: bool = False,
) -> list[nn.Module]:
    """SB3's :func:`~stable_baselines3.common.torch_layers.create_mlp`, with the architecture options.

    Each hidden layer is ``Linear -> [LayerNorm] -> activation`` with ``net_arch[i]`` output features (see
    :func:`hidden_units` for CReLU), then a plain ``Linear`` to ``output_dim`` if it is positive. Without
    the options it builds SB3's modules in SB3's order, so the same seed gives the same weights.

    :param input_dim: features entering the first layer.
    :param output_dim: outputs of the final linear layer; 0 for no final layer.
    :param net_arch: features after each hidden layer.
    :param activation_fn: the activation class, e.g. ``nn.ReLU``, ``nn.Tanh`` or :class:`CReLU`.
    :param layer_norm: put ``nn.LayerNorm`` between each hidden linear layer and its activation.
    """
    modules: list[nn.Module] = []
    last_dim = input_dim
    for width in net_arch:
        units = hidden_units(width, activation_fn)
        modules.append(nn.Linear(last_dim, units))
        if layer_norm:
            modules.append(nn.LayerNorm(units))
        modules.append(activation_fn())
        last_dim = width
    if output_dim > 0:
        modules.append(nn.Linear(last_dim, output_dim))
    return modules


class MinAtarCNN(BaseFeaturesExtractor):
    """``Conv2d(C -> channels, k x k, stride 1) -> ReLU -> flatten``, the MinAtar torso.

    With the defaults on a 10x10 MinAtar observation the output has 16 * 8 * 8 = 1024 features. The
    hidden layer(s) and the head are SB3's ``net_arch``: ``[128]`` gives the published network
    ``Linear(1024 -> 128) -> ReLU -> Linear(128 -> actions)``.

    With ``crelu`` the convolution has ``channels // 2`` filters followed by :class:`CReLU`, so the torso
    still outputs ``channels`` maps (the same number of features). It has no normalisation layer: the
    ``layer_norm`` option is about the hidden linear layers.

    :param observation_space: a channel-first ``Box`` of shape ``(C, H, W)``.
    :param channels: output channels of the torso (16 in the paper).
    :param kernel_size: size of the square kernel (3 in the paper).
    :param crelu: CReLU instead of ReLU, keeping ``channels`` by halving the filters (must be even).
    """

    def __init__(
        self, observation_space: gym.spaces.Box, channels: int = 16, kernel_size: int = 3, crelu: bool = False
    ) -> None:
        if len(observation_space.shape) != 3:
            raise ValueError(f"MinAtarCNN needs (C, H, W) observations, got shape {observation_space.shape}")
        in_channels, height, width = observation_space.shape
        out_h, out_w = height - kernel_size + 1, width - kernel_size + 1
        super().__init__(observation_space, features_dim=channels * out_h * out_w)
        activation_fn: type[nn.Module] = CReLU if crelu else nn.ReLU
        filters = hidden_units(channels, activation_fn)
        self.cnn = nn.Sequential(nn.Conv2d(in_channels, filters, kernel_size, stride=1), activation_fn(), nn.Flatten())

    def forward(self, observations: th.Tensor) -> th.Tensor:
        return self.cnn(observations)


class PlasticQNetwork(QNetwork):
    """SB3's :class:`~stable_baselines3.dqn.policies.QNetwork`, its MLP built by :func:`build_mlp`.

    ``q_net`` is ``nn.Sequential(hidden layers..., Linear head)``, as in SB3.

    :param layer_norm: LayerNorm after each hidden linear layer, before its activation.
    """

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Discrete,
        features_extractor: BaseFeaturesExtractor,
        features_dim: int,
        net_arch: list[int] | None = None,
        activation_fn: type[nn.Module] = nn.ReLU,
        normalize_images: bool = True,
        layer_norm: bool = False,
    ) -> None:
        # Not QNetwork.__init__: it would first build SB3's MLP, drawing initial weights from the RNG.
        BasePolicy.__init__(
            self,
            observation_space,
            action_space,
            features_extractor=features_extractor,
            normalize_images=normalize_images,
        )
        self.net_arch = [64, 64] if net_arch is None else net_arch
        self.activation_fn = activation_fn
        self.layer_norm = layer_norm
        self.features_dim = features_dim
        action_dim = int(self.action_space.n)
        self.q_net = nn.Sequential(*build_mlp(features_dim, action_dim, self.net_arch, activation_fn, layer_norm))

    def _get_constructor_parameters(self) -> dict[str, Any]:
        return {**super()._get_constructor_parameters(), "layer_norm": self.layer_norm}


class PlasticDQNPolicy(DQNPolicy):
    """SB3's DQN ``MlpPolicy`` whose Q-networks are :class:`PlasticQNetwork` (LayerNorm and CReLU options).

    Takes every argument of :class:`~stable_baselines3.dqn.policies.DQNPolicy`, plus:

    :param layer_norm: LayerNorm after each hidden linear layer, before its activation. CReLU is chosen
        with ``activation_fn=CReLU``.
    """

    def __init__(self, *args: Any, layer_norm: bool = False, **kwargs: Any) -> None:
        self.layer_norm = layer_norm  # read by make_q_net, which the parent's __init__ calls
        super().__init__(*args, **kwargs)

    def make_q_net(self) -> PlasticQNetwork:
        # Separate features extractors for the online and target networks, as in SB3.
        net_args = self._update_features_extractor(self.net_args, features_extractor=None)
        return PlasticQNetwork(**net_args, layer_norm=self.layer_norm).to(self.device)

    def _get_constructor_parameters(self) -> dict[str, Any]:
        return {**super()._get_constructor_parameters(), "layer_norm": self.layer_norm}


class PlasticMlpExtractor(MlpExtractor):
    """SB3's :class:`~stable_baselines3.common.torch_layers.MlpExtractor` (separate actor and critic MLPs),
    built by :func:`build_mlp`.

    :param layer_norm: LayerNorm after each hidden linear layer, before its activation.
    """

    def __init__(
        self,
        feature_dim: int,
        net_arch: list[int] | dict[str, list[int]],
        activation_fn: type[nn.Module],
        device: th.device | str = "auto",
        layer_norm: bool = False,
    ) -> None:
        # The parent with no layers sets up the interface (forward, forward_actor, forward_critic).
        super().__init__(feature_dim, net_arch=[], activation_fn=activation_fn, device=device)
        if isinstance(net_arch, dict):
            pi_dims, vf_dims = net_arch.get("pi", []), net_arch.get("vf", [])
        else:
            pi_dims = vf_dims = net_arch
        # Actor first, then critic: SB3's order, hence SB3's initial weights for the same seed.
        device = get_device(device)
        self.policy_net = nn.Sequential(*build_mlp(feature_dim, 0, pi_dims, activation_fn, layer_norm)).to(device)
        self.value_net = nn.Sequential(*build_mlp(feature_dim, 0, vf_dims, activation_fn, layer_norm)).to(device)
        self.latent_dim_pi = pi_dims[-1] if pi_dims else feature_dim
        self.latent_dim_vf = vf_dims[-1] if vf_dims else feature_dim


class PlasticActorCriticPolicy(ActorCriticPolicy):
    """SB3's PPO ``MlpPolicy`` whose actor and critic MLPs are a :class:`PlasticMlpExtractor`.

    Takes every argument of :class:`~stable_baselines3.common.policies.ActorCriticPolicy`, plus:

    :param layer_norm: LayerNorm after each hidden linear layer, before its activation. CReLU is chosen
        with ``activation_fn=CReLU``. SB3's orthogonal initialisation applies to every linear and conv
        layer as usual (gain sqrt(2) in the torso and MLPs); the LayerNorms keep scale 1 and offset 0.
    """

    def __init__(self, *args: Any, layer_norm: bool = False, **kwargs: Any) -> None:
        self.layer_norm = layer_norm  # read by _build_mlp_extractor, which the parent's __init__ calls
        super().__init__(*args, **kwargs)

    def _build_mlp_extractor(self) -> None:
        self.mlp_extractor = PlasticMlpExtractor(
            self.features_dim, self.net_arch, self.activation_fn, device=self.device, layer_norm=self.layer_norm
        )

    def _get_constructor_parameters(self) -> dict[str, Any]:
        return {**super()._get_constructor_parameters(), "layer_norm": self.layer_norm}


#: Agent name -> the policy that builds the configured network (pass it as the agent's ``policy``).
POLICIES: dict[str, type[BasePolicy]] = {"dqn": PlasticDQNPolicy, "ppo": PlasticActorCriticPolicy}


def _with_options(kwargs: dict[str, Any], activation_fn: type[nn.Module], layer_norm: bool) -> dict[str, Any]:
    # Without an option the kwargs are exactly SB3's, so they also suit SB3's own MlpPolicy; with one they
    # carry layer_norm, which only the POLICIES accept (SB3's policies reject it instead of mis-building).
    if layer_norm or issubclass(activation_fn, CReLU):
        kwargs["layer_norm"] = layer_norm
    return kwargs


def mlp_policy_kwargs(
    algo: str, width: int = 64, depth: int = 2, activation_fn: type[nn.Module] = nn.ReLU, layer_norm: bool = False
) -> dict[str, Any]:
    """SB3 ``policy_kwargs`` for an MLP with ``depth`` hidden layers of ``width`` features on flat observations.

    :param algo: ``"dqn"`` (one Q head) or ``"ppo"`` (separate actor and critic MLPs).
    :param activation_fn: ``nn.ReLU``, ``nn.Tanh`` or :class:`CReLU` (which halves the units, see above).
    :param layer_norm: LayerNorm after each hidden linear layer, before its activation.
    """
    hidden = [width] * depth
    net_arch: Any = hidden if algo == "dqn" else dict(pi=hidden, vf=list(hidden))
    return _with_options(dict(net_arch=net_arch, activation_fn=activation_fn), activation_fn, layer_norm)


def minatar_policy_kwargs(
    algo: str,
    width: int = 128,
    depth: int = 1,
    channels: int = 16,
    activation_fn: type[nn.Module] = nn.ReLU,
    layer_norm: bool = False,
) -> dict[str, Any]:
    """SB3 ``policy_kwargs`` for the MinAtar network with ``depth`` hidden layers of ``width`` units.

    :param algo: ``"dqn"`` (one Q head) or ``"ppo"`` (separate actor and critic MLPs on a shared torso).
    :param activation_fn: activation of the hidden layers. The conv torso uses ReLU, as in the paper,
        unless this is :class:`CReLU`, which then replaces it there too.
    :param layer_norm: LayerNorm after each hidden linear layer, before its activation (not in the torso).
    """
    hidden = [width] * depth
    net_arch: Any = hidden if algo == "dqn" else dict(pi=hidden, vf=list(hidden))
    torso: dict[str, Any] = dict(channels=channels)
    if issubclass(activation_fn, CReLU):
        torso["crelu"] = True
    # ReLU by default, as in the paper; SB3's PPO would otherwise use tanh in the MLPs.
    kwargs = dict(
        features_extractor_class=MinAtarCNN,
        features_extractor_kwargs=torso,
        net_arch=net_arch,
        activation_fn=activation_fn,
    )
    return _with_options(kwargs, activation_fn, layer_norm)


def split_output_layer(head: nn.Module) -> tuple[Callable[[th.Tensor], th.Tensor], nn.Module]:
    """``head`` as ``(hidden, layer)``, the map to the input of its last linear layer and that layer, so that
    ``head(x) == layer(hidden(x))``.

    An ``nn.Sequential`` splits before its last module, a single layer (``nn.Linear``) is ``(identity, head)``.
    A head that is neither defines ``split_output_layer()`` itself (the injected head of plasticity injection,
    whose last linear map reads three hidden layers side by side); ``layer`` then is any module with a
    ``weight`` and a ``bias`` that acts as ``F.linear(h, weight, bias)``.
    """
    custom = getattr(head, "split_output_layer", None)
    if callable(custom):
        return custom()
    if isinstance(head, nn.Sequential):
        *layers, last = head

        def hidden(x: th.Tensor) -> th.Tensor:
            for layer in layers:
                x = layer(x)
            return x

        return hidden, last
    return _identity, head


def trainable_output_layer(head: nn.Module) -> nn.Module:
    """The trainable last linear layer of ``head``: the last module of an ``nn.Sequential``, a single layer
    itself, or what the head names by ``trainable_output_layer()`` (after plasticity injection: the last layer
    of the new, trained head)."""
    custom = getattr(head, "trainable_output_layer", None)
    if callable(custom):
        return custom()
    return head[-1] if isinstance(head, nn.Sequential) else head


def _identity(x: th.Tensor) -> th.Tensor:
    return x
