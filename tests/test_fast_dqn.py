"""The fast DQN path (``agent.fast``, agents/fast_dqn.py) against the stock path: the same batches, the same
updates to float tolerance with and without Double DQN and with every loss-term and gradient-term
intervention, the same actions, and save/load on both paths."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch as th
from stable_baselines3.common.buffers import ReplayBuffer
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.noise import NormalActionNoise
from stable_baselines3.common.off_policy_algorithm import OffPolicyAlgorithm
from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize
from test_checkpoint import assert_same_logs, assert_same_model, assert_sigterm_resume_equals

from agents import PlasticDQN, fast_dqn, minatar_policy_kwargs
from agents.fast_dqn import ExplicitLoss, ExplicitQNetwork, ReplaySampler, clip_grad_norm, fast_state
from agents.fast_dqn import td_loss as td_loss_of
from agents.hooks import Intervention
from agents.networks import POLICIES, CReLU
from envs import make_sequence
from rl_plasticity import runner
from rl_plasticity.catalog import registries
from rl_plasticity.config import ConfigError, load_config
from rl_plasticity.interventions import INTERVENTIONS, build_interventions
from rl_plasticity.runner import build_agent, build_env, train

#: Interventions that add loss terms or closed-form gradient terms (they override those hooks).
TERM_INTERVENTIONS = sorted(
    name
    for name, spec in INTERVENTIONS.items()
    if "dqn" in spec.algos
    and (
        spec.cls.loss_terms is not Intervention.loss_terms or spec.cls.gradient_terms is not Intervention.gradient_terms
    )
)
LEARNING_STARTS = 100


def minatar_agent(fast: bool, interventions: list[str] = (), **kwargs: Any) -> PlasticDQN:
    """A PlasticDQN with the MinAtar network on continual MinAtar, its buffer filled with random play."""
    env = make_vec_env(
        make_sequence,
        n_envs=1,
        vec_env_cls=DummyVecEnv,
        env_kwargs=dict(name="continual_minatar", switch_every=100_000, seed=0),
    )
    kw: dict[str, Any] = dict(
        learning_rate=3e-4,
        buffer_size=2_000,
        learning_starts=LEARNING_STARTS + 1,
        batch_size=32,
        train_freq=1,
        target_update_interval=25,
        policy_kwargs=minatar_policy_kwargs("dqn", width=32, channels=8),
        device="cpu",
        seed=0,
    )
    kw.update(kwargs)
    policy = kw.pop("policy", "MlpPolicy")
    agent = PlasticDQN(policy, env, fast=fast, interventions=build_interventions(list(interventions), {}), **kw)
    agent.learn(LEARNING_STARTS)  # random actions, no update
    return agent


def relative_gap(a: th.Tensor, b: th.Tensor) -> float:
    """The relative error ``||a - b|| / ||a||`` (Frobenius norms) of ``b`` as an approximation of ``a``."""
    return float(th.linalg.vector_norm(a - b) / th.linalg.vector_norm(a).clamp_min(1e-12))


def test_term_interventions_are_found():
    assert {"l2", "l2_init", "l2_er", "kfac_rank", "nc_reg"} <= set(TERM_INTERVENTIONS)


@pytest.mark.parametrize("double_q", [False, True], ids=["dqn", "ddqn"])
@pytest.mark.parametrize("intervention", ["none", *TERM_INTERVENTIONS])
def test_fast_update_matches_stock_for_100_updates(intervention: str, double_q: bool):
    names = [] if intervention == "none" else [intervention]
    stock, fast = (minatar_agent(f, names, double_q=double_q) for f in (False, True))
    assert np.array_equal(stock.replay_buffer.observations, fast.replay_buffer.observations)
    for i in range(100):
        norms = []
        for agent in (stock, fast):
            np.random.seed(i)  # the same replay indices for both
            th.manual_seed(i)
            agent.train(gradient_steps=1, batch_size=32)
            agent._n_calls += 1  # the target network is copied every 25 updates, as SB3's _on_step does
            agent._on_step()
            norms.append(float(agent.last_grad_norm))
        # A per-update scalar: cchain's coefficient (50) amplifies rounding in it to about 1e-5 by update 100.
        assert norms[1] == pytest.approx(norms[0], rel=5e-5), f"update {i + 1}: gradient norm"
    assert fast.num_gradient_steps == stock.num_gradient_steps == 100
    for (name, a), b in zip(stock.q_net.named_parameters(), fast.q_net.parameters()):
        assert relative_gap(a.detach(), b.detach()) < 1e-5, name
    for (name, a), b in zip(stock.q_net_target.named_parameters(), fast.q_net_target.parameters()):
        assert relative_gap(a.detach(), b.detach()) < 1e-5, f"target {name}"
    # The same terms were logged on both paths.
    assert stock.logger.name_to_value.keys() == fast.logger.name_to_value.keys()
    for key, value in stock.logger.name_to_value.items():
        assert fast.logger.name_to_value[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


@pytest.mark.parametrize("td_loss,max_grad_norm", [("mse", 10.0), ("huber", float("inf")), ("mse", 0.05)])
def test_fast_update_honours_td_loss_and_max_grad_norm(td_loss: str, max_grad_norm: float):
    stock, fast = (minatar_agent(f, td_loss=td_loss, max_grad_norm=max_grad_norm) for f in (False, True))
    for i in range(30):
        for agent in (stock, fast):
            np.random.seed(i)
            agent.train(gradient_steps=1, batch_size=32)
        assert float(fast.last_grad_norm) == pytest.approx(float(stock.last_grad_norm), rel=1e-5)
        for a, b in zip(stock.q_net.parameters(), fast.q_net.parameters()):
            assert relative_gap(a.grad, b.grad) < 1e-5  # clipped alike (Adam would hide a missing clip)
    for a, b in zip(stock.q_net.parameters(), fast.q_net.parameters()):
        assert relative_gap(a.detach(), b.detach()) < 1e-5


def test_td_loss_changes_the_update_and_is_validated():
    huber, mse = (minatar_agent(True, td_loss=loss) for loss in ("huber", "mse"))
    np.random.seed(0)
    huber.train(1, 32)
    np.random.seed(0)
    mse.train(1, 32)
    assert not th.equal(huber.q_net.q_net[-1].weight, mse.q_net.q_net[-1].weight)
    with pytest.raises(ValueError, match="td_loss must be one of huber, mse"):
        PlasticDQN("MlpPolicy", "CartPole-v1", td_loss="l1")


def test_clip_grad_norm_matches_torch():
    rng = th.Generator().manual_seed(0)
    for max_norm in (0.1, 1e6, float("inf")):
        grads = [th.randn(5, 3, generator=rng) * 10, th.randn(7, generator=rng)]
        params = [th.nn.Parameter(th.zeros_like(g)) for g in grads]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        want = th.nn.utils.clip_grad_norm_(params, max_norm)
        got = clip_grad_norm(grads, max_norm)
        assert float(got) == pytest.approx(float(want), rel=1e-6)
        for p, g in zip(params, grads):
            assert th.allclose(p.grad, g, rtol=1e-6, atol=0)
        if max_norm == float("inf"):
            assert all(th.equal(p.grad, g) for p, g in zip(params, grads))  # scaled by exactly 1


@pytest.mark.parametrize("n_envs", [1, 2])
def test_sampler_draws_sb3s_batch(n_envs: int):
    space = make_sequence("continual_minatar", switch_every=10).observation_space
    import gymnasium as gym

    buffer = ReplayBuffer(50, space, gym.spaces.Discrete(6), n_envs=n_envs, handle_timeout_termination=True)
    rng = np.random.default_rng(0)
    for _ in range(70):  # wraps around: full
        done = rng.random(n_envs) < 0.3
        infos = [{"TimeLimit.truncated": bool(rng.random() < 0.5)} for _ in range(n_envs)]
        buffer.add(
            rng.integers(0, 2, (n_envs, *space.shape), dtype=np.uint8),
            rng.integers(0, 2, (n_envs, *space.shape), dtype=np.uint8),
            rng.integers(0, 6, (n_envs, 1)),
            rng.normal(size=n_envs).astype(np.float32),
            done,
            infos,
        )
    assert buffer.full and buffer.timeouts.any()
    sampler = ReplaySampler(buffer)
    for seed in range(5):
        np.random.seed(seed)
        want = buffer.sample(16)
        np.random.seed(seed)
        got = sampler.sample(16)
        for field in ("observations", "next_observations"):
            assert getattr(got, field).dtype == th.float32
            assert th.equal(getattr(got, field), getattr(want, field).float())
        for field in ("actions", "dones", "rewards"):
            assert th.equal(getattr(got, field), getattr(want, field)), field
        assert got.discounts is None


def test_fast_predict_draws_the_same_actions():
    stock, fast = (minatar_agent(f) for f in (False, True))
    obs = stock.get_env().reset()
    for eps in (0.0, 0.5):
        stock.exploration_rate = fast.exploration_rate = eps
        stock.action_space.seed(1)
        fast.action_space.seed(1)
        for deterministic in (False, True):
            np.random.seed(2)
            want = [stock.predict(obs, deterministic=deterministic)[0] for _ in range(50)]
            np.random.seed(2)
            got = [fast.predict(obs, deterministic=deterministic)[0] for _ in range(50)]
            assert all(a.shape == b.shape == (1,) and a.dtype == b.dtype for a, b in zip(want, got))
            assert [int(a[0]) for a in want] == [int(b[0]) for b in got]
    # A single, non-batched observation goes to SB3's own predict.
    assert np.asarray(fast.predict(obs[0], deterministic=True)[0]).shape == ()


def test_fast_path_uses_fused_adam_and_a_load_follows_the_loading_path(tmp_path):
    fast = minatar_agent(True)
    assert all(g["fused"] for g in fast.policy.optimizer.param_groups)
    assert not any(g["fused"] for g in minatar_agent(False).policy.optimizer.param_groups)
    fast.learn(200, reset_num_timesteps=False)
    fast.save(tmp_path / "fast.zip")

    loaded = PlasticDQN.load(tmp_path / "fast.zip", device="cpu")
    assert loaded.fast and all(g["fused"] for g in loaded.policy.optimizer.param_groups)
    stock = PlasticDQN.load(tmp_path / "fast.zip", device="cpu", fast=False)
    assert not stock.fast and not any(g["fused"] for g in stock.policy.optimizer.param_groups)
    for a, b in zip(fast.q_net.parameters(), stock.q_net.parameters()):
        assert th.equal(a, b)
    # The loaded optimizer continues where the saved one was (its moments and step counts).
    saved, restored = fast.policy.optimizer.state_dict()["state"], loaded.policy.optimizer.state_dict()["state"]
    assert saved.keys() == restored.keys()
    for key in saved:
        for name in ("step", "exp_avg", "exp_avg_sq"):
            assert th.equal(saved[key][name], restored[key][name])


def test_mode_dependent_network_keeps_sb3s_mode_switches():
    agent = PlasticDQN(
        "MlpPolicy",
        "CartPole-v1",
        fast=True,
        learning_starts=10,
        batch_size=8,
        train_freq=1,
        policy_kwargs=dict(net_arch=[16], activation_fn=lambda: th.nn.Dropout(0.5)),
        device="cpu",
        seed=0,
    )
    agent.learn(30)
    assert not agent._fast_state.mode_free
    agent.policy.set_training_mode(False)
    agent.train(1, 8)
    assert agent.q_net.training  # trained in training mode, as SB3 does
    obs = agent.get_env().reset()
    agent.exploration_rate = 0.0
    agent.predict(obs, deterministic=True)  # SB3's predict: eval mode
    assert not agent.q_net.training


def test_config_switch_reaches_the_agent(tmp_path):
    (tmp_path / "c.yaml").write_text(
        "agent: {algo: dqn, learning_starts: 10}\nnet: {kind: mlp}\n"
        "env: {sequence: cartpole_shift, switch_every: 100}\n"
    )
    for value in (False, True):
        cfg = load_config(tmp_path / "c.yaml", [f"agent.fast={str(value).lower()}"], registries=registries())
        agent = build_agent(cfg, build_env(cfg))
        assert agent.fast is value
    assert load_config(tmp_path / "c.yaml", registries=registries()).agent.fast is False
    with pytest.raises(ConfigError, match="agent.fast"):
        load_config(tmp_path / "c.yaml", ["agent.fast=sometimes"], registries=registries())


# -- the explicit networks and the direct Adam step (agents/fast_dqn.py) ------------------------------------------


@pytest.mark.parametrize("intervention", ["none", *TERM_INTERVENTIONS])
def test_explicit_networks_are_taken_unless_a_hook_needs_the_modules(intervention: str):
    agent = minatar_agent(True, [] if intervention == "none" else [intervention])
    # kfac_rank records the layers' inputs with forward hooks: its agent takes the modules and autograd.
    hooked = any(m._forward_hooks or m._forward_pre_hooks for m in agent.q_net.modules())
    assert hooked == (intervention == "kfac_rank")
    for training in (True, False):
        assert (fast_state(agent).explicit(agent, training=training) is None) == hooked


@pytest.mark.parametrize("double_q", [False, True], ids=["dqn", "ddqn"])
@pytest.mark.parametrize("td_loss", ["huber", "mse"])
def test_explicit_gradients_equal_autograds(td_loss: str, double_q: bool):
    agent = minatar_agent(True, td_loss=td_loss, double_q=double_q)
    agent.learn(300, reset_num_timesteps=False)  # trained a little: ReLUs off and on, |Q - y| on both sides of 1
    nets = fast_state(agent).explicit(agent, training=True)
    assert nets is not None
    params = nets[0].params
    for seed in range(3):
        np.random.seed(seed)
        batch = fast_state(agent).sample(agent, 32)
        want_loss, _ = td_loss_of(agent, batch)
        agent.policy.optimizer.zero_grad()
        want_loss.backward()
        want = [p.grad.clone() for p in params]
        explicit = ExplicitLoss(agent, batch, nets)
        loss = explicit.loss
        explicit.backward()
        assert float(loss) == pytest.approx(float(want_loss.detach()), rel=1e-6)
        for p, w, name in zip(params, want, ("conv.w", "conv.b", "hidden.w", "hidden.b", "out.w", "out.b")):
            assert relative_gap(w, p.grad) < 1e-6, name
        assert nets[0].grads_in_place()


def test_a_hook_sends_training_and_acting_through_the_modules():
    stock, fast = (minatar_agent(f) for f in (False, True))
    conv = fast.q_net.features_extractor.cnn[0]
    calls = []
    handle = conv.register_forward_hook(lambda module, inputs, output: calls.append(inputs[0].shape[0]))
    assert fast_state(fast).explicit(fast, training=True) is None
    for agent in (stock, fast):
        np.random.seed(0)
        agent.train(1, 32)
    assert calls == [32]  # the online network's forward on the batch ran through the hooked module
    fast.exploration_rate = 0.0
    fast.predict(fast.get_env().reset(), deterministic=True)
    assert calls == [32, 1]
    for a, b in zip(stock.q_net.parameters(), fast.q_net.parameters()):
        assert relative_gap(a.detach(), b.detach()) < 1e-6
    handle.remove()
    assert fast_state(fast).explicit(fast, training=True) is not None
    fast.train(1, 32)
    assert calls == [32, 1]


def test_a_hook_added_after_the_explicit_networks_were_built_is_seen():
    agent = minatar_agent(True)
    for training in (True, False):
        assert fast_state(agent).explicit(agent, training=training) is not None
    # Every module the forward pass calls, in both networks, and every kind of module hook.
    for net in (agent.q_net, agent.q_net_target):
        for module in (net, net.features_extractor, net.features_extractor.cnn[0], net.q_net, net.q_net[-1]):
            for add_hook in (
                module.register_forward_hook,
                module.register_forward_pre_hook,
                module.register_full_backward_hook,
                module.register_full_backward_pre_hook,
            ):
                handle = add_hook(lambda *args: None)
                for training in (True, False):
                    assert fast_state(agent).explicit(agent, training=training) is None, (module, add_hook)
                handle.remove()
    assert fast_state(agent).explicit(agent, training=True) is not None


def test_a_parameter_hook_or_frozen_parameter_takes_autograd():
    agent = minatar_agent(True)
    weight = agent.q_net.q_net[0].weight
    handle = weight.register_hook(lambda grad: grad)
    assert fast_state(agent).explicit(agent, training=True) is None
    handle.remove()
    weight.requires_grad_(False)
    assert fast_state(agent).explicit(agent, training=True) is None
    weight.requires_grad_(True)
    assert fast_state(agent).explicit(agent, training=True) is not None


def test_another_network_takes_autograd():
    for options in (dict(activation_fn=CReLU), dict(layer_norm=True)):
        kwargs = minatar_policy_kwargs("dqn", width=32, channels=8, **options)
        agent = minatar_agent(True, policy=POLICIES["dqn"], policy_kwargs=kwargs)
        assert ExplicitQNetwork.of(agent.q_net) is None, options
        assert fast_state(agent).explicit(agent, training=True) is None
        agent.train(1, 32)  # the autograd update


def test_adam_step_equals_optimizer_step_and_falls_back():
    direct, stock = minatar_agent(True), minatar_agent(True)
    direct.learn(150, reset_num_timesteps=False)  # the optimizer state exists
    stock.policy.load_state_dict(direct.policy.state_dict())
    # (a deep copy: load_state_dict would share the moment tensors)
    stock.policy.optimizer.load_state_dict(copy.deepcopy(direct.policy.optimizer.state_dict()))
    step = fast_state(direct).adam_step
    assert step._direct()
    rng = th.Generator().manual_seed(0)
    for _ in range(5):
        for p, q in zip(
            direct.policy.optimizer.param_groups[0]["params"], stock.policy.optimizer.param_groups[0]["params"]
        ):
            p.grad = th.randn(p.shape, generator=rng)
            q.grad = p.grad.clone()
        step()
        stock.policy.optimizer.step()
    for p, q in zip(direct.q_net.parameters(), stock.q_net.parameters()):
        assert th.equal(p, q)
    for p, q in zip(direct.policy.optimizer.state.values(), stock.policy.optimizer.state.values()):
        assert all(th.equal(p[k], q[k]) for k in ("step", "exp_avg", "exp_avg_sq"))

    # A step hook, or a group option the direct call does not cover: optimizer.step().
    calls = []
    handle = direct.policy.optimizer.register_step_pre_hook(lambda opt, args, kwargs: calls.append(1))
    assert not step._direct()
    step()
    assert calls == [1]
    handle.remove()
    direct.policy.optimizer.param_groups[0]["amsgrad"] = True
    assert not step._direct()


@pytest.mark.parametrize("td_loss,max_grad_norm", [("huber", 10.0), ("mse", float("inf"))])
def test_fast_learn_is_stock_with_fused_adam_bit_for_bit(td_loss: str, max_grad_norm: float):
    # The explicit networks run the ops autograd runs, in its order; the arithmetic differences from the stock
    # path are the fused Adam kernel and, when the clip acts, the norm taken over one buffer instead of the
    # norm of the per-tensor norms. Against stock SB3 with fused Adam, while the clip does not act, the runs
    # are identical, not close (docs/benchmarks.md: also over 30k steps of the permuted-Breakout preset). With
    # MSE the gradient norm passes 10 here, hence no clip for that case.
    fused = {**minatar_policy_kwargs("dqn", width=32, channels=8), "optimizer_kwargs": {"fused": True}}
    kwargs = dict(
        double_q=True,
        buffer_size=3_000,
        learning_starts=200,
        exploration_fraction=0.3,
        td_loss=td_loss,
        max_grad_norm=max_grad_norm,
    )
    stock, fast = minatar_agent(False, policy_kwargs=fused, **kwargs), minatar_agent(True, **kwargs)
    for agent in (stock, fast):
        np.random.seed(1)
        th.manual_seed(1)
        agent.action_space.seed(1)
        agent.learn(2_000, reset_num_timesteps=False)
    assert fast.num_gradient_steps == stock.num_gradient_steps > 1_500
    assert fast_state(fast).explicit(fast, training=True) is not None
    assert np.array_equal(fast.replay_buffer.actions, stock.replay_buffer.actions)
    for net in ("q_net", "q_net_target"):
        for (name, a), b in zip(getattr(stock, net).named_parameters(), getattr(fast, net).parameters()):
            assert th.equal(a, b), f"{net}.{name}"


#: The MinAtar network on the fast path (its explicit networks) through the runner, with the monitor, the greedy
#: evaluation and checkpoints on.
MINATAR_FAST = """\
name: fastminatar
seed: 4
total_steps: 900
threads: 1
agent: {algo: dqn, fast: true, double_q: true, learning_starts: 100, buffer_size: 1000, batch_size: 16, train_freq: 2,
        target_update_interval: 50, exploration_fraction: 0.5}
net: {kind: minatar, width: 32, channels: 8}
env: {sequence: continual_minatar, switch_every: 450}
logging: {progress_bar: false}
monitor: {probe_every: 100, probe_set_size: 32, probes: [rank, dormant, weights], switch_probes: []}
eval: {episodes: 2, tasks: all, every: 300, max_episode_steps: 200}
checkpoint: {every: 100}
"""


def test_explicit_path_run_with_monitor_eval_and_resume_equals_uninterrupted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    explicit_updates = []

    class Counted(ExplicitLoss):
        def __init__(self, *args: Any) -> None:
            explicit_updates.append(1)
            super().__init__(*args)

    monkeypatch.setattr(fast_dqn, "ExplicitLoss", Counted)
    (tmp_path / "run.yaml").write_text(MINATAR_FAST)
    reference = train(
        load_config(tmp_path / "run.yaml", [f"logging.root_dir={tmp_path / 'ref'}"], registries=registries())
    )
    assert len(explicit_updates) == (900 - 100) // 2  # every update of the run took the explicit networks
    # The evaluation's returns and the probes' values among the logs compared.
    assert_sigterm_resume_equals(reference, tmp_path / "run.yaml", 500, [])


class _EveryPath(Intervention):
    """Test only: a loss term through the features, the loss, the parameters directly and a forward pass of its
    own, so that each way into the explicit backward's chain rule carries gradient."""

    name = "_every_path"

    def loss_terms(self, agent: Any, batch: Any, features: th.Tensor, loss: th.Tensor) -> dict[str, th.Tensor]:
        own = agent.q_net(batch.next_observations.float()).pow(2).mean()
        direct = agent.q_net.q_net[0].weight.pow(2).sum()
        return {"term": 0.3 * features.pow(2).mean() + 0.5 * loss.pow(2) + 1e-3 * direct + 0.1 * own}


def test_explicit_backward_takes_the_chain_rule_through_loss_terms():
    stock, fast = (minatar_agent(f) for f in (False, True))
    for agent in (stock, fast):
        agent.interventions = [_EveryPath()]
    assert fast_state(fast).explicit(fast, training=True) is not None
    for i in range(5):
        for agent in (stock, fast):
            np.random.seed(i)
            agent.train(1, 32)
        assert float(fast.last_grad_norm) == pytest.approx(float(stock.last_grad_norm), rel=1e-5)
        for a, b in zip(stock.q_net.parameters(), fast.q_net.parameters()):
            assert relative_gap(a.grad, b.grad) < 1e-5
    assert fast.logger.name_to_value["train/_every_path/term"] == pytest.approx(
        stock.logger.name_to_value["train/_every_path/term"], rel=1e-5
    )


#: MINATAR_FAST with an update per env step, SB3's episode logging every 4 episodes and three task visits (each
#: switch truncates an episode), 3000 steps.
LEAN_RUN = [
    "total_steps=3000",
    "agent.train_freq=1",
    "agent.learning_starts=200",
    "agent.buffer_size=5000",
    "agent.target_update_interval=100",
    "agent.exploration_fraction=0.3",
    "env.switch_every=1000",
    "logging.log_interval=4",
    "monitor.probe_every=500",
    "eval.every=1000",
    "checkpoint.every=1000",
]

BUFFER_FIELDS = ("observations", "next_observations", "actions", "rewards", "dones", "timeouts")


def counted_lean_loop(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the calls of the lean collection loop (one per rollout)."""
    calls: list[int] = []
    lean = fast_dqn.collect_rollouts

    def counted(*args: Any) -> Any:
        calls.append(1)
        return lean(*args)

    monkeypatch.setattr(fast_dqn, "collect_rollouts", counted)
    return calls


def test_lean_collection_loop_is_sb3s_bit_for_bit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    agents: list[PlasticDQN] = []

    def kept(cfg: Any, env: Any) -> Any:
        agents.append(build_agent(cfg, env))  # type: ignore[arg-type]
        return agents[-1]

    monkeypatch.setattr(runner, "build_agent", kept)
    lean_calls = counted_lean_loop(monkeypatch)
    (tmp_path / "run.yaml").write_text(MINATAR_FAST)

    def config(root: str) -> Any:
        overrides = [*LEAN_RUN, f"logging.root_dir={tmp_path / root}"]
        return load_config(tmp_path / "run.yaml", overrides, registries=registries())

    lean_run = train(config("lean"))
    assert len(lean_calls) == 3000  # every rollout of the run took the lean loop
    with monkeypatch.context() as m:
        m.setattr(PlasticDQN, "collect_rollouts", OffPolicyAlgorithm.collect_rollouts)
        sb3_run = train(config("sb3"))
    assert len(lean_calls) == 3000
    lean, sb3 = agents

    assert_same_model(lean_run, sb3_run)  # parameters, target network, Adam state
    assert_same_logs(lean_run, sb3_run)  # every logged value: losses, episodes, evaluation, probes
    for net in ("q_net", "q_net_target"):
        for (name, a), b in zip(getattr(sb3, net).named_parameters(), getattr(lean, net).parameters()):
            assert th.equal(a, b), f"{net}.{name}"
    for field in BUFFER_FIELDS:
        assert np.array_equal(getattr(lean.replay_buffer, field), getattr(sb3.replay_buffer, field)), field
    assert (lean.replay_buffer.pos, lean.replay_buffer.full) == (sb3.replay_buffer.pos, sb3.replay_buffer.full)
    timeouts, dones = sb3.replay_buffer.timeouts[:3000], sb3.replay_buffer.dones[:3000]
    assert timeouts.sum() >= 2 and (dones * (1 - timeouts)).sum() >= 5  # truncated and terminated episodes
    assert np.array_equal(lean._last_obs, sb3._last_obs)  # type: ignore[arg-type]
    for attr in ("num_timesteps", "_episode_num", "_n_calls", "num_gradient_steps", "exploration_rate"):
        assert getattr(lean, attr) == getattr(sb3, attr), attr
    assert lean._episode_num >= 10
    # Monitor's episode records: return and length (its "t" is wall-clock time).
    assert [(e["r"], e["l"]) for e in lean.ep_info_buffer] == [(e["r"], e["l"]) for e in sb3.ep_info_buffer]
    assert list(lean.ep_success_buffer) == list(sb3.ep_success_buffer)


class _Recorder(BaseCallback):
    """Test only: the callback calls in order, with a copy of the loop's locals at every ``on_step``; stops
    training at the ``stop_at``-th ``on_step``."""

    def __init__(self, stop_at: int) -> None:
        super().__init__()
        self.stop_at = stop_at
        self.seen: list[dict[str, Any]] = []
        self.rollouts = 0

    def _on_rollout_start(self) -> None:
        self.rollouts += 1
        self.seen.append({"call": "on_rollout_start"})

    def _on_rollout_end(self) -> None:
        self.seen.append({"call": "on_rollout_end"})

    def _on_step(self) -> bool:
        keep = ("actions", "buffer_actions", "new_obs", "rewards", "dones", "num_collected_steps", "idx", "done")
        self.seen.append(
            {
                "call": "on_step",
                "keys": sorted(k for k in self.locals if k not in {"total_timesteps", "tb_log_name"}),
                **{k: copy.deepcopy(self.locals[k]) for k in keep if k in self.locals},
                "infos": [{k: v for k, v in i.items() if k != "episode"} for i in self.locals["infos"]],
            }
        )
        return self.n_calls < self.stop_at


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    return type(a) is type(b) and a == b


@pytest.mark.parametrize("train_freq", [1, (3, "step"), (1, "episode")])
def test_lean_collection_loop_gives_callbacks_sb3s_locals_and_stops_as_sb3(
    train_freq: Any, monkeypatch: pytest.MonkeyPatch
):
    kwargs = dict(train_freq=train_freq, exploration_fraction=0.5)
    lean, sb3 = minatar_agent(True, **kwargs), minatar_agent(True, **kwargs)
    start = sb3.num_timesteps  # the warm-up's, rounded up to whole rollouts
    lean_calls = counted_lean_loop(monkeypatch)
    recorders = _Recorder(stop_at=400), _Recorder(stop_at=400)
    for agent, recorder in zip((lean, sb3), recorders):
        with monkeypatch.context() as m:
            if agent is sb3:
                m.setattr(PlasticDQN, "collect_rollouts", OffPolicyAlgorithm.collect_rollouts)
            np.random.seed(2)
            agent.learn(1_000, callback=recorder, reset_num_timesteps=False)
    assert len(lean_calls) == recorders[0].rollouts > 0
    assert lean.num_timesteps == sb3.num_timesteps == start + 400  # on_step's False stopped both
    assert len(recorders[0].seen) == len(recorders[1].seen)
    assert sum(seen["call"] == "on_step" for seen in recorders[0].seen) == 400
    assert sum(seen["call"] == "on_rollout_end" for seen in recorders[0].seen) == recorders[0].rollouts - 1
    for step, (got, want) in enumerate(zip(*(r.seen for r in recorders))):
        assert _same(got, want), step
    for field in BUFFER_FIELDS:
        assert np.array_equal(getattr(lean.replay_buffer, field), getattr(sb3.replay_buffer, field)), field
    assert lean._episode_num == sb3._episode_num > 0
    for a, b in zip(sb3.policy.parameters(), lean.policy.parameters()):
        assert th.equal(a, b)


def test_lean_collection_loop_applies_only_where_it_is_sb3s(monkeypatch: pytest.MonkeyPatch):
    agent = minatar_agent(True)
    env = agent.env
    assert fast_dqn.lean_collection_applies(agent, env, None)
    assert not fast_dqn.lean_collection_applies(agent, env, NormalActionNoise(np.zeros(1), np.ones(1)))
    assert not fast_dqn.lean_collection_applies(agent, VecNormalize(env), None)
    two = make_vec_env(
        make_sequence,
        n_envs=2,
        vec_env_cls=DummyVecEnv,
        env_kwargs=dict(name="continual_minatar", switch_every=100_000, seed=0),
    )
    assert not fast_dqn.lean_collection_applies(agent, two, None)
    lean_calls = counted_lean_loop(monkeypatch)
    agent.learn(20, reset_num_timesteps=False)
    assert len(lean_calls) == 20
    stock = minatar_agent(False)
    stock.learn(20, reset_num_timesteps=False)
    assert len(lean_calls) == 20  # not on the stock path
