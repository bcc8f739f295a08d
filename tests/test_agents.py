"""PlasticDQN / PlasticPPO: bit-for-bit equivalence with SB3, the Double-DQN target and the hooks."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch as th
from stable_baselines3 import DQN, PPO
from stable_baselines3.common.buffers import ReplayBufferSamples
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.logger import KVWriter, Logger
from stable_baselines3.common.vec_env import DummyVecEnv

from agents import Intervention, MinAtarCNN, PlasticDQN, PlasticPPO, TaskSwitch, minatar_policy_kwargs
from agents.plastic import NonFiniteError
from envs import make_sequence
from rl_plasticity.task_logging import TaskLogCallback

DQN_KW = dict(
    learning_starts=64,
    batch_size=16,
    train_freq=1,
    target_update_interval=50,
    buffer_size=1_000,
    policy_kwargs=dict(net_arch=[32]),
    seed=3,
    device="cpu",
)
PPO_KW = dict(n_steps=64, batch_size=32, n_epochs=2, policy_kwargs=dict(net_arch=[32]), seed=3, device="cpu")


def assert_same_parameters(a: th.nn.Module, b: th.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert th.equal(sa[key], sb[key]), f"{key} differs"


class Recorder(Intervention):
    """A no-op intervention that only counts hook calls."""

    name = "recorder"

    def __init__(self) -> None:
        self.updates: list[int] = []
        self.feature_shapes: list[tuple[int, ...]] = []

    def loss_terms(self, agent, batch, features, loss):
        self.feature_shapes.append(tuple(features.shape))
        return {}

    def on_update(self, agent, num_gradient_steps):
        self.updates.append(num_gradient_steps)


@pytest.mark.parametrize("interventions", [[], [Intervention(), Intervention()]], ids=["none", "noops"])
def test_dqn_equals_stock_sb3(interventions):
    ours = PlasticDQN("MlpPolicy", "CartPole-v1", interventions=interventions, **DQN_KW).learn(400)
    stock = DQN("MlpPolicy", "CartPole-v1", **DQN_KW).learn(400)
    assert ours._n_updates == stock._n_updates > 0
    assert_same_parameters(ours.policy, stock.policy)


@pytest.mark.parametrize("interventions", [[], [Intervention()]], ids=["none", "noop"])
def test_ppo_equals_stock_sb3(interventions):
    ours = PlasticPPO("MlpPolicy", "CartPole-v1", interventions=interventions, **PPO_KW).learn(192)
    stock = PPO("MlpPolicy", "CartPole-v1", **PPO_KW).learn(192)
    assert_same_parameters(ours.policy, stock.policy)


def test_update_counter_and_feature_shape():
    rec = Recorder()
    dqn = PlasticDQN("MlpPolicy", "CartPole-v1", interventions=[rec], **DQN_KW).learn(200)
    assert rec.updates == list(range(1, dqn._n_updates + 1))
    assert set(rec.feature_shapes) == {(16, 32)}

    rec = Recorder()
    ppo = PlasticPPO("MlpPolicy", "CartPole-v1", interventions=[rec], **PPO_KW).learn(128)
    # 2 rollouts of 64 steps, 2 epochs, 2 minibatches of 32 each
    assert rec.updates == list(range(1, 9)) and ppo.num_gradient_steps == 8
    assert set(rec.feature_shapes) == {(32, 32)}


@pytest.mark.parametrize("algo", [PlasticDQN, PlasticPPO])
def test_value_features_feed_the_head_with_graph(algo):
    kw = DQN_KW if algo is PlasticDQN else PPO_KW
    agent = algo("MlpPolicy", "CartPole-v1", **kw)
    obs = th.randn(5, 4)
    features = agent.value_features(obs)
    assert features.shape == (5, 32)
    assert features.requires_grad and features.grad_fn is not None
    head_out = agent.value_head(features)
    if algo is PlasticDQN:
        assert th.allclose(head_out, agent.q_net(obs))
    else:
        assert th.allclose(head_out, agent.policy.predict_values(obs))
    # The graph reaches the layers below the head.
    head_out.sum().backward()
    head_ids = {id(p) for p in agent.value_head.parameters()}
    below = [p for p in agent.policy.parameters() if id(p) not in head_ids and p.grad is not None]
    assert below and all(p.grad.abs().sum() > 0 for p in below)


def _batch(rng: np.random.Generator, n: int = 6) -> ReplayBufferSamples:
    t = lambda a: th.as_tensor(a, dtype=th.float32)  # noqa: E731
    return ReplayBufferSamples(
        observations=t(rng.normal(size=(n, 4))),
        actions=th.as_tensor(rng.integers(0, 2, size=(n, 1))),
        next_observations=t(rng.normal(size=(n, 4))),
        dones=t([[0.0], [1.0], [0.0], [0.0], [1.0], [0.0]][:n]),
        rewards=t(rng.normal(size=(n, 1))),
    )


def test_double_q_target_matches_hand_computation():
    agent = PlasticDQN("MlpPolicy", "CartPole-v1", double_q=True, **DQN_KW)
    # Make the target network differ from the online one so the two targets disagree.
    with th.no_grad():
        for p in agent.q_net_target.parameters():
            p.add_(th.randn_like(p))
    batch = _batch(np.random.default_rng(0))
    gamma = 0.9
    got = agent.compute_target(batch, gamma)

    with th.no_grad():
        q_online = agent.q_net(batch.next_observations).numpy()
        q_target = agent.q_net_target(batch.next_observations).numpy()
    expected, vanilla = [], []
    for i in range(len(q_online)):
        a_star = int(np.argmax(q_online[i]))  # the online net picks...
        bootstrap = (1.0 - float(batch.dones[i, 0])) * gamma
        expected.append(float(batch.rewards[i, 0]) + bootstrap * q_target[i, a_star])  # ...the target evaluates
        vanilla.append(float(batch.rewards[i, 0]) + bootstrap * q_target[i].max())
    np.testing.assert_allclose(got.numpy().ravel(), expected, rtol=1e-6)
    assert got.shape == (6, 1)
    # The batch is chosen so that Double DQN and DQN really differ here.
    assert not np.allclose(expected, vanilla)
    agent.double_q = False
    np.testing.assert_allclose(agent.compute_target(batch, gamma).numpy().ravel(), vanilla, rtol=1e-6)


class FeatureSquare(Intervention):
    """Adds ``coef * mean(features ** 2)``: a term whose gradient we can compute independently."""

    name = "square"

    def __init__(self, coef: float) -> None:
        self.coef = coef

    def loss_terms(self, agent, batch, features, loss):
        return {"penalty": self.coef * features.pow(2).mean()}


@pytest.mark.parametrize("algo", [PlasticDQN, PlasticPPO])
def test_extra_loss_changes_gradient_by_exactly_its_own_gradient(algo):
    # Plain SGD (lr=1) and no clipping: the parameter change is minus the gradient.
    kw = dict(DQN_KW if algo is PlasticDQN else PPO_KW)
    kw["policy_kwargs"] = dict(net_arch=[32], optimizer_class=th.optim.SGD)
    kw.update(learning_rate=1.0, max_grad_norm=1e9)
    if algo is PlasticDQN:
        agent = algo(
            "MlpPolicy",
            "CartPole-v1",
            learning_starts=10_000,
            **{k: v for k, v in kw.items() if k != "learning_starts"},
        )
        agent.learn(100)  # fills the replay buffer, no training yet
    else:
        kw.update(n_epochs=1, batch_size=64)  # one minibatch = the whole rollout, in buffer order
        agent = algo("MlpPolicy", "CartPole-v1", **kw)
        agent.learn(64)  # the last rollout stays in the buffer, and train() used it once

    start = copy.deepcopy(agent.policy.state_dict())

    def one_step() -> dict[str, th.Tensor]:
        agent.policy.load_state_dict(start)
        np.random.seed(0)  # the replay buffer samples with numpy's global RNG
        th.manual_seed(0)
        agent.train(1, 16) if algo is PlasticDQN else agent.train()
        return {k: v.clone() for k, v in agent.policy.state_dict().items()}

    plain = one_step()
    term = FeatureSquare(coef=0.7)
    agent.interventions = [term]
    with_term = one_step()

    # The term's gradient at the start point, computed on its own.
    agent.policy.load_state_dict(start)
    np.random.seed(0)
    batch = agent.replay_buffer.sample(16) if algo is PlasticDQN else next(agent.rollout_buffer.get(64))
    agent.policy.zero_grad()
    term.loss_terms(agent, batch, agent.value_features(batch.observations), None)["penalty"].backward()
    grads = {name: p.grad for name, p in agent.policy.named_parameters()}

    checked = 0
    for name, g in grads.items():
        delta = plain[name] - with_term[name]  # = lr * grad_term, since lr = 1
        expected = th.zeros_like(delta) if g is None else g
        assert th.allclose(delta, expected, atol=1e-6), name
        checked += int(g is not None and g.abs().sum() > 0)
    assert checked >= 2  # the term really reached the layers below the head


class GradientSquare(Intervention):
    """Adds the gradient ``coef * theta`` of ``coef * ||theta||^2 / 2`` straight to every ``.grad``."""

    name = "gsquare"

    def __init__(self, coef: float) -> None:
        self.coef = coef

    def gradient_terms(self, agent):
        params = list(agent.online_network().parameters())
        for p in params:
            p.grad.add_(p.detach(), alpha=self.coef)
        return {"penalty": self.coef * sum(p.detach().pow(2).sum() for p in params) / 2}


@pytest.mark.parametrize("algo", [PlasticDQN, PlasticPPO])
@pytest.mark.parametrize("clip", [False, True])
def test_gradient_term_is_added_before_clipping_and_logged(algo, clip):
    # Plain SGD (lr=1): the parameter change is minus the clipped gradient.
    kw = dict(DQN_KW if algo is PlasticDQN else PPO_KW)
    kw["policy_kwargs"] = dict(net_arch=[32], optimizer_class=th.optim.SGD)
    kw.update(learning_rate=1.0, max_grad_norm=0.01 if clip else 1e9)
    if algo is PlasticDQN:
        agent = algo(
            "MlpPolicy",
            "CartPole-v1",
            learning_starts=10_000,
            **{k: v for k, v in kw.items() if k != "learning_starts"},
        )
        agent.learn(100)
    else:
        kw.update(n_epochs=1, batch_size=64)
        agent = algo("MlpPolicy", "CartPole-v1", **kw)
        agent.learn(64)
    start = copy.deepcopy(agent.policy.state_dict())
    coef = 0.3

    # The expected step, by hand: own loss gradient plus coef * theta, then clipped as SB3 clips.
    np.random.seed(0)
    batch = agent.replay_buffer.sample(16) if algo is PlasticDQN else next(agent.rollout_buffer.get(64))
    agent.policy.zero_grad()
    loss = agent.training_loss(batch)[0] if algo is PlasticDQN else agent.loss_parts(batch, 0.2, None).loss
    loss.backward()
    online = {id(p) for p in agent.online_network().parameters()}  # DQN: not the target network
    grads = {
        n: (p.grad if p.grad is not None else th.zeros_like(p)) + coef * p.detach()
        for n, p in agent.policy.named_parameters()
        if id(p) in online
    }
    names = list(grads)
    norm = th.linalg.vector_norm(th.stack([th.linalg.vector_norm(g) for g in grads.values()])).item()
    scale = min(1.0, kw["max_grad_norm"] / (norm + 1e-6))
    assert (scale < 1.0) == clip

    agent.policy.load_state_dict(start)
    agent.interventions = [GradientSquare(coef)]
    np.random.seed(0)
    th.manual_seed(0)
    agent.train(1, 16) if algo is PlasticDQN else agent.train()
    after = dict(agent.policy.named_parameters())
    for n in names:
        assert th.allclose(start[n] - after[n].detach(), scale * grads[n], atol=1e-6), n
    expected_value = coef * sum(v.pow(2).sum().item() for k, v in start.items() if k in names) / 2
    assert agent.logger.name_to_value["train/gsquare/penalty"] == pytest.approx(expected_value, rel=1e-6)


class WeightSquare(Intervention):
    """Logs ``sum ||theta||^2`` of the online network when the logs are written (``logged_values``)."""

    name = "wsquare"

    def __init__(self, value: float | None = None) -> None:
        self.value = value  # a fixed value to report instead, for the NaN guard

    def logged_values(self, agent):
        if self.value is not None:
            return {"sq": th.tensor(self.value)}
        return {"sq": sum(p.detach().pow(2).sum() for p in agent.online_network().parameters())}


class DumpChecker(KVWriter):
    """At every dump, the expected ``sum ||theta||^2`` of the agent's weights at that moment, and what was logged."""

    def __init__(self, agent) -> None:
        self.agent, self.dumps = agent, []

    def write(self, key_values, key_excluded, step=0):
        expected = sum(p.detach().pow(2).sum().item() for p in self.agent.online_network().parameters())
        self.dumps.append((step, self.agent.num_gradient_steps, expected, dict(key_values)))


@pytest.mark.parametrize("algo", [PlasticDQN, PlasticPPO])
def test_logged_values_are_computed_at_every_dump_for_the_weights_then(algo):
    kw = dict(DQN_KW if algo is PlasticDQN else PPO_KW)
    agent = algo("MlpPolicy", "CartPole-v1", interventions=[WeightSquare()], **kw)
    checker = DumpChecker(agent)
    agent.set_logger(Logger(None, [checker]))
    agent.learn(400 if algo is PlasticDQN else 192, log_interval=1)
    trained = [(n, expected, kv) for _, n, expected, kv in checker.dumps if n > 0]
    assert len(trained) >= 2
    for _, expected, kv in trained:
        assert kv["train/wsquare/sq"] == pytest.approx(expected, rel=1e-6)
        assert kv["interventions/wsquare/sq"] == kv["train/wsquare/sq"]
    # Before the first gradient step there is nothing to log.
    assert all("train/wsquare/sq" not in kv for _, n, _, kv in checker.dumps if n == 0)
    assert len({kv["train/wsquare/sq"] for _, _, kv in trained}) == len(trained)  # weights moved between dumps


def test_logged_values_are_recorded_by_the_task_loggers_dump_and_nan_guarded():
    agent = PlasticDQN("MlpPolicy", sequence_env("cartpole_shift", 1, 150), interventions=[WeightSquare()], **DQN_KW)
    checker = DumpChecker(agent)
    agent.set_logger(Logger(None, [checker]))
    agent.learn(160, log_interval=None, callback=TaskLogCallback({}, ["a", "b", "c"]))  # only the switch at 150 dumps
    ((_, n, expected, kv),) = checker.dumps
    assert n > 0 and kv["train/wsquare/sq"] == pytest.approx(expected, rel=1e-6)

    bad = PlasticDQN("MlpPolicy", "CartPole-v1", interventions=[WeightSquare(float("nan"))], **DQN_KW)
    bad.set_logger(Logger(None, []))
    message = r"non-finite interventions/wsquare/sq = nan at env step \d+ \(gradient step"
    with pytest.raises(NonFiniteError, match=message):
        bad.learn(400, log_interval=1)
    bad.interventions = [WeightSquare()]
    bad.interventions[0].logged_values = lambda agent: {"sq": th.ones(2)}
    with pytest.raises(ValueError, match=r"term wsquare/sq must be a scalar, got shape \(2,\)"):
        bad.record_logged_values()


# -- on the task sequences -------------------------------------------------------------------------


def sequence_env(name: str, n_envs: int, switch_every: int, **options):
    return make_vec_env(
        make_sequence,
        n_envs=n_envs,
        vec_env_cls=DummyVecEnv,
        env_kwargs=dict(name=name, switch_every=switch_every, num_envs=n_envs, **options),
    )


def test_dqn_equals_stock_on_minatar_sequence_with_switches():
    kw = dict(
        learning_starts=100,
        batch_size=16,
        train_freq=1,
        target_update_interval=100,
        buffer_size=2_000,
        policy_kwargs=minatar_policy_kwargs("dqn", width=32),
        seed=5,
        device="cpu",
    )
    ours = PlasticDQN("MlpPolicy", sequence_env("continual_minatar", 1, 150), **kw).learn(450)
    stock = DQN("MlpPolicy", sequence_env("continual_minatar", 1, 150), **kw).learn(450)
    assert isinstance(ours.policy.q_net.features_extractor, MinAtarCNN)
    assert_same_parameters(ours.policy, stock.policy)


def test_minatar_network_shape_matches_the_paper():
    agent = PlasticDQN(
        "MlpPolicy", sequence_env("continual_minatar", 1, 100), policy_kwargs=minatar_policy_kwargs("dqn"), device="cpu"
    )
    conv = agent.q_net.features_extractor.cnn[0]
    assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride) == (10, 16, (3, 3), (1, 1))
    hidden, head = agent.q_net.q_net[0], agent.value_head
    assert (hidden.in_features, hidden.out_features) == (1024, 128)
    assert (head.in_features, head.out_features) == (128, 6)
    deeper = PlasticPPO(
        "MlpPolicy",
        sequence_env("continual_minatar", 1, 100),
        policy_kwargs=minatar_policy_kwargs("ppo", width=64, depth=2, channels=8),
        device="cpu",
    )
    assert deeper.value_head.in_features == 64 and deeper.policy.features_extractor.features_dim == 8 * 8 * 8
    assert len([m for m in deeper.policy.mlp_extractor.value_net if isinstance(m, th.nn.Linear)]) == 2


class SwitchRecorder(Intervention):
    name = "switches"

    def __init__(self) -> None:
        self.switches: list[TaskSwitch] = []
        self.updates_at_switch: list[int] = []

    def on_task_switch(self, agent, switch):
        self.switches.append(switch)
        self.updates_at_switch.append(agent.num_gradient_steps)


@pytest.mark.parametrize("algo,n_envs", [(PlasticDQN, 1), (PlasticDQN, 2), (PlasticPPO, 2)])
def test_on_task_switch_once_per_switch_at_the_boundary(algo, n_envs):
    rec = SwitchRecorder()
    env = sequence_env("cartpole_shift", n_envs, 100)
    kw = DQN_KW if algo is PlasticDQN else dict(PPO_KW, n_steps=32)
    algo("MlpPolicy", env, interventions=[rec], **kw).learn(400)
    assert [s.num_timesteps for s in rec.switches] == [100, 200, 300, 400]
    assert [(s.from_task, s.to_task) for s in rec.switches] == [(0, 1), (1, 2), (2, 0), (0, 1)]
    assert rec.switches[0].from_name == "cartpole/length=0.5"


@pytest.mark.parametrize(("ours", "stock"), [(PlasticDQN, DQN), (PlasticPPO, PPO)])
def test_constructor_shows_every_sb3_argument_with_sb3_default(ours: type, stock: type) -> None:
    """The explicit signature (for help() and IDEs) passes SB3's arguments through: same names, kinds and defaults,
    in SB3's order; our own options are keyword-only."""
    import inspect

    mine = inspect.signature(ours.__init__).parameters
    theirs = inspect.signature(stock.__init__).parameters
    assert list(mine)[: len(theirs)] == list(theirs)
    for name, p in theirs.items():
        assert (mine[name].kind, mine[name].default) == (p.kind, p.default), name
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in list(mine.values())[len(theirs) :])
    assert "interventions" in mine
