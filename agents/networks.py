"""The MinAtar network (Young & Tian, 2019) as an SB3 features extractor."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import torch as th
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from torch import nn


class MinAtarCNN(BaseFeaturesExtractor):
    """``Conv2d(C -> channels, k x k, stride 1) -> ReLU -> flatten``, the MinAtar torso.

    With the defaults on a 10x10 MinAtar observation the output has 16 * 8 * 8 = 1024 features. The
    hidden layer(s) and the head are SB3's ``net_arch``: ``[128]`` gives the published network
    ``Linear(1024 -> 128) -> ReLU -> Linear(128 -> actions)``.

    :param observation_space: a channel-first ``Box`` of shape ``(C, H, W)``.
    :param channels: output channels of the convolution (16 in the paper).
    :param kernel_size: size of the square kernel (3 in the paper).
    """

    def __init__(self, observation_space: gym.spaces.Box, channels: int = 16, kernel_size: int = 3) -> None:
        if len(observation_space.shape) != 3:
            raise ValueError(f"MinAtarCNN needs (C, H, W) observations, got shape {observation_space.shape}")
        in_channels, height, width = observation_space.shape
        out_h, out_w = height - kernel_size + 1, width - kernel_size + 1
        super().__init__(observation_space, features_dim=channels * out_h * out_w)
        self.cnn = nn.Sequential(nn.Conv2d(in_channels, channels, kernel_size, stride=1), nn.ReLU(), nn.Flatten())

    def forward(self, observations: th.Tensor) -> th.Tensor:
        return self.cnn(observations)


def minatar_policy_kwargs(algo: str, width: int = 128, depth: int = 1, channels: int = 16) -> dict[str, Any]:
    """SB3 ``policy_kwargs`` for the MinAtar network with ``depth`` hidden ReLU layers of ``width`` units.

    :param algo: ``"dqn"`` (one Q head) or ``"ppo"`` (separate actor and critic MLPs on a shared torso).
    """
    hidden = [width] * depth
    net_arch: Any = hidden if algo == "dqn" else dict(pi=hidden, vf=list(hidden))
    # ReLU as in the paper; SB3's PPO would otherwise use tanh in the MLPs.
    return dict(
        features_extractor_class=MinAtarCNN,
        features_extractor_kwargs=dict(channels=channels),
        net_arch=net_arch,
        activation_fn=nn.ReLU,
    )
