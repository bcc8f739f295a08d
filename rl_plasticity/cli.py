"""The ``rlp`` command line: ``rlp train CONFIG [key=value ...]`` and ``rlp list [WHAT]``."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from rl_plasticity.config import CONFIGS_DIR, ConfigError, config_help, load_config


def fail(message: str) -> None:
    """One line on stderr and exit status 2: how every bad input ends."""
    click.echo(f"rlp: error: {message}", err=True)
    sys.exit(2)


def resolve_config(name: str) -> Path:
    """A config path as given, or the name of a preset in ``configs/`` (with or without ``.yaml``)."""
    path = Path(name)
    if path.is_file():
        return path
    for candidate in (CONFIGS_DIR / name, CONFIGS_DIR / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    presets = ", ".join(sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml")))
    fail(f"config file not found: {name} (presets: {presets})")
    raise AssertionError  # unreachable: fail() exits


@click.group(context_settings=dict(help_option_names=["-h", "--help"]))
def cli() -> None:
    """rl-plasticity: train DQN/PPO on changing tasks and watch plasticity signals in TensorBoard.

    \b
      rlp train configs/quickstart.yaml seed=3 agent.learning_rate=1e-4
      rlp list              # agents, task sequences, interventions, configs
    """


@cli.command(
    "train",
    epilog="Config keys (override any of them as key.sub=value; lists as key=[a,b]):\n\n\b\n" + config_help(),
)
@click.argument("config")
@click.argument("overrides", nargs=-1)
@click.option("--progress/--no-progress", default=None, help="Show the progress bar (default: logging.progress_bar).")
def train_cmd(config: str, overrides: tuple[str, ...], progress: bool | None) -> None:
    """Train on CONFIG (a YAML file or a preset name from configs/), with key=value OVERRIDES.

    The run goes to <logging.root_dir>/<name>/<date-time>_seed<k>/: config.yaml, the TensorBoard
    events and model.zip. A bad key or value prints one line and exits with status 2, writing nothing.
    """
    # Imported here so that `rlp list` and `--help` stay fast.
    from rl_plasticity.runner import train

    try:
        cfg = load_config(resolve_config(config), overrides)
        run_dir = train(cfg, progress_bar=progress)
    except ConfigError as exc:
        fail(str(exc))
    click.echo(f"run directory: {run_dir}")
    click.echo(f"to watch it:   tensorboard --logdir {run_dir.parent}")


@cli.command("list")
@click.argument("what", required=False, type=click.Choice(["agents", "sequences", "interventions", "configs"]))
def list_cmd(what: str | None) -> None:
    """List what is available: agents, task sequences, interventions and config presets."""
    from rl_plasticity.catalog import catalog

    for section, rows in catalog().items():
        if what not in (None, section):
            continue
        click.echo(f"{section}:")
        for name, text in rows:
            click.echo(f"  {name:<28} {text}")
        if not rows:
            click.echo("  (none yet)")


def main() -> None:
    """Entry point of the ``rlp`` console script."""
    cli(prog_name="rlp")
