"""The probe registry: what each probe declares matches what it logs, and one registered module is all a new
probe needs (the config, ``probe_batch``, ``rlp list probes``, the TensorBoard layout and the may-be-NaN set
all read it)."""

from __future__ import annotations

from dataclasses import replace

import gymnasium as gym
import pytest
import torch as th
from click.testing import CliRunner

from agents import PlasticDQN, PlasticPPO
from rl_plasticity.catalog import registries
from rl_plasticity.cli import cli
from rl_plasticity.config import ConfigError, MonitorConfig, validate_config
from rl_plasticity.monitor import MAY_BE_NAN, tensorboard_layout
from rl_plasticity.probes import PROBES, ProbeInputs, ProbeResult, register_probe
from rl_plasticity.probes.registry import probe_kinds
from rl_plasticity.probing import probe_batch
from rl_plasticity.report.runs import MAIN_PROBES

SMALL = MonitorConfig(hessian_order=5, hessian_vectors=1, gram_size=16, trainability_steps=3).model_dump()


@pytest.fixture(scope="module")
def agents() -> dict[str, tuple[object, object]]:
    """A briefly trained DQN and PPO on CartPole (two hidden layers of 16), each with a batch of 64."""
    th.set_num_threads(1)
    kwargs = {"seed": 0, "device": "cpu", "policy_kwargs": {"net_arch": [16, 16]}}
    dqn = PlasticDQN("MlpPolicy", gym.make("CartPole-v1"), learning_starts=50, buffer_size=1000, **kwargs)
    dqn.learn(150)
    ppo = PlasticPPO("MlpPolicy", gym.make("CartPole-v1"), n_steps=64, batch_size=32, n_epochs=1, **kwargs)
    ppo.learn(64)
    return {"dqn": (dqn, dqn.replay_buffer.sample(64)), "ppo": (ppo, next(ppo.rollout_buffer.get(64)))}


@pytest.fixture
def restore_registry():
    saved = dict(PROBES)
    yield
    PROBES.clear()
    PROBES.update(saved)


@pytest.mark.parametrize("algo", ["dqn", "ppo"])
def test_each_probe_logs_exactly_its_declared_tags(agents, algo):
    agent, batch = agents[algo]
    together = probe_batch(agent, batch, list(PROBES), SMALL)
    seen: dict[str, str] = {}
    for name, spec in PROBES.items():
        if spec.run is None:
            continue
        result = probe_batch(agent, batch, [name], SMALL)
        tags = {key.split("/")[0] for key in result.scalars}
        assert tags == set(spec.tags) - ({"nc3"} if algo == "ppo" else set()), name  # PPO has no classifier: no NC3
        for key in result.scalars:
            assert key not in seen, f"{key} from {name} and {seen.get(key)}"
            seen[key] = name
    assert list(together.scalars) == list(seen)  # all at once: the same values, in registry order


def test_registry_reproduces_the_layout_nan_set_and_main_probes():
    # What the monitor and the report had written out before the registry.
    def charts(*pairs):
        return {title: ["Multiline", [regex]] for title, regex in pairs}

    layout = tensorboard_layout()
    groups = ["returns", "eval", "ranks", "dormancy", "collapse", "curvature", "weights"]
    assert [group for group in layout if group in groups] == groups
    assert layout["ranks"] == charts(
        *[(n, rf"plasticity/{n}/.*") for n in ("erank", "srank", "approx_rank", "eps_rank", "lyle_rank")]
    )
    assert layout["dormancy"] == charts(
        ("dormant fraction", r"plasticity/dormant/.*"), ("active fraction", r"plasticity/(mean_)?active_fraction/.*")
    )
    assert layout["collapse"] == charts(*[(n, rf"plasticity/{n}/.*") for n in ("nc1", "nc2", "nc3", "nc4")])
    assert layout["curvature"] == charts(
        ("K-FAC epsilon-rank", r"plasticity/kfac_eps_rank/.*"),
        ("K-FAC top eigenvalues", r"plasticity/kfac_top_eig_.*"),
        ("K-FAC eranks", r"plasticity/kfac_erank_.*"),
        ("Hessian", r"plasticity/hessian_.*"),
        ("Gram", r"plasticity/gram_.*"),
        ("trainability", r"plasticity/trainability/.*"),
    )
    assert layout["weights"] == charts(
        ("weight norms", r"plasticity/weight_l2_norm/.*"),
        ("distance from init", r"plasticity/weight_dist_from_init/.*"),
        ("update norms", r"plasticity/update_norm/.*"),
        ("gradient norms", r"plasticity/grad_norm/.*"),
    )
    assert MAY_BE_NAN == ("nc1/", "nc2/", "nc3/", "nc4/")
    assert MAIN_PROBES == {
        "erank": "effective rank",
        "dormant": "dormant fraction",
        "nc1": "NC1",
        "kfac_eps_rank": "K-FAC epsilon-rank",
    }
    kinds = probe_kinds()
    assert [n for n, k in kinds.items() if k == "heavy"] == ["hessian", "gram", "trainability"]
    assert {"rank", "dormant", "collapse", "kfac", "weights"} <= {n for n, k in kinds.items() if k == "light"}


def test_a_new_probe_is_one_registration(agents, restore_registry):
    @register_probe("mean_feature", "light", ("mean_feature",), "test group", order=1)
    def _run(inputs: ProbeInputs, mean_feature_scale: float = 1.0) -> ProbeResult:
        """Mean of the value-head features (a test probe)."""
        return ProbeResult({"mean_feature/value_head": mean_feature_scale * inputs.features.mean().item()}, {})

    agent, batch = agents["dqn"]
    result = probe_batch(agent, batch, ["mean_feature"], {"mean_feature_scale": 2.0, "dormant_tau": 0.1})
    with th.no_grad():
        expected = 2.0 * agent.value_features(batch.observations).mean().item()
    assert result.scalars == {"mean_feature/value_head": pytest.approx(expected)}
    assert next(iter(PROBES)) == "mean_feature"  # order=1: first
    assert validate_config({"monitor": {"probes": ["mean_feature"]}}, registries=registries()).monitor.probes == [
        "mean_feature"
    ]
    assert tensorboard_layout()["test group"] == {"mean_feature": ["Multiline", ["plasticity/mean_feature/.*"]]}
    listing = CliRunner().invoke(cli, ["list", "probes"])
    assert listing.exit_code == 0 and "mean_feature" in listing.output and "a test probe" in listing.output
    with pytest.raises(ValueError, match="registered twice"):
        register_probe("mean_feature", "light", ("x",), "g")(_run)


def test_config_validates_against_the_names_passed_in():
    mine = replace(registries(), probe_kinds={"only_light": "light", "only_heavy": "heavy"})
    cfg = validate_config(
        {"monitor": {"probes": ["only_light"], "batch_probes": [], "switch_probes": ["only_heavy"]}}, registries=mine
    )
    assert cfg.monitor.switch_probes == ["only_heavy"]
    with pytest.raises(ConfigError, match=r"^monitor.probes: 'rank' is not a light probe; valid: only_light "):
        validate_config({"monitor": {"batch_probes": []}}, registries=mine)  # the default list names rank
    with pytest.raises(ConfigError, match=r"monitor.switch_probes: 'rank' is a light probe: it goes in monitor.probes"):
        validate_config({"monitor": {"switch_probes": ["rank"]}}, registries=registries())
    with pytest.raises(ConfigError, match=r"'gramm' is not a heavy probe \(did you mean 'gram'\?\); valid: hessian, "):
        validate_config({"monitor": {"switch_probes": ["gramm"]}}, registries=registries())


def test_config_validates_sequences_and_interventions_against_the_registries_passed_in():
    # The config module imports no registry: a sequence or intervention the caller's registries lack is refused,
    # one the caller adds is accepted (with its own parameters checked).
    from rl_plasticity.interventions import INTERVENTIONS

    mine = replace(registries(), sequences=("cartpole_shift",), interventions={"l2": INTERVENTIONS["l2"]})
    cfg = validate_config(
        {"env": {"sequence": "cartpole_shift"}, "interventions": ["l2"], "intervention_params": {"l2": {"coef": 0.5}}},
        registries=mine,
    )
    assert cfg.interventions == ["l2"]
    with pytest.raises(
        ConfigError, match=r"^env.sequence: 'continual_minatar' is not a task sequence; valid: cartpole_shift"
    ):
        validate_config({"env": {"sequence": "continual_minatar"}}, registries=mine)
    with pytest.raises(ConfigError, match=r"^interventions\[0\]: 'reset' is not an intervention; valid: l2$"):
        validate_config({"env": {"sequence": "cartpole_shift"}, "interventions": ["reset"]}, registries=mine)
    with pytest.raises(
        ConfigError, match=r"^unknown config key 'intervention_params.l2.wd'.*; valid keys for l2: coef"
    ):
        validate_config(
            {"env": {"sequence": "cartpole_shift"}, "intervention_params": {"l2": {"wd": 1}}}, registries=mine
        )
