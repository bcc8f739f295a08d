"""The ``rlp`` command line: ``rlp train CONFIG [key=value ...]``, ``rlp train --resume RUN_DIR`` and
``rlp list [WHAT]``."""

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
@click.argument("config", required=False)
@click.argument("overrides", nargs=-1)
@click.option("--resume", "resume_dir", metavar="RUN_DIR", default=None,
              help="Continue the run in RUN_DIR from its latest checkpoint (CONFIG is then optional).")
@click.option("--force", is_flag=True, help="With --resume: accept a config that differs from RUN_DIR/config.yaml.")
@click.option("--progress/--no-progress", default=None, help="Show the progress bar (default: logging.progress_bar).")
def train_cmd(config: str | None, overrides: tuple[str, ...], resume_dir: str | None, force: bool,
              progress: bool | None) -> None:
    """Train on CONFIG (a YAML file or a preset name from configs/), with key=value OVERRIDES.

    The run goes to <logging.root_dir>/<name>/<date-time>_seed<k>/: config.yaml, the TensorBoard
    events, task_summary.csv, checkpoints/ and model.zip.

    \b
    Checkpoints and resume:
      every checkpoint.every env steps, at the end and on SIGINT/SIGTERM, a checkpoint is written
      atomically to RUN_DIR/checkpoints/ (model, optimizer, replay buffer, env states, RNGs,
      interventions, monitor). A signal finishes the current rollout, writes a checkpoint and exits
      with status 130 (SIGINT) or 143 (SIGTERM); a second signal stops at once.
      rlp train --resume RUN_DIR                  continue RUN_DIR exactly where it stopped
      rlp train --resume RUN_DIR key=value ...    the same, with overrides of RUN_DIR/config.yaml
      rlp train --resume RUN_DIR CONFIG [k=v ...] the same, checked against CONFIG
    A config that differs from RUN_DIR/config.yaml is refused with the differing keys listed, unless
    --force (then total_steps=... extends a finished run); seed, agent.algo, agent.buffer_size, net.*,
    env.* and interventions can never change.

    \b
    Exit status:
      0  done
      2  bad input: config, missing or corrupt checkpoint, changed config (one line, nothing written)
      3  a non-finite loss, loss term, gradient, parameter or probe (NaN guard): one line naming the
         step, the term and the last good checkpoint, which is kept
      130, 143  stopped by SIGINT, SIGTERM (after writing a checkpoint)
    """
    # Imported here so that `rlp list` and `--help` stay fast.
    from agents.plastic import NonFiniteError
    from rl_plasticity.checkpoint import CheckpointError, TrainingInterrupted
    from rl_plasticity.runner import resume, train

    try:
        if resume_dir is None:
            if config is None:
                fail("missing CONFIG (a YAML file or a preset name; or --resume RUN_DIR)")
            run_dir = train(load_config(resolve_config(config), overrides), progress_bar=progress)
        else:
            if config is not None and "=" in config and not Path(config).is_file():
                overrides, config = (config, *overrides), None  # only overrides after --resume RUN_DIR
            base = resolve_config(config) if config is not None else Path(resume_dir) / "config.yaml"
            cfg = load_config(base, overrides) if config is not None or overrides else None
            run_dir = resume(resume_dir, cfg, force=force, progress_bar=progress)
    except (ConfigError, CheckpointError) as exc:
        fail(str(exc))
    except TrainingInterrupted as exc:
        click.echo(f"rlp: {exc.message()}", err=True)
        sys.exit(exc.exit_status)
    except NonFiniteError as exc:
        last = getattr(exc, "checkpoint", None)
        kept = f"last good checkpoint: {last}" if last is not None else "no checkpoint was written before it"
        click.echo(f"rlp: error: {exc}; training stopped, logs flushed; {kept}", err=True)
        sys.exit(3)
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
