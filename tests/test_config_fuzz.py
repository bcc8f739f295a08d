"""Property-based config fuzzing: every invalid config or override gives exit 2 and one clean line; every
valid one builds the env and the agent."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rl_plasticity.catalog import registries
from rl_plasticity.cli import cli
from rl_plasticity.config import ConfigError, load_config
from rl_plasticity.interventions import INTERVENTIONS
from rl_plasticity.runner import build_agent, build_env

BASE = """\
name: fuzz
total_steps: 100
agent: {algo: dqn, learning_starts: 10, buffer_size: 500, batch_size: 8}
net: {kind: mlp, width: 8, depth: 1}
env: {sequence: cartpole_shift, switch_every: 50}
logging: {progress_bar: false}
"""

# Valid overrides: key -> strategy of valid values (rendered as override text).
VALID = {
    "seed": st.integers(0, 10_000).map(str),
    "agent.learning_rate": st.floats(1e-6, 1.0).map(repr),
    "agent.gamma": st.floats(0.0, 1.0).map(repr),
    "agent.double_q": st.booleans().map(str),
    "agent.batch_size": st.integers(1, 64).map(str),
    "agent.td_loss": st.sampled_from(["huber", "mse"]),
    "agent.max_grad_norm": st.sampled_from(["null", "0.5", "10.0"]),
    "agent.random_steps_per_task": st.integers(0, 200).map(str),
    "net.width": st.integers(1, 8).map(lambda w: str(2 * w)),
    "net.depth": st.integers(0, 3).map(str),
    "net.layer_norm": st.booleans().map(str),
    "net.activation": st.sampled_from(["relu", "tanh", "crelu"]),
    "env.switch_every": st.integers(1, 500).map(str),
    "env.order": st.sampled_from(["cyclic", "random"]),
    "env.options.param": st.sampled_from(["length", "gravity", "masspole"]),
    "interventions": st.lists(st.sampled_from(sorted(INTERVENTIONS)), unique=True, max_size=3).map(
        lambda names: "[" + ",".join(names) + "]"
    ),
    "monitor.probe_every": st.integers(1, 5000).map(str),
}

# Invalid overrides: each breaks exactly one rule.
INVALID = st.one_of(
    st.sampled_from(
        [
            "seed=-1",
            "total_steps=0",
            "env.switch_every=-3",
            "agent.gamma=1.5",
            "agent.algo=sac",
            "env.order=sideways",
            "net.kind=resnet",
            "agent.td_loss=l1",
            "agent.exploration_fraction=null",
            "device=tpu",
            "interventions=[nope]",
            "monitor.probes=[nope]",
            "env.options.values=5",
            "agent.learning_rate=fast",
            "env.sequence=nowhere",
            "net.width=0",
            "checkpoint.every=0",
            "name=../x",
            "seed",
            "=3",
            "agent.batch_size=[1",
            "intervention_params.nope.x=1",
        ]
    ),
    # an unknown key anywhere
    st.tuples(
        st.sampled_from(["", "agent.", "env.", "net.", "monitor.", "logging."]),
        st.text("abcdefghijklmnopqrstuvwxyz_", min_size=3, max_size=12),
    ).map(lambda t: f"{t[0]}{t[1]}zz=1"),
)

FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def base_file(tmp_path: Path) -> Path:
    path = tmp_path / "base.yaml"
    path.write_text(BASE)
    return path


@FUZZ
@given(
    overrides=st.dictionaries(st.sampled_from(sorted(VALID)), st.none(), max_size=5).flatmap(
        lambda keys: st.tuples(*[VALID[k].map(lambda v, k=k: f"{k}={v}") for k in keys])
    )
)
def test_valid_configs_build_env_and_agent(tmp_path_factory, overrides):
    path = base_file(tmp_path_factory.mktemp("valid"))
    try:
        cfg = load_config(path, list(overrides), registries=registries())
    except ConfigError as exc:
        # Combinations may still be invalid as a whole (e.g. an odd crelu width); that must be a clean error.
        assert "\n" not in str(exc)
        return
    env = build_env(cfg)
    build_agent(cfg, env)
    env.close()


@FUZZ
@given(bad=INVALID, good=st.lists(st.sampled_from(["seed=3", "agent.double_q=true", "net.depth=2"]), max_size=2))
def test_invalid_override_exits_2_with_one_line(tmp_path_factory, bad, good):
    root = tmp_path_factory.mktemp("invalid")
    path = base_file(root)
    result = CliRunner().invoke(cli, ["train", str(path), *good, bad, f"logging.root_dir={root / 'runs'}"])
    assert result.exit_code == 2, (bad, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rlp: error: "), (bad, result.stderr)
    assert "Traceback" not in result.output
    assert not (root / "runs").exists()
