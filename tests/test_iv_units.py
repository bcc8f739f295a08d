"""Unit-level interventions: ReDo (recycle dormant units) and continual backprop (replace low-utility units).

Every check is against an independent computation: activations captured by the probes' own hooks
(:func:`rl_plasticity.recording.activation_outputs`), outgoing columns written out by hand (a MinAtar conv
channel ``c`` owns columns ``c*64 .. c*64+63`` of the next linear layer), and copies of the parameters and
of Adam's state taken before the surgery.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch as th

from agents import POLICIES, CReLU, PlasticDQN, PlasticPPO, minatar_policy_kwargs
from envs import make_sequence
from rl_plasticity.interventions.cbp import CBPParams, ContinualBackprop
from rl_plasticity.interventions.redo import ReDo, ReDoParams
from rl_plasticity.interventions.surgery import recycle_units, trace_hidden_layers
from rl_plasticity.probes import unit_scores
from rl_plasticity.recording import activation_outputs

#: MinAtar conv output: 8 x 8 positions per channel (10 x 10 board, 3 x 3 kernel).
POSITIONS = 64

#: Per agent: hidden layer -> (its activation module, the layers it feeds), written out by hand.
EXPECTED_MAPS = {
    "dqn_mlp": {"q_net.0": ("q_net.1", ["q_net.2"]), "q_net.2": ("q_net.3", ["q_net.4"])},
    "dqn_minatar": {
        "features_extractor.cnn.0": ("features_extractor.cnn.1", ["q_net.0"]),
        "q_net.0": ("q_net.1", ["q_net.2"]),
    },
    "ppo_mlp": {
        "mlp_extractor.policy_net.0": ("mlp_extractor.policy_net.1", ["mlp_extractor.policy_net.2"]),
        "mlp_extractor.policy_net.2": ("mlp_extractor.policy_net.3", ["action_net"]),
        "mlp_extractor.value_net.0": ("mlp_extractor.value_net.1", ["mlp_extractor.value_net.2"]),
        "mlp_extractor.value_net.2": ("mlp_extractor.value_net.3", ["value_net"]),
    },
    "ppo_minatar": {
        "features_extractor.cnn.0": (
            "features_extractor.cnn.1",
            ["mlp_extractor.policy_net.0", "mlp_extractor.value_net.0"],
        ),
        "mlp_extractor.policy_net.0": ("mlp_extractor.policy_net.1", ["action_net"]),
        "mlp_extractor.value_net.0": ("mlp_extractor.value_net.1", ["value_net"]),
    },
}


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny networks: a second thread only adds contention, which is slow on a busy machine.
    threads = th.get_num_threads()
    th.set_num_threads(1)
    yield
    th.set_num_threads(threads)


def make_agent(kind: str, seed: int = 0):
    """A small trained agent (so Adam has state) of ``kind``; PPO on CartPole keeps SB3's tanh."""
    if kind.startswith("dqn"):
        env = make_sequence("continual_minatar", switch_every=500) if kind == "dqn_minatar" else "CartPole-v1"
        kwargs = minatar_policy_kwargs("dqn", width=32) if kind == "dqn_minatar" else dict(net_arch=[32, 32])
        agent = PlasticDQN(
            "MlpPolicy",
            env,
            policy_kwargs=kwargs,
            learning_starts=48,
            batch_size=32,
            train_freq=1,
            buffer_size=500,
            target_update_interval=1000,
            device="cpu",
            seed=seed,
        )
    else:
        env = make_sequence("continual_minatar", switch_every=500) if kind == "ppo_minatar" else "CartPole-v1"
        kwargs = minatar_policy_kwargs("ppo", width=32) if kind == "ppo_minatar" else dict(net_arch=[32, 32])
        agent = PlasticPPO(
            "MlpPolicy", env, policy_kwargs=kwargs, n_steps=64, batch_size=32, n_epochs=2, device="cpu", seed=seed
        )
    return agent.learn(64)


def sample(agent, n: int = 32):
    if isinstance(agent, PlasticDQN):
        return agent.replay_buffer.sample(n)
    return next(agent.rollout_buffer.get(n))


def network_output(agent, batch) -> th.Tensor:
    """Everything the network outputs on the batch: Q-values (DQN), or action logits and value (PPO)."""
    with th.no_grad():
        if isinstance(agent, PlasticDQN):
            return agent.q_net(batch.observations)
        logits = agent.policy.get_distribution(batch.observations).distribution.logits
        return th.cat([logits, agent.policy.predict_values(batch.observations)], dim=1)


def activations(agent, batch) -> dict[str, th.Tensor]:
    """Post-activation values by module path of the online network, from the probes' own hooks."""
    network = agent.online_network()
    with th.no_grad(), activation_outputs(network) as outputs:
        if isinstance(agent, PlasticDQN):
            agent.q_net(batch.observations)
        else:
            agent.policy.evaluate_actions(batch.observations, batch.actions.long().flatten())
    return dict(outputs)


def per_unit_mean_abs(H: th.Tensor) -> th.Tensor:
    return H.abs().double().mean(dim=(0, 2, 3) if H.dim() == 4 else 0)


def outgoing_columns(units: list[int], conv: bool) -> list[int]:
    """Input columns of the next layer that carry ``units`` (each conv channel owns 64 consecutive columns)."""
    return [u * POSITIONS + p for u in units for p in range(POSITIONS)] if conv else list(units)


def fill_adam(agent) -> None:
    """Give every Adam moment a non-zero value, so that zeroing an entry is always visible."""
    gen = th.Generator().manual_seed(0)
    for param in agent.online_network().parameters():
        for key in ("exp_avg", "exp_avg_sq"):
            value = agent.optimizer.state[param][key]
            value.copy_(th.rand(value.shape, generator=gen) + 0.1)


def snapshot(agent) -> tuple[dict[str, th.Tensor], dict[str, dict[str, th.Tensor]]]:
    """Parameters and Adam moments by parameter name (copies)."""
    params = {n: p.detach().clone() for n, p in agent.online_network().named_parameters()}
    state = agent.optimizer.state
    adam = {
        n: {k: v.clone() for k, v in state[p].items() if k in ("exp_avg", "exp_avg_sq")}
        for n, p in agent.online_network().named_parameters()
    }
    return params, adam


def check_surgery(agent, before, recycled: dict[str, list[int]], expected_map: dict) -> None:
    """Recycled units: incoming rows changed, outgoing columns zero, their Adam moments zero; all else identical."""
    params_before, adam_before = before
    params_after, adam_after = snapshot(agent)
    touched = {name: th.zeros_like(p, dtype=th.bool) for name, p in params_after.items()}
    for layer, units in recycled.items():
        conv = layer.startswith("features_extractor")
        for suffix in ("weight", "bias"):
            touched[f"{layer}.{suffix}"][units] = True
        for nxt in expected_map[layer][1]:
            touched[f"{nxt}.weight"][:, outgoing_columns(units, conv)] = True
        for unit in units:  # a fresh draw differs from the old row
            assert not th.equal(params_after[f"{layer}.weight"][unit], params_before[f"{layer}.weight"][unit])
    for layer, units in recycled.items():
        for nxt in expected_map[layer][1]:
            cols = outgoing_columns(units, layer.startswith("features_extractor"))
            assert th.all(params_after[f"{nxt}.weight"][:, cols] == 0)
    for name, mask in touched.items():
        assert th.equal(params_after[name][~mask], params_before[name][~mask]), name
        for key in ("exp_avg", "exp_avg_sq"):
            assert th.all(adam_after[name][key][mask] == 0), (name, key)
            assert th.equal(adam_after[name][key][~mask], adam_before[name][key][~mask]), (name, key)


def output_without(agent, batch, units: dict[str, list[int]], expected_map: dict) -> th.Tensor:
    """Oracle: the network's output on ``batch`` with the outgoing weights of ``units`` zeroed (then restored)."""
    modules = dict(agent.online_network().named_modules())
    saved = {name: m.weight.detach().clone() for name, m in modules.items() if getattr(m, "weight", None) is not None}
    with th.no_grad():
        for layer, chosen in units.items():
            for nxt in expected_map[layer][1]:
                modules[nxt].weight[:, outgoing_columns(chosen, layer.startswith("features"))] = 0.0
    output = network_output(agent, batch)
    with th.no_grad():
        for name, weight in saved.items():
            modules[name].weight.copy_(weight)
    return output


def kill_units(agent, layer_name: str, units: list[int]) -> None:
    """Zero the incoming weights and bias of ``units``: their output is act(0) = 0 on every input (ReLU, tanh)."""
    layer = dict(agent.online_network().named_modules())[layer_name]
    with th.no_grad():
        layer.weight[units] = 0.0
        layer.bias[units] = 0.0


# --------------------------------------------------------------------------------------------------
# The hidden-layer map
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(EXPECTED_MAPS))
def test_hidden_layer_map(kind):
    agent = make_agent(kind)
    hidden, acts = trace_hidden_layers(agent, sample(agent))
    names = {id(m): n for n, m in agent.online_network().named_modules()}
    found = {h.name: (h.activation, [names[id(m)] for m in h.outgoing]) for h in hidden}
    assert found == EXPECTED_MAPS[kind]
    reference = activations(agent, sample(agent, 8))
    for h in hidden:
        assert acts[h.activation].shape[1:] == reference[h.activation].shape[1:]
        if h.name.startswith("features_extractor"):
            # Conv -> flatten -> linear: channel c owns columns c*64 .. c*64+63 (of each next layer).
            for nxt in h.outgoing:
                assert th.equal(h.column_units(nxt), th.arange(16).repeat_interleave(POSITIONS))


# --------------------------------------------------------------------------------------------------
# ReDo
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["dqn_minatar", "ppo_minatar", "ppo_mlp"])
def test_redo_recycles_exactly_the_dead_units(kind):
    agent = make_agent(kind, seed=1)
    expected_map = EXPECTED_MAPS[kind]
    # Kill two units of every hidden layer (conv channels included).
    for layer in expected_map:
        kill_units(agent, layer, [1, 5])
    batch = sample(agent)
    acts = activations(agent, batch)
    # With tau = 0, exactly the units that are zero on every sample (and position) are dormant.
    dead = {
        layer: th.nonzero(per_unit_mean_abs(acts[act]) == 0).flatten().tolist()
        for layer, (act, _) in expected_map.items()
    }
    assert all({1, 5} <= set(units) for units in dead.values())
    target_before = copy.deepcopy(agent.q_net_target.state_dict()) if kind.startswith("dqn") else None
    output_before = network_output(agent, batch)
    fill_adam(agent)
    before = snapshot(agent)

    redo = ReDo(ReDoParams(every=7, tau=0.0, batch="train"))
    redo.attach(agent)
    redo.loss_terms(agent, batch, None, None)
    redo.on_update(agent, 6)  # not a multiple of `every`: nothing happens
    assert redo.fired == 0 and all(th.equal(a, b) for a, b in zip(snapshot(agent)[0].values(), before[0].values()))
    redo.on_update(agent, 7)

    assert redo.fired == 1
    n_dead = sum(len(units) for units in dead.values())
    assert redo.state_dict() == {"fired": 1, "recycled_total": n_dead}
    check_surgery(agent, before, dead, expected_map)
    # Dead units had no output, and their outgoing weights are now zero: the network computes the same.
    assert th.allclose(network_output(agent, batch), output_before, atol=1e-6)
    logged = agent.logger.name_to_value
    assert logged["interventions/redo/recycled"] == logged["interventions/redo/recycled_total"] == n_dead
    for layer, units in dead.items():
        assert logged[f"interventions/redo/recycled/{layer}"] == len(units)
    total_units = sum(dict(agent.online_network().named_modules())[layer].weight.shape[0] for layer in expected_map)
    assert logged["interventions/redo/fraction"] == pytest.approx(n_dead / total_units)
    if target_before is not None:  # the target network is a lagged copy and is left alone
        for key, value in agent.q_net_target.state_dict().items():
            assert th.equal(value, target_before[key])


def test_redo_with_crelu_and_layer_norm():
    agent = PlasticDQN(
        POLICIES["dqn"],
        make_sequence("continual_minatar", switch_every=500),
        policy_kwargs=minatar_policy_kwargs("dqn", width=32, activation_fn=CReLU, layer_norm=True),
        learning_starts=48,
        batch_size=32,
        train_freq=1,
        buffer_size=500,
        device="cpu",
        seed=10,
    )
    agent.learn(64)
    hidden, _ = trace_hidden_layers(agent, sample(agent))
    assert [(h.name, h.units, h.expansion, h.norm is not None) for h in hidden] == [
        ("features_extractor.cnn.0", 8, 2, False),
        ("q_net.0", 16, 2, True),
    ]
    assert hidden[1].norm is agent.q_net.q_net[1]
    # Kill filter 3: both CReLU outputs of it (channels 3 and 3 + 8) are zero, so it is dead.
    kill_units(agent, "features_extractor.cnn.0", [3])
    batch = sample(agent)
    output_before = network_output(agent, batch)
    redo = ReDo(ReDoParams(tau=0.0, batch="train"))
    redo.loss_terms(agent, batch, None, None)
    redo.on_update(agent, 1000)
    assert agent.logger.name_to_value["interventions/redo/recycled"] == 1  # LayerNorm + CReLU units never die
    columns = [c * POSITIONS + p for c in (3, 3 + 8) for p in range(POSITIONS)]
    weight = agent.q_net.q_net[0].weight
    assert th.all(weight[:, columns] == 0) and int((weight == 0).all(dim=0).sum()) == len(columns)
    assert th.allclose(network_output(agent, batch), output_before, atol=1e-6)
    # A linear unit under LayerNorm: its scale and offset go back to 1 and 0, its two head columns to 0.
    norm, head = agent.q_net.q_net[1], agent.q_net.q_net[3]
    with th.no_grad():
        norm.weight.fill_(2.0)
        norm.bias.fill_(0.5)
    fill_adam(agent)
    recycle_units(agent, [(hidden[1], th.arange(16) == 2)])
    assert norm.weight[2] == 1 and norm.bias[2] == 0
    assert th.all(norm.weight[th.arange(16) != 2] == 2) and th.all(norm.bias[th.arange(16) != 2] == 0.5)
    assert th.all(head.weight[:, [2, 18]] == 0) and int((head.weight == 0).all(dim=0).sum()) == 2
    for param in (norm.weight, norm.bias):
        moments = agent.optimizer.state[param]["exp_avg"]
        assert moments[2] == 0 and th.all(moments[th.arange(16) != 2] != 0)


def test_redo_tau_selects_by_score_and_only_drops_their_contribution():
    agent = make_agent("dqn_mlp", seed=2)
    batch = sample(agent)
    # Weaken the three most active units of the first layer: still active, but with a score far below 0.1.
    weak = per_unit_mean_abs(activations(agent, batch)["q_net.1"]).argsort(descending=True)[:3].tolist()
    with th.no_grad():
        agent.q_net.q_net[0].weight[weak] *= 0.01
        agent.q_net.q_net[0].bias[weak] *= 0.01
    acts = activations(agent, batch)
    dormant = {
        layer: th.nonzero(unit_scores(acts[act]) <= 0.1).flatten().tolist()
        for layer, (act, _) in EXPECTED_MAPS["dqn_mlp"].items()
    }
    assert set(weak) <= set(dormant["q_net.0"])
    assert per_unit_mean_abs(acts["q_net.1"])[weak].min() > 0  # not dead: the output will move a little
    # Oracle: the old network with the dormant units' outgoing weights zeroed.
    expected = output_without(agent, batch, dormant, EXPECTED_MAPS["dqn_mlp"])
    fill_adam(agent)
    before = snapshot(agent)

    redo = ReDo(ReDoParams(batch="train"))  # published every and tau (1000, 0.1), scored on `batch`
    assert (redo.params.every, redo.params.tau) == (1000, 0.1)
    redo.loss_terms(agent, batch, None, None)
    redo.on_update(agent, 1000)

    check_surgery(agent, before, dormant, EXPECTED_MAPS["dqn_mlp"])
    assert th.allclose(network_output(agent, batch), expected, atol=1e-6)


def test_redo_fires_every_n_updates_during_training():
    redo = ReDo(ReDoParams(every=10))
    agent = PlasticDQN(
        "MlpPolicy",
        "CartPole-v1",
        policy_kwargs=dict(net_arch=[16]),
        learning_starts=20,
        batch_size=16,
        train_freq=1,
        buffer_size=500,
        device="cpu",
        seed=0,
        interventions=[redo],
    )
    agent.learn(125)
    assert agent.num_gradient_steps == 105
    assert redo.fired == 10
    resumed = ReDo(ReDoParams(every=10))
    resumed.load_state_dict(redo.state_dict())
    assert (resumed.fired, resumed.recycled_total) == (10, redo.recycled_total)


@pytest.mark.parametrize("kind", ["dqn_minatar", "ppo_mlp"])
def test_redo_scores_a_fresh_buffer_sample_by_default(kind, monkeypatch):
    # ReDo's code scores the units on batch_size_statistics = 256 transitions sampled from the replay buffer.
    assert (ReDoParams().batch, ReDoParams().replay_batch_size) == ("replay", 256)
    agent = make_agent(kind, seed=3)
    redo = ReDo(ReDoParams(tau=0.0, replay_batch_size=40))
    redo.attach(agent)
    scored, dead = [], []
    real_recycle = ReDo.recycle

    def spy(self, agent_, batch):
        # Oracle before the surgery: the units that are zero on every transition of the scored batch.
        acts = activations(agent_, batch)
        dead.append(sum(int((per_unit_mean_abs(acts[act]) == 0).sum()) for act, _ in EXPECTED_MAPS[kind].values()))
        scored.append(batch)
        return real_recycle(self, agent_, batch)

    monkeypatch.setattr(ReDo, "recycle", spy)
    training_batch = sample(agent, 16)
    redo.loss_terms(agent, training_batch, None, None)
    redo.on_update(agent, 1000)

    (batch,) = scored
    assert batch.observations.shape[0] == 40 != training_batch.observations.shape[0]
    # Every scored transition is one the buffer holds (DQN: its first `pos` rows; PPO: the flattened rollout).
    if kind.startswith("dqn"):
        stored = th.as_tensor(agent.replay_buffer.observations[: agent.replay_buffer.pos]).flatten(1).float()
    else:
        stored = th.as_tensor(agent.rollout_buffer.observations).flatten(1).float()
        # PPO's sample is without replacement: 40 distinct transitions of the 64-step rollout.
        assert len({tuple(row.tolist()) for row in batch.observations}) == 40
    rows = batch.observations.flatten(1).float()
    assert bool((rows[:, None, :] == stored[None, :, :]).all(dim=2).any(dim=1).all())
    assert agent.logger.name_to_value["interventions/redo/recycled"] == dead[0]


def test_redo_per_layer_counts_stay_out_of_the_console_table(capsys):
    # SB3's console table truncates keys to 36 characters: PPO's two policy_net layers would then coincide.
    from stable_baselines3.common.logger import configure

    agent = make_agent("ppo_mlp", seed=4)
    agent.set_logger(configure(None, ["stdout"]))
    redo = ReDo(ReDoParams(tau=0.0))
    redo.attach(agent)
    redo.on_update(agent, 1000)
    logged = dict(agent.logger.name_to_value)
    agent.logger.dump(step=1)
    assert {f"interventions/redo/recycled/{layer}" for layer in EXPECTED_MAPS["ppo_mlp"]} <= set(logged)
    out = capsys.readouterr().out
    assert "recycled_total" in out and "recycled/" not in out


# --------------------------------------------------------------------------------------------------
# Continual backprop
# --------------------------------------------------------------------------------------------------


def drive(agent, iv, batch, step: int, optimizer_step: bool = False) -> None:
    """One update as the agents' train() does it: training forward, loss_terms, [step], on_update."""
    loss, features = agent.training_loss(batch)
    iv.loss_terms(agent, batch, features, loss)
    if optimizer_step:
        agent.optimizer.zero_grad()
        loss.backward()
        agent.optimizer.step()
    iv.on_update(agent, step)


def contributions(agent, batch, expected_map: dict) -> dict[str, th.Tensor]:
    """mean|h_i| * sum_k |w_{k,i}| of every hidden unit, computed from scratch (float64)."""
    acts = activations(agent, batch)
    modules = dict(agent.online_network().named_modules())
    out = {}
    for layer, (act, nexts) in expected_map.items():
        conv = layer.startswith("features_extractor")
        magnitude = sum(modules[n].weight.detach().abs().double().sum(dim=0) for n in nexts)
        if conv:
            magnitude = magnitude.reshape(-1, POSITIONS).sum(dim=1)
        out[layer] = per_unit_mean_abs(acts[act]) * magnitude
    return out


@pytest.mark.parametrize("kind", ["dqn_mlp", "dqn_minatar"])
def test_cbp_utility_is_bias_corrected(kind):
    agent = make_agent(kind, seed=3)
    batch = sample(agent)
    expected = contributions(agent, batch, EXPECTED_MAPS[kind])
    cbp = ContinualBackprop(CBPParams(replacement_rate=0.0))  # utilities only
    cbp.attach(agent)
    steps, eta = 7, cbp.params.decay_rate
    for t in range(1, steps + 1):
        drive(agent, cbp, batch, t)  # no optimizer step: |h| and |w| stay constant
    assert [h.name for h in cbp.hidden_layers] == list(EXPECTED_MAPS[kind])
    for layer, c in expected.items():
        assert c.max() > 0
        assert th.equal(cbp.age[layer], th.full_like(cbp.age[layer], steps))
        th.testing.assert_close(cbp.utility[layer], (1 - eta**steps) * c, rtol=1e-12, atol=0)
        th.testing.assert_close(cbp.bias_corrected_utility(layer), c, rtol=1e-12, atol=0)


def accumulator_reference(cbp, layer: str, ages_before: th.Tensor, acc_before: float) -> tuple[int, float]:
    """Replacements and new accumulator of one update, from the state before it (the spec's arithmetic)."""
    rho, m = cbp.params.replacement_rate, cbp.params.maturity_threshold
    mature = int(((ages_before + 1) > m).sum())
    acc = acc_before + rho * mature
    count = min(int(acc), mature)
    return count, acc - count


def test_cbp_replacement_count_follows_the_accumulator():
    agent = make_agent("dqn_mlp", seed=4)
    batch = sample(agent)
    # m = 0: every unit is mature after each age increment, so rho * n_mature = 32 / 128 = 0.25 per update.
    cbp = ContinualBackprop(CBPParams(replacement_rate=1 / 128, maturity_threshold=0))
    cbp.attach(agent)
    per_update = []
    for t in range(1, 11):
        total = cbp.replaced_total
        drive(agent, cbp, batch, t)
        per_update.append(cbp.replaced_total - total)
    # floor(10 * 0.25) = 2 per layer, at updates 4 and 8, for both hidden layers.
    assert per_update == [0, 0, 0, 2, 0, 0, 0, 2, 0, 0]
    assert cbp.fired == 2 and agent.logger.name_to_value["interventions/cbp/replaced_total"] == 4
    for layer in EXPECTED_MAPS["dqn_mlp"]:
        assert cbp.accumulator[layer].item() == 0.5


def test_cbp_replaces_only_mature_units_with_lowest_utility():
    agent = make_agent("dqn_mlp", seed=5)
    batch = sample(agent)
    expected_map = EXPECTED_MAPS["dqn_mlp"]
    cbp = ContinualBackprop(CBPParams(replacement_rate=1 / 24, maturity_threshold=3))
    cbp.attach(agent)
    eta = cbp.params.decay_rate
    chosen_log = []
    for t in range(1, 16):
        state = copy.deepcopy(cbp.state_dict())["layers"]
        c = contributions(agent, batch, expected_map)
        drive(agent, cbp, batch, t)
        for layer in expected_map:
            ages = state[layer]["age"] if layer in state else th.zeros(32, dtype=th.int64)
            u = state[layer]["utility"] if layer in state else th.zeros(32, dtype=th.float64)
            acc = state[layer]["accumulator"].item() if layer in state else 0.0
            count, acc_after = accumulator_reference(cbp, layer, ages, acc)
            replaced = th.nonzero(cbp.age[layer] == 0).flatten()
            assert replaced.numel() == count and cbp.accumulator[layer].item() == acc_after
            # Only units older than m, and those of lowest bias-corrected utility among them.
            assert th.all(ages[replaced] + 1 > cbp.params.maturity_threshold)
            u_hat = (eta * u + (1 - eta) * c[layer]) / (1 - eta ** (ages + 1).double())
            mature = th.nonzero(ages + 1 > cbp.params.maturity_threshold).flatten()
            lowest = mature[th.argsort(u_hat[mature], stable=True)[:count]]
            assert set(replaced.tolist()) == set(lowest.tolist())
            chosen_log += [(t, layer, unit) for unit in replaced.tolist()]
    assert not [entry for entry in chosen_log if entry[0] <= 3]  # nobody is mature before update 4
    assert len(chosen_log) >= 10
    # A replaced unit has zero outgoing weights, hence the lowest utility: only maturity keeps it from
    # being replaced again at once, so it is never chosen twice within m + 1 updates.
    for t, layer, unit in chosen_log:
        again = [t2 for t2, l2, u2 in chosen_log if (l2, u2) == (layer, unit) and t2 > t]
        assert not again or min(again) - t > cbp.params.maturity_threshold


def test_cbp_ranks_by_bias_corrected_utility():
    agent = make_agent("dqn_mlp", seed=9)
    batch = sample(agent)
    c = contributions(agent, batch, EXPECTED_MAPS["dqn_mlp"])
    cbp = ContinualBackprop(CBPParams(replacement_rate=1 / 32, maturity_threshold=0))  # one unit per layer
    eta = cbp.params.decay_rate
    # Old units with a large utility, and in the first layer one unit A of age 1 whose utility after this
    # update is big * 1, the lowest raw value, but big / (1 - eta^2), the highest bias-corrected one.
    layers = {}
    for layer, contribution in c.items():
        big = contribution.max().item()
        utility, age = th.full((32,), 10 * big, dtype=th.float64), th.full((32,), 1000)
        if layer == "q_net.0":
            young = int(contribution.argmax())
            utility[young], age[young] = (big - (1 - eta) * contribution[young]) / eta, 1
        layers[layer] = {"utility": utility, "age": age, "accumulator": th.tensor(0.0, dtype=th.float64)}
    # Loaded before the first batch: kept until the hidden layers are found.
    cbp.load_state_dict({"fired": 0, "replaced_total": 0, "layers": copy.deepcopy(layers)})
    cbp.attach(agent)
    drive(agent, cbp, batch, 1)
    for layer, state in layers.items():
        raw = eta * state["utility"] + (1 - eta) * c[layer]
        u_hat = raw / (1 - eta ** (state["age"] + 1).double())
        replaced = th.nonzero(cbp.age[layer] == 0).flatten().tolist()
        assert replaced == [int(th.argsort(u_hat, stable=True)[0])]
        if layer == "q_net.0":
            assert int(raw.argmin()) == young and young not in replaced


@pytest.mark.parametrize("kind", ["dqn_minatar", "ppo_minatar"])
def test_cbp_replacement_surgery(kind):
    agent = make_agent(kind, seed=6)
    expected_map = EXPECTED_MAPS[kind]
    batch = sample(agent)
    if kind == "dqn_minatar":
        # Silence 1 conv channel and 2 linear units: their utility is 0, the lowest, so they go first.
        kill_units(agent, "features_extractor.cnn.0", [9])
        kill_units(agent, "q_net.0", [4, 20])
    # m = 0 and rho = 1/16: at the first update, 1 of the 16 channels and 2 of each 32 linear units.
    cbp = ContinualBackprop(CBPParams(replacement_rate=1 / 16, maturity_threshold=0))
    cbp.attach(agent)
    c = contributions(agent, batch, expected_map)
    chosen = {
        layer: th.argsort(c[layer], stable=True)[: 1 if layer.startswith("features") else 2].tolist()
        for layer in expected_map
    }
    expected_output = output_without(agent, batch, chosen, expected_map)
    output_before = network_output(agent, batch)
    fill_adam(agent)
    before = snapshot(agent)

    drive(agent, cbp, batch, 1)

    assert {layer: sorted(th.nonzero(cbp.age[layer] == 0).flatten().tolist()) for layer in expected_map} == {
        layer: sorted(units) for layer, units in chosen.items()
    }
    check_surgery(agent, before, chosen, expected_map)
    assert th.allclose(network_output(agent, batch), expected_output, atol=1e-5)
    if kind == "dqn_minatar":
        # The silenced units have zero utility, so the chosen ones are silent too (ties go to the lowest
        # index): the output does not change at all.
        assert all(c[layer][units].max() == 0 for layer, units in chosen.items())
        assert th.allclose(network_output(agent, batch), output_before, atol=1e-6)
    for layer, units in chosen.items():
        assert th.all(cbp.utility[layer][units] == 0)


def test_cbp_ignores_no_grad_passes_and_copies_of_the_network():
    agent = make_agent("dqn_mlp", seed=7)
    batch, other = sample(agent), sample(agent)
    cbp = ContinualBackprop(CBPParams(replacement_rate=0.0))
    cbp.attach(agent)
    drive(agent, cbp, batch, 1)
    loss, features = agent.training_loss(batch)
    # Between the training pass and the hooks, a probe on other data (no_grad) and a copy trained on it.
    with th.no_grad():
        agent.q_net(other.observations)
    copy.deepcopy(agent.q_net)(other.observations).sum().backward()
    cbp.loss_terms(agent, batch, features, loss)
    cbp.on_update(agent, 2)
    eta = cbp.params.decay_rate
    for layer, c in contributions(agent, batch, EXPECTED_MAPS["dqn_mlp"]).items():
        th.testing.assert_close(cbp.utility[layer], (1 - eta**2) * c, rtol=1e-12, atol=0)


def test_cbp_state_dict_round_trip_resumes_exactly():
    agent = make_agent("dqn_mlp", seed=8)
    batches = [sample(agent) for _ in range(12)]
    params = dict(replacement_rate=1 / 16, maturity_threshold=2)
    cbp = ContinualBackprop(CBPParams(**params))
    cbp.attach(agent)
    for t in range(1, 7):
        drive(agent, cbp, batches[t], t, optimizer_step=True)
    # Through torch.save with weights_only=True: tensors and plain values only.
    buffer = io.BytesIO()
    th.save(cbp.state_dict(), buffer)
    buffer.seek(0)
    saved_iv = th.load(buffer, weights_only=True)
    saved_agent = (
        copy.deepcopy(agent.policy.state_dict()),
        copy.deepcopy(agent.optimizer.state_dict()),
        th.get_rng_state(),
    )

    def run_on(iv) -> tuple:
        for t in range(7, 12):
            drive(agent, iv, batches[t], t, optimizer_step=True)
        return iv.state_dict(), {k: v.clone() for k, v in agent.policy.state_dict().items()}

    first_state, first_params = run_on(cbp)
    assert first_state["replaced_total"] > saved_iv["replaced_total"] > 0

    agent.policy.load_state_dict(saved_agent[0])
    agent.optimizer.load_state_dict(saved_agent[1])
    th.set_rng_state(saved_agent[2])
    resumed = ContinualBackprop(CBPParams(**params))
    resumed.attach(agent)
    resumed.load_state_dict(saved_iv)
    second_state, second_params = run_on(resumed)

    assert second_state["fired"] == first_state["fired"]
    assert second_state["replaced_total"] == first_state["replaced_total"]
    for layer, values in first_state["layers"].items():
        for key, value in values.items():
            assert th.equal(second_state["layers"][layer][key], value), (layer, key)
    for key, value in first_params.items():
        assert th.equal(second_params[key], value), key
