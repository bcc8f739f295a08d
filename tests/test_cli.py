"""`rlp train` / `rlp list` end to end: the events file and its tags, and every bad-input case."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from rl_plasticity.cli import cli

TINY = """\
# tiny: CartPole shift for the CLI tests
name: tiny
seed: 1
total_steps: 600
agent: {algo: dqn, double_q: true, learning_starts: 50, buffer_size: 1000, batch_size: 16,
        train_freq: 1, target_update_interval: 50}
net: {kind: mlp, width: 16, depth: 1}
env: {sequence: cartpole_shift, switch_every: 200}
logging: {progress_bar: false}
"""


@pytest.fixture
def tiny(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    return path


def run(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_train_writes_config_model_and_tagged_events(tiny: Path):
    result = run("train", str(tiny), "logging.root_dir=out", "agent.learning_rate=5e-4", "--no-progress")
    assert result.exit_code == 0, result.output
    (run_dir,) = (tiny.parent / "out" / "tiny").iterdir()
    assert run_dir.name.endswith("_seed1")
    assert f"run directory: {Path('out') / 'tiny' / run_dir.name}" in result.output
    assert "tensorboard --logdir" in result.output
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["agent"]["learning_rate"] == 5e-4 and saved["total_steps"] == 600
    assert (run_dir / "model.zip").is_file()

    (events,) = run_dir.glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    names = ["cartpole/length=0.5", "cartpole/length=1.5", "cartpole/length=0.25"]
    expected = {"rollout/ep_rew_mean", "train/loss", "task/id"} | {f"task/{n}/episode_return" for n in names}
    assert expected <= scalars, expected - scalars
    # A text marker at exactly each switch, naming both tasks.
    switches = acc.Tensors("task/switch/text_summary")
    assert [e.step for e in switches] == [200, 400, 600]
    first = switches[0].tensor_proto.string_val[0].decode()
    assert first == "cartpole/length=0.5 -> cartpole/length=1.5"
    # task/id steps to the new task at each switch.
    ids = {e.step: e.value for e in acc.Scalars("task/id")}
    assert ids[200] == 1 and ids[400] == 2 and ids[600] == 0
    # Per-task returns are only logged while that task runs.
    second = [e.step for e in acc.Scalars("task/cartpole/length=1.5/episode_return")]
    assert second and all(200 < s <= 400 for s in second)
    # Hyperparameters, for TensorBoard's HPARAMS tab.
    assert "_hparams_/experiment" in acc.summary_metadata


def test_train_resolves_preset_name_and_one_pass_total(tiny: Path):
    # total_steps null -> one pass over the 3 tasks.
    result = run(
        "train",
        str(tiny),
        "total_steps=null",
        "env.switch_every=100",
        "logging.root_dir=out",
        "logging.save_model=false",
        "--no-progress",
    )
    assert result.exit_code == 0, result.output
    (run_dir,) = (tiny.parent / "out" / "tiny").iterdir()
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["total_steps"] == 300
    assert not (run_dir / "model.zip").exists()


def test_list_shows_every_registry():
    result = run("list")
    assert result.exit_code == 0
    for word in (
        "agents:",
        "dqn",
        "ppo",
        "sequences:",
        "continual_minatar",
        "rlp/ContinualMinAtar-v0",
        "cartpole_shift",
        "interventions:",
        "configs:",
        "configs/quickstart.yaml",
    ):
        assert word in result.output
    only = run("list", "sequences").output
    assert "agents:" not in only and "permuted_minatar" in only


def test_train_help_documents_every_field():
    from rl_plasticity.config import (
        CheckpointConfig,
        DQNConfig,
        EnvConfig,
        EvalConfig,
        LoggingConfig,
        MonitorConfig,
        NetConfig,
        PPOConfig,
        RunConfig,
    )

    text = run("train", "--help").output
    for prefix, model in [
        ("", RunConfig),
        ("agent.", DQNConfig),
        ("agent.", PPOConfig),
        ("net.", NetConfig),
        ("env.", EnvConfig),
        ("logging.", LoggingConfig),
        ("monitor.", MonitorConfig),
        ("eval.", EvalConfig),
        ("checkpoint.", CheckpointConfig),
    ]:
        for field in model.model_fields:
            if not prefix and field in ("agent", "net", "env", "logging", "monitor", "eval", "checkpoint"):
                continue
            assert f"{prefix}{field} (" in text, f"{prefix}{field} missing from --help"


def test_settings_of_the_modules_below_the_runner_mirror_their_config_sections():
    # The monitor, evaluation and checkpoints take plain settings (they import no config): every key of their
    # section but `enabled` (the runner's switch) is a field, and the runner hands its validated value over.
    from dataclasses import asdict, fields

    from rl_plasticity.checkpoint import CheckpointSettings
    from rl_plasticity.config import CheckpointConfig, EvalConfig, MonitorConfig
    from rl_plasticity.evaluation import EvalSettings
    from rl_plasticity.monitor import MonitorSettings
    from rl_plasticity.runner import settings_from

    for section, settings in [
        (MonitorConfig(probe_every=7, probes=["rank"]), MonitorSettings),
        (EvalConfig(every=9, tasks="all"), EvalSettings),
        (CheckpointConfig(every=None, keep=3), CheckpointSettings),
    ]:
        assert {f.name for f in fields(settings)} == set(type(section).model_fields) - {"enabled"}, settings
        assert asdict(settings_from(section, settings)) == section.model_dump(exclude={"enabled"})


BAD = [
    (["agent.learnin_rate=1e-3"], ["agent.learnin_rate", "did you mean 'agent.learning_rate'"]),
    (["sed=3"], ["'sed'", "did you mean 'seed'"]),
    (["env.swtch_every=10"], ["env.swtch_every", "did you mean 'env.switch_every'"]),
    (["seed=abc"], ["seed", "integer"]),
    (["agent.learning_rate=fast"], ["agent.learning_rate", "number"]),
    (["agent.algo=sac"], ["agent.algo", "'sac'", "dqn, ppo"]),
    (["env.sequence=minatar_cycle"], ["env.sequence", "continual_minatar", "cartpole_shift"]),
    (["env.sequence=permuted_minatar", "env.options={game: pong}"], ["pong", "breakout", "space_invaders"]),
    (["env.options.colour=red"], ["colour", "param", "values"]),
    (["total_steps=0"], ["total_steps", "greater than 0"]),
    (["total_steps=-5"], ["total_steps", "greater than 0"]),
    (["env.switch_every=0"], ["env.switch_every", "greater than 0"]),
    (["env.order=shuffle"], ["env.order", "cyclic", "random", "explicit"]),
    (["env.order=explicit", "env.task_order=[0,7]"], ["task_order", "7"]),
    (["interventions=[nosuch]"], ["interventions[0]", "'nosuch'"]),
    (["intervention_params.nosuch.coef=1"], ["intervention_params.nosuch"]),
    (["device=gpu"], ["device", "cpu", "cuda"]),
    (["net.kind=resnet"], ["net.kind", "minatar", "mlp"]),
    (["seed"], ["seed", "key.sub=value"]),
    (["env.sequence=permuted_minatar", "env.options={num_tasks: abc}"], ["num_tasks", "integer"]),
    (["env.options.values=5"], ["values", "list of numbers"]),
    (["env.sequence=continual_minatar", "env.options={sticky_action_prob: 2.0}"], ["sticky_action_prob", "[0, 1]"]),
    (["name=a/../../x"], ["name"]),
    (["monitor.probes=[foo]"], ["monitor.probes", "rank"]),
    (["intervention_params.reset.layers=some"], ["intervention_params.reset.layers", "head"]),
    (["interventions=[rest]"], ["did you mean 'reset'"]),
    (["seed=[1"], ["override"]),
    # The L2 coefficient is `coef` (l2, l2_er) or `l2_coef` (kfac_rank, whose `coef` weighs its rank term).
    (["intervention_params.l2_er.wd=1e-3"], ["intervention_params.l2_er.wd", "coef", "er_lr"]),
    (["intervention_params.kfac_rank.wd=1e-3"], ["intervention_params.kfac_rank.wd", "l2_coef"]),
]


@pytest.mark.parametrize("overrides,words", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_input_one_line_exit_2_nothing_written(tiny: Path, overrides: list[str], words: list[str]):
    result = run("train", str(tiny), *overrides)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rlp: error: "), result.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert "Traceback" not in result.output
    assert not (tiny.parent / "runs").exists()


def test_preset_can_extend_a_base_preset(tiny: Path):
    child = tiny.parent / "child.yaml"
    child.write_text("base: tiny.yaml\nname: child\nseed: 7\n")
    from rl_plasticity.catalog import registries
    from rl_plasticity.config import load_config

    cfg = load_config(child, ["agent.gamma=0.9"], registries=registries())
    assert (cfg.name, cfg.seed, cfg.total_steps, cfg.agent.gamma, cfg.env.switch_every) == ("child", 7, 600, 0.9, 200)
    (tiny.parent / "loop.yaml").write_text("base: loop.yaml\n")
    result = run("train", str(tiny.parent / "loop.yaml"))
    assert result.exit_code == 2 and "loops back" in result.stderr


def test_missing_config_file(tiny: Path):
    result = run("train", "no_such_config.yaml")
    assert result.exit_code == 2
    assert "config file not found: no_such_config.yaml" in result.stderr and "quickstart" in result.stderr


def test_cuda_requested_without_cuda(tiny: Path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = run("train", str(tiny), "device=cuda")
    assert result.exit_code == 2 and "device" in result.stderr and "cpu" in result.stderr
    assert not (tiny.parent / "runs").exists()


def test_a_refused_kernel_choice_exits_2_with_its_line(tiny: Path, monkeypatch: pytest.MonkeyPatch):
    # The kernel check raises its own KernelError (it imports no config); the CLI ends it as any bad input.
    from rl_plasticity import runner
    from rl_plasticity.kernels import PORTABLE_ENV, KernelError

    for key, value in PORTABLE_ENV.items():  # what rlp train exports for portable, undone after the test
        monkeypatch.setenv(key, value)
    message = "cpu_kernels: 'portable' runs ATen's AVX2 kernels, but torch runs DEFAULT kernels here; valid: native"

    def refuse(choice: str) -> None:
        raise KernelError(message)

    monkeypatch.setattr(runner, "check_kernels", refuse)
    result = run("train", str(tiny), "cpu_kernels=portable", "threads=1")
    assert result.exit_code == 2 and result.stderr.strip().splitlines() == [f"rlp: error: {message}"]
    assert not (tiny.parent / "runs").exists()


def test_console_script_and_module_exit_2_without_traceback(tiny: Path):
    for cmd in ([str(Path(sys.executable).with_name("rlp"))], [sys.executable, "-m", "rl_plasticity"]):
        proc = subprocess.run([*cmd, "train", str(tiny), "agent.gama=0.9"], capture_output=True, text=True)
        assert proc.returncode == 2
        assert proc.stderr.strip().count("\n") == 0 and "did you mean 'agent.gamma'" in proc.stderr
        assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tiny.parent / "runs").exists()


@pytest.mark.parametrize(
    "argv,words",
    [
        (["train", "--bogus"], ["rlp train: error:", "--bogus", "rlp train --help"]),
        (["sweep", "quickstart", "--num-cpus", "0"], ["rlp sweep: error:", "--num-cpus", "x>=1"]),
        (["report"], ["rlp report: error:", "RUNS_DIR"]),
        (["list", "nothing"], ["rlp list: error:", "'nothing'", "interventions"]),
        (["nosuch"], ["rlp: error:", "nosuch"]),
    ],
)
def test_click_usage_errors_are_one_line_exit_2(argv: list[str], words: list[str]):
    result = CliRunner().invoke(cli, argv, prog_name="rlp")
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Usage:" not in result.stderr, result.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])


def test_bare_rlp_prints_the_help():
    result = CliRunner().invoke(cli, [], prog_name="rlp")
    assert result.exit_code == 0 and "Commands:" in result.stdout and "train" in result.stdout
