"""Architecture options: LayerNorm (Lyle et al. 2024) and CReLU (Abbas et al. 2023), for DQN and PPO, on the
MLP and the MinAtar network; with both off, SB3's own networks."""

from __future__ import annotations

from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch as th
import yaml
from click.testing import CliRunner
from stable_baselines3 import DQN, PPO
from torch import nn
from torch.nn import functional as F

from agents import AGENTS, POLICIES, CReLU, MinAtarCNN
from agents.networks import build_mlp
from envs import make_sequence
from rl_plasticity.catalog import registries
from rl_plasticity.cli import cli
from rl_plasticity.config import ConfigError, validate_config
from rl_plasticity.runner import policy_kwargs

WIDTH, DEPTH, CHANNELS = 16, 2, 4
SMALL = {
    "dqn": dict(buffer_size=1_000, learning_starts=32, batch_size=16, train_freq=1, target_update_interval=50),
    "ppo": dict(n_steps=64, batch_size=32, n_epochs=2),
}
STOCK = {"dqn": DQN, "ppo": PPO}


@pytest.fixture(autouse=True)
def one_thread():
    # These networks are tiny: a second thread only adds contention, which is slow on a busy machine.
    threads = th.get_num_threads()
    th.set_num_threads(1)
    yield
    th.set_num_threads(threads)


def make_env(kind: str) -> gym.Env:
    return gym.make("CartPole-v1") if kind == "mlp" else make_sequence("continual_minatar", switch_every=200)


@pytest.fixture(scope="module")
def envs() -> dict[str, gym.Env]:
    return {kind: make_env(kind) for kind in ("mlp", "minatar")}


def build(algo: str, kind: str, env: gym.Env, layer_norm: bool, crelu: bool, seed: int = 0):
    """An agent built as ``rlp train`` builds it: config -> runner.policy_kwargs -> POLICIES[algo]."""
    net = dict(
        kind=kind,
        width=WIDTH,
        depth=DEPTH,
        channels=CHANNELS,
        layer_norm=layer_norm,
        activation="crelu" if crelu else "relu",
    )
    cfg = validate_config(dict(agent=dict(algo=algo), net=net), registries=registries())
    return AGENTS[algo](
        POLICIES[algo], env, policy_kwargs=policy_kwargs(cfg, env), device="cpu", seed=seed, **SMALL[algo]
    )


def sample_obs(env: gym.Env, n: int = 7) -> th.Tensor:
    env.observation_space.seed(0)
    return th.as_tensor(np.stack([env.observation_space.sample() for _ in range(n)])).float()


def algo_of(agent) -> str:
    return "dqn" if isinstance(agent, AGENTS["dqn"]) else "ppo"


def hidden_mlps(agent) -> list[nn.Sequential]:
    """The hidden stacks: DQN's online and target ``q_net`` (head included), PPO's actor and critic MLPs."""
    if algo_of(agent) == "dqn":
        return [agent.q_net.q_net, agent.q_net_target.q_net]
    return [agent.policy.mlp_extractor.policy_net, agent.policy.mlp_extractor.value_net]


def manual_forward(x: th.Tensor, mlp: nn.Sequential, layer_norm: bool, crelu: bool) -> th.Tensor:
    """The hidden layers recomputed from their parameters: linear, then LayerNorm, then the activation."""
    linears = [m for m in mlp if isinstance(m, nn.Linear)][:DEPTH]
    norms = [m for m in mlp if isinstance(m, nn.LayerNorm)]
    for i, lin in enumerate(linears):
        x = F.linear(x, lin.weight, lin.bias)
        if layer_norm:
            x = F.layer_norm(x, x.shape[-1:], norms[i].weight, norms[i].bias)
        x = th.cat([x.clamp(min=0), (-x).clamp(min=0)], dim=1) if crelu else x.clamp(min=0)
    return x


def test_crelu_concatenates_positive_and_negative_parts():
    x = th.tensor([[1.5, -2.0, 0.0, 3.0], [-1.0, 0.5, -0.25, 0.0]])
    expected = th.tensor([[1.5, 0.0, 0.0, 3.0, 0.0, 2.0, 0.0, 0.0], [0.0, 0.5, 0.0, 0.0, 1.0, 0.0, 0.25, 0.0]])
    assert th.equal(CReLU()(x), expected)
    # On conv maps (N, C, H, W) the channels double.
    maps = th.tensor([-1.0, 2.0]).reshape(1, 2, 1, 1)
    assert th.equal(CReLU()(maps).flatten(), th.tensor([0.0, 2.0, 1.0, 0.0]))


def test_crelu_needs_an_even_width():
    with pytest.raises(ValueError, match="even width"):
        build_mlp(4, 0, [7], CReLU)
    with pytest.raises(ConfigError, match=r"net\.activation.*net\.width must be even"):
        validate_config(dict(net=dict(activation="crelu", width=15)), registries=registries())
    with pytest.raises(ConfigError, match=r"net\.channels must be even"):
        validate_config(dict(net=dict(activation="crelu", channels=5)), registries=registries())
    # The MLP has no channels, so they do not matter there.
    validate_config(dict(net=dict(kind="mlp", activation="crelu", channels=5)), registries=registries())


@pytest.mark.parametrize("crelu", [False, True], ids=["relu", "crelu"])
@pytest.mark.parametrize("layer_norm", [False, True], ids=["plain", "layer_norm"])
@pytest.mark.parametrize("kind", ["mlp", "minatar"])
@pytest.mark.parametrize("algo", ["dqn", "ppo"])
def test_structure_widths_and_value_features(algo: str, kind: str, layer_norm: bool, crelu: bool, envs):
    env = envs[kind]
    agent = build(algo, kind, env, layer_norm, crelu)
    act = CReLU if crelu else nn.ReLU
    units = WIDTH // 2 if crelu else WIDTH
    features_dim = 4 if kind == "mlp" else CHANNELS * 8 * 8

    # Hidden layers: Linear -> [LayerNorm] -> activation, each Linear with `units` outputs and, after the
    # first, `WIDTH` inputs; DQN's Sequential ends in the Q head, PPO's heads sit outside the extractor.
    layer = [nn.Linear, *([nn.LayerNorm] if layer_norm else []), act]
    for mlp in hidden_mlps(agent):
        assert [type(m) for m in mlp] == layer * DEPTH + ([nn.Linear] if algo == "dqn" else [])
        linears = [m for m in mlp if isinstance(m, nn.Linear)]
        assert [(m.in_features, m.out_features) for m in linears[:DEPTH]] == [(features_dim, units), (WIDTH, units)]
        assert all(m.normalized_shape == (units,) for m in mlp if isinstance(m, nn.LayerNorm))
    heads = agent.head_layers()
    assert all(isinstance(h, nn.Linear) and h.in_features == WIDTH for h in heads)
    if algo == "dqn":
        assert agent.q_net.q_net[-1] is agent.value_head
    # LayerNorm only in the hidden layers: none after a head, none in the torso.
    n_mlps = 1 if algo == "dqn" else 2
    norms = [m for m in agent.online_network().modules() if isinstance(m, nn.LayerNorm)]
    assert len(norms) == (DEPTH * n_mlps if layer_norm else 0)

    # The MinAtar torso: Conv2d(channels / 2) -> CReLU keeps `channels` maps, hence the same features.
    if kind == "minatar":
        torso = agent.q_net.features_extractor if algo == "dqn" else agent.policy.features_extractor
        assert isinstance(torso, MinAtarCNN) and torso.features_dim == features_dim
        assert [type(m) for m in torso.cnn] == [nn.Conv2d, act, nn.Flatten]
        assert torso.cnn[0].out_channels == (CHANNELS // 2 if crelu else CHANNELS)

    obs = sample_obs(env)
    with th.no_grad():
        features = agent.value_features(obs)
        assert features.shape == (len(obs), WIDTH)
        # value_features feeds the value head exactly.
        if algo == "dqn":
            assert th.equal(agent.value_head(features), agent.q_net(obs))
            torso_out = agent.q_net.extract_features(obs, agent.q_net.features_extractor)
            critic = agent.q_net.q_net
        else:
            assert th.equal(agent.value_head(features), agent.policy.predict_values(obs))
            torso_out = agent.policy.extract_features(obs, agent.policy.vf_features_extractor)
            critic = agent.policy.mlp_extractor.value_net
        # ... and is the hidden stack recomputed by hand: LayerNorm on pre-activations, then the activation.
        th.testing.assert_close(features, manual_forward(torso_out, critic, layer_norm, crelu))
        if kind == "minatar":
            conv = torso.cnn[0]
            pre = F.conv2d(obs, conv.weight, conv.bias)
            maps = th.cat([pre.clamp(min=0), (-pre).clamp(min=0)], dim=1) if crelu else pre.clamp(min=0)
            th.testing.assert_close(torso_out, maps.flatten(1))


@pytest.mark.parametrize("kind", ["mlp", "minatar"])
@pytest.mark.parametrize("algo", ["dqn", "ppo"])
def test_options_off_build_and_train_sb3_networks(algo: str, kind: str, envs):
    env = envs[kind]  # for the spaces; each agent trains on a fresh copy (the sequence has a step count)
    hidden = [WIDTH] * DEPTH
    net_arch = hidden if algo == "dqn" else dict(pi=hidden, vf=list(hidden))
    # The construction before the options existed, written out.
    today = dict(net_arch=net_arch, activation_fn=nn.ReLU)
    if kind == "minatar":
        today = dict(features_extractor_class=MinAtarCNN, features_extractor_kwargs=dict(channels=CHANNELS), **today)

    cfg = validate_config(
        dict(agent=dict(algo=algo), net=dict(kind=kind, width=WIDTH, depth=DEPTH, channels=CHANNELS)),
        registries=registries(),
    )
    assert policy_kwargs(cfg, env) == today

    def leaves(policy: nn.Module) -> list[tuple[str, type]]:
        return [(name, type(m)) for name, m in policy.named_modules() if not list(m.children())]

    def assert_same(a: dict[str, th.Tensor], b: dict[str, th.Tensor]) -> None:
        assert a.keys() == b.keys()
        for key in a:
            assert th.equal(a[key], b[key]), f"{key} differs"

    # Each agent is built and trained in turn: seeding resets the global RNGs that training draws from.
    ours = build(algo, kind, make_env(kind), layer_norm=False, crelu=False, seed=5)
    ours_init = {k: v.clone() for k, v in ours.policy.state_dict().items()}
    ours.learn(96)
    stock = STOCK[algo]("MlpPolicy", make_env(kind), policy_kwargs=today, device="cpu", seed=5, **SMALL[algo])
    assert leaves(ours.policy) == leaves(stock.policy)
    assert_same(ours_init, stock.policy.state_dict())
    stock.learn(96)
    assert_same(ours.policy.state_dict(), stock.policy.state_dict())


def test_ppo_orthogonal_init_reaches_the_new_layers(envs):
    agent = build("ppo", "minatar", envs["minatar"], layer_norm=True, crelu=True)
    policy = agent.policy

    def assert_orthogonal(layer: nn.Module, gain: float) -> None:
        w = layer.weight.detach().flatten(1)  # rows are the units (filters); fewer rows than columns here
        assert w.shape[0] <= w.shape[1]
        th.testing.assert_close(w @ w.T, gain**2 * th.eye(w.shape[0]), atol=1e-5, rtol=1e-5)
        assert th.count_nonzero(layer.bias) == 0

    for mlp in hidden_mlps(agent):
        for m in mlp:
            if isinstance(m, nn.Linear):
                assert_orthogonal(m, np.sqrt(2))
            elif isinstance(m, nn.LayerNorm):
                assert th.equal(m.weight, th.ones_like(m.weight)) and th.equal(m.bias, th.zeros_like(m.bias))
    assert_orthogonal(policy.features_extractor.cnn[0], np.sqrt(2))
    assert_orthogonal(policy.action_net, 0.01)
    assert_orthogonal(policy.value_net, 1.0)
    # The agent's own initialiser (used by the resets) re-draws a halved CReLU layer orthogonally too.
    layer = policy.mlp_extractor.value_net[3]
    with th.no_grad():
        layer.weight.fill_(1.0)
        layer.bias.fill_(1.0)
    agent.init_layer(layer)
    assert_orthogonal(layer, np.sqrt(2))


PRESETS = {
    "cartpole_dqn": """\
name: arch
seed: 1
threads: 1
total_steps: 300
agent: {algo: dqn, learning_starts: 50, buffer_size: 1000, batch_size: 16, train_freq: 1, target_update_interval: 50}
net: {kind: mlp, width: 16, depth: 2}
env: {sequence: cartpole_shift, switch_every: 100}
""",
    "minatar_ppo": """\
name: arch
seed: 1
threads: 1
total_steps: 256
agent: {algo: ppo, n_steps: 64, batch_size: 32, n_epochs: 1}
net: {kind: minatar, width: 16, depth: 1, channels: 4}
env: {sequence: continual_minatar, switch_every: 128}
# No gram probe: on PPO's shared torso it swaps out the live conv parameters (a probes/gram.py bug,
# with or without the options), and the trainability probe then cannot copy the network.
monitor: {switch_probes: [hessian, trainability]}
""",
}
SMALL_OVERRIDES = [
    "logging.progress_bar=false",
    "monitor.probe_every=100",
    "monitor.probe_set_size=32",
    "monitor.gram_size=16",
    "monitor.hessian_order=8",
    "monitor.trainability_steps=5",
    "eval.episodes=2",
    "eval.max_episode_steps=100",
]


@pytest.mark.parametrize("preset", list(PRESETS))
def test_rlp_train_with_layer_norm_and_crelu(preset: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "arch.yaml").write_text(PRESETS[preset])
    args = ["train", "arch.yaml", *SMALL_OVERRIDES, "net.layer_norm=true", "net.activation=crelu", "--no-progress"]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output

    (run_dir,) = (tmp_path / "runs" / "arch").iterdir()
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["net"]["layer_norm"] is True and saved["net"]["activation"] == "crelu"
    # The saved model rebuilds the same network: LayerNorm and CReLU in every hidden layer, halved units.
    algo = saved["agent"]["algo"]
    model = AGENTS[algo].load(run_dir / "model.zip", device="cpu")
    for mlp in hidden_mlps(model):
        linears = [m for m in mlp if isinstance(m, nn.Linear)][: saved["net"]["depth"]]
        assert [type(m) for m in mlp][:3] == [nn.Linear, nn.LayerNorm, CReLU]
        assert all(m.out_features == 8 for m in linears)
    assert all(h.in_features == 16 for h in model.head_layers())
