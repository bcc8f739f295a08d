"""The ``rlp`` command line: ``rlp train CONFIG [key=value ...]``, ``rlp train --resume RUN_DIR``,
``rlp sweep CONFIG --grid ... --seeds ...``, ``rlp report RUNS_DIR`` and ``rlp list [WHAT]``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from rl_plasticity.config import CONFIGS_DIR, ConfigError, config_help, load_config
from rl_plasticity.layout import CONFIG_FILE


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


class OneLineErrors(click.Group):
    """The ``rlp`` group: click's own usage errors (an unknown option, a value out of range) end like every
    other bad input here, with one line on stderr and exit status 2, instead of click's usage block."""

    def main(
        self,
        args: Any = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            status = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as exc:  # bare `rlp`: the help, as asked for
            click.echo(exc.ctx.get_help() if exc.ctx is not None else exc.format_message())
            sys.exit(0)
        except click.UsageError as exc:
            command = exc.ctx.command_path if exc.ctx is not None else (prog_name or "rlp")
            click.echo(f"{command}: error: {exc.format_message()} (see {command} --help)", err=True)
            sys.exit(2)
        except click.ClickException as exc:
            click.echo(f"rlp: error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("rlp: aborted", err=True)
            sys.exit(1)
        sys.exit(status if isinstance(status, int) else 0)


@click.group(cls=OneLineErrors, context_settings=dict(help_option_names=["-h", "--help"]))
def cli() -> None:
    """rl-plasticity: train DQN/PPO on changing tasks and watch plasticity signals in TensorBoard.

    \b
      rlp train configs/quickstart.yaml seed=3 agent.learning_rate=1e-4
      rlp sweep dqn_cartpole_shift --seeds 0-2 --grid 'interventions=[[],[reset]]'
      rlp report runs/dqn_cartpole_shift_sweep
      rlp list              # agents, task sequences, interventions, probes, configs
    """


@cli.command(
    "train",
    epilog="Config keys (override any of them as key.sub=value; lists as key=[a,b]):\n\n\b\n" + config_help(),
)
@click.argument("config", required=False)
@click.argument("overrides", nargs=-1)
@click.option(
    "--resume",
    "resume_dir",
    metavar="RUN_DIR",
    default=None,
    help="Continue the run in RUN_DIR from its latest checkpoint (CONFIG is then optional).",
)
@click.option("--force", is_flag=True, help="With --resume: accept a config that differs from RUN_DIR/config.yaml.")
@click.option("--progress/--no-progress", default=None, help="Show the progress bar (default: logging.progress_bar).")
def train_cmd(
    config: str | None, overrides: tuple[str, ...], resume_dir: str | None, force: bool, progress: bool | None
) -> None:
    """Train on CONFIG (a YAML file or a preset name from configs/), with key=value OVERRIDES.

    The run goes to <logging.root_dir>/<name>/<date-time>_seed<k>/: config.yaml, provenance.json
    (commit, library versions, CPU and command of each session), the TensorBoard events,
    task_summary.csv, checkpoints/ and model.zip.

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
      2  bad input: config, no usable checkpoint, changed config, a run another process is training
         (one line, nothing written)
      3  a non-finite loss, loss term, gradient, parameter or probe (NaN guard): one line naming the
         step, the term and the last good checkpoint, which is kept
      4  a file of the run cannot be written (full disk, read-only directory): one line naming the
         file and the last good checkpoint, which is kept intact
      130, 143  stopped by SIGINT, SIGTERM (after writing a checkpoint)

    \b
    Faults:
      One process writes a run: a second rlp train --resume on a run that is training is refused
      (exit 2, naming the holder's PID). A kill at any point, even inside a checkpoint write, loses
      no checkpoint: the resume starts from the newest complete one and removes what the kill left
      (it says so). A damaged checkpoint file is named, and the resume falls back to an older
      complete checkpoint if there is one (checkpoint.keep >= 2), else exits 2.
    """
    from rl_plasticity.catalog import registries
    from rl_plasticity.kernels import KernelError, export_env
    from rl_plasticity.rundirs import read_config

    try:
        if resume_dir is None:
            if config is None:
                fail("missing CONFIG (a YAML file or a preset name; or --resume RUN_DIR)")
            cfg = load_config(resolve_config(config), overrides, registries=registries())
        else:
            if config is not None and "=" in config and not Path(config).is_file():
                overrides, config = (config, *overrides), None  # only overrides after --resume RUN_DIR
            base = resolve_config(config) if config is not None else Path(resume_dir) / CONFIG_FILE
            cfg = load_config(base, overrides, registries=registries()) if config is not None or overrides else None
    except ConfigError as exc:
        fail(str(exc))
    # cpu_kernels=portable pins kernels through environment variables that ATen and MKL read when they first
    # run: set them before torch computes anything. The rest is imported only now (also so that `rlp list` and
    # `--help` stay fast).
    export_env(cfg.cpu_kernels if cfg is not None else read_config(Path(resume_dir)).get("cpu_kernels", "native"))
    from agents.plastic import NonFiniteError
    from rl_plasticity.checkpoint import CheckpointError, StorageError, TrainingInterrupted
    from rl_plasticity.runlock import RunInUse
    from rl_plasticity.runner import resume, train

    try:
        if resume_dir is None:
            run_dir = train(cfg, progress_bar=progress)
        else:
            run_dir = resume(resume_dir, cfg, force=force, progress_bar=progress)
    except (ConfigError, KernelError, CheckpointError, RunInUse) as exc:
        fail(str(exc))
    except StorageError as exc:
        click.echo(f"rlp: error: {exc.message()}", err=True)
        sys.exit(4)
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
@click.argument(
    "what", required=False, type=click.Choice(["agents", "sequences", "interventions", "probes", "configs"])
)
def list_cmd(what: str | None) -> None:
    """List what is available: agents, task sequences, interventions, probes and config presets."""
    from rl_plasticity.catalog import catalog

    for section, rows in catalog().items():
        if what not in (None, section):
            continue
        click.echo(f"{section}:")
        for name, text in rows:
            click.echo(f"  {name:<28} {text}")
        if not rows:
            click.echo("  (none yet)")


SWEEP_EPILOG = """\b
Grid syntax:
  --grid KEY=[V1,V2,...]   one trial per value, KEY set as an ordinary override (lists as in
                           rlp train: interventions=[[],[reset],[l2]] is three intervention lists).
                           Repeat --grid for more keys: the trials are their cartesian product.
  --arms NAME,NAME,...     named arms of --arms-file (default configs/arms.yaml), each a list of
                           overrides; crossed with the grid. 'fresh' in the list = --fresh.
  --fresh                  add the fresh-network arm: per seed and per task k of the sequence, the
                           base config (CONFIG and OVERRIDES, no intervention) on task k alone for
                           one env.switch_every (env.order=explicit env.task_order=[k]
                           total_steps=null). Its epsilon decays over the same env steps as a
                           continual run's first task with agent.exploration_steps (the study presets);
                           agent.exploration_fraction follows its own, shorter length. rlp report sets it
                           beside every visit of task k. A fresh trial that is the same run as the first
                           visit of a continual trial of its seed (fresh_task0 and the none arm: equal
                           configs but for the fresh keys, exploration_steps) is not run: sweep.json marks
                           it reused (reused_from) and rlp report takes that first visit.
  --no-fresh-reuse         run every fresh trial, even one that is a continual trial's first visit.
  --seeds 0-4 | 0,2,5 | 0-2,7   every trial once per seed.
  Quote the brackets in the shell: --grid 'interventions=[[],[reset]]'.

\b
Layout and resume:
  <out>/sweep.json                    the grid, each trial's overrides, config and status
  <out>/<label>/<date-time>_seed<k>/  each trial's run directory (label: arm and grid value,
                                      e.g. none, reset, learning_rate-0.001_width-64)
  <out>/logs/<label>_seed<k>.out/.err each trial's stdout and stderr
  Run the same command again to continue a sweep: finished trials are skipped, an interrupted
  one continues from its last checkpoint (rlp train --resume), a failed one is retried. A trial
  whose config differs from the one the sweep ran is refused. Ctrl-C (or SIGTERM) stops the
  running trials, each after writing a checkpoint.

\b
Examples:
  rlp sweep configs/interventions/base.yaml --seeds 0-4 --arms none,reset,l2,l2_er,kfac_rank,nc_reg --fresh
  rlp sweep dqn_cartpole_shift --seeds 0-2 --grid 'interventions=[[],[reset],[l2]]' env.switch_every=5000
  rlp sweep quickstart --seeds 0,1 --grid 'agent.learning_rate=[1e-3,1e-4]' --grid 'net.width=[64,128]'
  rlp sweep CONFIG --address auto ...      on an existing Ray cluster (shared filesystem, project
                                           installed on every node at the same path); with token
                                           authentication (Ray's default for ray start --head when a
                                           token exists) set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN
                                           (or copy the head's ~/.ray/auth_token here)
  rlp sweep CONFIG ... --dry-run           list the trials and their state, write nothing

\b
Exit status:
  0  every trial finished     1  some trials failed (listed, with their error and log)
  2  bad input (one line, nothing written)   130, 143  stopped by SIGINT, SIGTERM
"""


@cli.command("sweep", epilog=SWEEP_EPILOG)
@click.argument("config")
@click.argument("overrides", nargs=-1)
@click.option("--seeds", default=None, metavar="SEEDS", help="Seeds: 0-4, 0,2,5 or 0-2,7 (default: the config's seed).")
@click.option(
    "--grid",
    "grids",
    multiple=True,
    metavar="KEY=[V1,...]",
    help="A grid axis: one trial per value (repeatable: cartesian product).",
)
@click.option("--arms", default=None, metavar="NAMES", help="Named arms of --arms-file, comma-separated.")
@click.option(
    "--arms-file",
    type=click.Path(path_type=Path),
    default=None,
    metavar="FILE",
    help="YAML with 'arms: {name: [override, ...]}' (default: configs/arms.yaml).",
)
@click.option("--fresh", is_flag=True, help="Add the fresh-network arm (see below).")
@click.option(
    "--no-fresh-reuse",
    "fresh_reuse",
    flag_value=False,
    default=True,
    help="Run fresh_task<k> even where a continual trial's first visit is the same run (see below).",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    metavar="DIR",
    help="The sweep directory (default: <logging.root_dir>/<name>_sweep of CONFIG).",
)
@click.option(
    "--address",
    default=None,
    metavar="ADDRESS",
    help="Join this Ray cluster (auto, HOST:6379, ray://HOST:10001); default: start a local Ray.",
)
@click.option(
    "--num-cpus",
    type=click.IntRange(min=1),
    default=None,
    help="CPUs of the local Ray (default: all of this machine's).",
)
@click.option(
    "--cpus-per-trial",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="CPUs Ray reserves for each trial; its torch threads are set to match (threads=N).",
)
@click.option(
    "--max-concurrent",
    type=click.IntRange(min=1),
    default=None,
    help="At most this many trials at once (default: as many as the CPUs allow).",
)
@click.option("--sequential", is_flag=True, help="Run the trials one after another without Ray.")
@click.option("--dry-run", is_flag=True, help="List the trials (and what a run would do) and stop.")
def sweep_cmd(
    config: str,
    overrides: tuple[str, ...],
    seeds: str | None,
    grids: tuple[str, ...],
    arms: str | None,
    arms_file: Path | None,
    fresh: bool,
    fresh_reuse: bool,
    out: Path | None,
    address: str | None,
    num_cpus: int | None,
    cpus_per_trial: int,
    max_concurrent: int | None,
    sequential: bool,
    dry_run: bool,
) -> None:
    """Run CONFIG (a YAML file or a preset name) over a grid of arms and seeds, each trial an ordinary
    `rlp train` run with the trial's overrides on top of OVERRIDES, side by side on Ray.

    Ray is an optional extra: pip install -c constraints.txt -e ".[distributed]". Without --address a
    local Ray is started on this machine; each trial gets --cpus-per-trial CPUs (default 1), so on 2
    cores two trials run at once. Every trial's config is checked before anything starts.
    """
    from rl_plasticity.rundirs import trial_state
    from rl_plasticity.sweep import SweepError, build_plan, parse_seeds, run_sweep

    try:
        plan = build_plan(
            resolve_config(config),
            overrides,
            grids,
            [a.strip() for a in arms.split(",") if a.strip()] if arms else [],
            arms_file or CONFIGS_DIR / "arms.yaml",
            fresh,
            parse_seeds(seeds) if seeds else None,
            out,
            cpus_per_trial,
            fresh_reuse,
        )
        if dry_run:
            click.echo(f"sweep: {len(plan.trials)} trials in {plan.sweep_dir} (dry run: nothing is written)")
            for trial in plan.trials:
                state = trial_state(plan.sweep_dir, trial.label, trial.seed)
                what = (
                    f"reused ({trial.reused_from})"
                    if trial.reused_from is not None
                    else "start"
                    if state is None
                    else "skip (finished)"
                    if state.complete
                    else f"resume ({state.describe()})"
                )
                click.echo(f"  {trial.id:<32} {what:<16} {' '.join(trial.overrides)}")
            return
        summary = run_sweep(
            plan,
            ["rlp", *sys.argv[1:]] if sys.argv else [],
            sequential=sequential,
            address=address,
            num_cpus=num_cpus,
            max_concurrent=max_concurrent,
            echo=click.echo,
        )
    except SweepError as exc:
        fail(str(exc))
    sys.exit(summary.exit_status)


@cli.command("report")
@click.argument("runs_dir", type=click.Path(path_type=Path))
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    metavar="DIR",
    help="Where the report goes (default: RUNS_DIR/report).",
)
@click.option(
    "--points",
    type=click.IntRange(min=2),
    default=200,
    show_default=True,
    help="Steps of the common grid the curves are interpolated onto.",
)
@click.option(
    "--resamples",
    type=click.IntRange(min=100),
    default=10_000,
    show_default=True,
    help="Bootstrap resamples per table cell (curves: at most 2000 per point).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the bootstrap.")
def report_cmd(runs_dir: Path, out: Path | None, points: int, resamples: int, seed: int) -> None:
    """Tables, plots and CSV files over the runs under RUNS_DIR (a sweep directory, or any folder of runs).

    \b
    It reads each run's TensorBoard events (EventAccumulator) and task_summary.csv, and writes to --out:
      report.md          per arm, the mean and final return over the visits after the first, raw
                         and relative to the fresh network's on the same task (mean [95% CI], IQM);
                         per task visit, a table of the arms: mean return over the visit, final
                         return (with their IQM) and the main probes at the end of the visit
                         (effective rank, dormant fraction, NC1, K-FAC epsilon-rank), each as
                         mean [95% percentile-bootstrap CI] over seeds; which runs are incomplete;
                         the NC1-return correlation across task visits (Pearson with CI, Spearman);
                         each probe at a task switch against the next visit's return, pooled,
                         within arms and within arm and switch (does a probe warn first?)
      return.png, erank.png, dormant.png, nc1.png, kfac_eps_rank.png, nc1_vs_return.png
                         mean curve per arm with a shaded 95% band, task switches as vertical lines
      runs.csv, visits_by_run.csv, visits.csv, sequence.csv, curves.csv, correlation.csv,
      lead.csv           the same data
      provenance.csv     every run's commit, machine and kernels (from its provenance.json);
                         a warning is printed when they differ between runs
    Arms come from the sweep's sweep.json, else from each run's interventions ("none" without any;
    "fresh" for a run on one task alone); a fresh trial the sweep reused (sweep.json: reused) is its source
    trial's first visit. A partly finished sweep is fine: incomplete runs are listed
    and what they have is used (complete visits; curves up to their last log).

    \b
    Example:
      rlp report runs/minatar_reduced_sweep            # -> runs/minatar_reduced_sweep/report/report.md
    """
    from rl_plasticity.report import ReportError, make_report

    try:
        report = make_report(runs_dir, out, points=points, n_resamples=resamples, seed=seed)
    except ReportError as exc:
        fail(str(exc))
    incomplete = report.incomplete
    click.echo(
        f"report: {len(report.runs)} runs, {len(incomplete)} incomplete"
        + (": " + ", ".join(str(r.path) for r in incomplete) if incomplete else "")
    )
    if report.provenance is not None and report.provenance.warning() is not None:
        click.echo(report.provenance.warning())
    for path in report.files:
        click.echo(f"  {path}")


def main() -> None:
    """Entry point of the ``rlp`` console script."""
    cli(prog_name="rlp")
