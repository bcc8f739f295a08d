"""Run a sweep's trials on Ray (or one after another), skip finished ones and keep ``sweep.json`` current.

Each trial is a Ray task that asks for ``cpus_per_trial`` CPUs and runs :func:`execute_trial` (an ordinary
``rlp train`` in a subprocess), so Ray's scheduler runs as many side by side as the CPUs allow. The driver
is the only writer of the manifest; it records each outcome as it arrives, so a sweep that dies can be run
again with the same command and continues: finished trials are skipped, interrupted ones resumed from
their last checkpoint, failed ones retried.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rl_plasticity.layout import LOCK_FILE
from rl_plasticity.rundirs import trial_runs, trial_state
from rl_plasticity.runlock import exclusive_lock, is_locked
from rl_plasticity.sweep.grid import SweepError
from rl_plasticity.sweep.plan import SweepPlan, Trial, check_sweep_dir, new_manifest, write_manifest
from rl_plasticity.sweep.trial import TrialJob, TrialOutcome, execute_trial

INSTALL_HINT = (
    'Ray is not installed: install it with pip install -c constraints.txt -e ".[distributed]" '
    "(or run with --sequential)"
)
#: Object store of a local Ray: the tasks pass a few hundred bytes each, so the default (30% of RAM) is waste.
LOCAL_OBJECT_STORE = 128 * 1024**2
#: What a client of a cluster with token authentication needs (Ray turns it on for ``ray start --head``
#: when a token exists, e.g. the one a local ``ray.init()`` wrote to ~/.ray/auth_token).
TOKEN_HINT = (
    "set RAY_AUTH_MODE=token and the cluster's token: RAY_AUTH_TOKEN=<token> or the head node's "
    "~/.ray/auth_token copied to this machine (ray get-auth-token on the head prints it)"
)


@dataclass
class SweepSummary:
    """What a run of the sweep did."""

    finished: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    failed: list[TrialOutcome] = field(default_factory=list)
    interrupted: list[str] = field(default_factory=list)
    signal: int | None = None

    @property
    def exit_status(self) -> int:
        """0 every trial finished, 1 some failed, 130/143 stopped by SIGINT/SIGTERM."""
        if self.signal is not None:
            return 128 + self.signal
        return 1 if self.failed else 0


class _Stop(KeyboardInterrupt):
    """SIGTERM to the driver, raised where it waits; a KeyboardInterrupt, so a trial's run is stopped with a
    checkpoint exactly as on Ctrl-C."""


def require_ray() -> Any:
    """Import Ray, or fail with one line saying how to install it.

    :raises SweepError: Ray is not installed.
    """
    try:
        import ray
    except ImportError:
        raise SweepError(INSTALL_HINT) from None
    return ray


def job_for(plan: SweepPlan, trial: Trial) -> TrialJob:
    """The plain-data job a worker runs for ``trial``."""
    return TrialJob(
        trial.id,
        trial.label,
        trial.seed,
        str(plan.config),
        tuple(trial.run_overrides(plan.sweep_dir, plan.cpus_per_trial)),
        str(plan.sweep_dir),
        plan.cpus_per_trial,
    )


def run_sweep(
    plan: SweepPlan,
    command: list[str],
    *,
    sequential: bool = False,
    address: str | None = None,
    num_cpus: int | None = None,
    max_concurrent: int | None = None,
    echo: Callable[[str], None] = print,
) -> SweepSummary:
    """Run every trial of ``plan`` that is not finished yet, and record each outcome in ``sweep.json``.

    :param command: the command line, kept in the manifest.
    :param sequential: run the trials one after another in this process, without Ray.
    :param address: join the Ray cluster at this address (``auto``, ``ray://host:10001``, ``host:6379``);
        without it a local Ray with ``num_cpus`` CPUs (default: all of this machine's) is started.
    :param max_concurrent: at most this many trials at once (default: as many as the CPUs allow).
    :raises SweepError: the sweep directory holds another sweep, Ray is missing, or cannot start or join
        (nothing is written then).
    """
    old = check_sweep_dir(plan)
    ray = None if sequential else require_ray()
    summary = SweepSummary()
    todo: list[Trial] = []
    for trial in plan.trials:
        state = trial_state(plan.sweep_dir, trial.label, trial.seed)
        if trial.reused_from is not None:
            summary.reused.append(trial.id)
        elif state is not None and state.complete:
            summary.skipped.append(trial.id)
        else:
            todo.append(trial)
    if ray is not None and todo:
        _ray_init(ray, address, num_cpus, plan.cpus_per_trial)  # before anything is written: it may fail
    try:
        plan.sweep_dir.mkdir(parents=True, exist_ok=True)
        with _exclusive(plan.sweep_dir):
            return _run_locked(
                plan, command, old, ray, summary, todo, sequential, address, num_cpus, max_concurrent, echo
            )
    finally:
        if ray is not None and ray.is_initialized():
            ray.shutdown()


@contextlib.contextmanager
def _exclusive(sweep_dir: Path) -> Iterator[None]:
    """Hold ``<sweep dir>/.lock`` while the sweep runs: a second driver on the same directory would restart
    or remove the trials the first one is running.

    :raises SweepError: another ``rlp sweep`` holds it.
    """

    def running() -> SweepError:
        return SweepError(f"--out: another rlp sweep is running on {sweep_dir}; wait for it or stop it")

    with exclusive_lock(sweep_dir / LOCK_FILE, running):
        yield


def _run_locked(
    plan: SweepPlan,
    command: list[str],
    old: dict[str, Any] | None,
    ray: Any,
    summary: SweepSummary,
    todo: list[Trial],
    sequential: bool,
    address: str | None,
    num_cpus: int | None,
    max_concurrent: int | None,
    echo: Callable[[str], None],
) -> SweepSummary:
    manifest = new_manifest(plan, old, command)
    for trial_id in summary.skipped:
        state = trial_state(plan.sweep_dir, plan.trial(trial_id).label, plan.trial(trial_id).seed)
        manifest["trials"][trial_id].update(
            status="finished", run_dir=_rel(plan, state.run_dir if state else None), error=None
        )
    write_manifest(plan.sweep_dir, manifest)

    where = (
        "one after another (--sequential)"
        if sequential
        else (
            f"on the Ray cluster at {address}" if address else f"on a local Ray with {num_cpus or os.cpu_count()} CPUs"
        )
    )
    echo(
        f"sweep: {len(plan.trials)} trials in {plan.sweep_dir}; {len(summary.skipped)} finished already (skipped), "
        + (f"{len(summary.reused)} reused (a continual trial's first visit), " if summary.reused else "")
        + f"{len(todo)} to run {where}, {plan.cpus_per_trial} CPU(s) each"
    )

    def record(outcome: TrialOutcome, done: int) -> None:
        entry = manifest["trials"][outcome.trial_id]
        entry.update(
            status=outcome.status,
            run_dir=_rel(plan, outcome.run_dir),
            error=outcome.error,
            exit_code=outcome.exit_code,
            seconds=round(outcome.seconds, 1),
            attempts=int(entry.get("attempts", 0)) + 1,
        )
        write_manifest(plan.sweep_dir, manifest)
        if outcome.status == "finished":
            summary.finished.append(outcome.trial_id)
            what = f"{outcome.mode}, finished in {outcome.seconds:.1f} s: {entry['run_dir']}"
        elif outcome.status == "interrupted":
            summary.interrupted.append(outcome.trial_id)
            what = f"interrupted: {outcome.error}"
        else:
            summary.failed.append(outcome)
            what = f"FAILED ({outcome.mode}): {outcome.error}; logs: logs/{plan.trial(outcome.trial_id).log_stem}.err"
        echo(f"[{done}/{len(todo)}] {outcome.trial_id} {what}")

    jobs = [job_for(plan, trial) for trial in todo]
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum: int, frame: object) -> None:
        summary.signal = signum  # remembered here: Ray's wait turns any exception into KeyboardInterrupt
        raise _Stop()

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        if sequential:
            _run_sequential(jobs, record, summary)
        elif jobs:
            _run_ray(ray, jobs, record, summary, max_concurrent, plan.cpus_per_trial, echo)
    finally:
        signal.signal(signal.SIGTERM, previous)
        if summary.signal is not None:
            for trial_id in summary.interrupted:
                manifest["trials"][trial_id]["status"] = "interrupted"
            write_manifest(plan.sweep_dir, manifest)

    echo(
        f"sweep: {len(summary.finished)} finished, {len(summary.failed)} failed, {len(summary.skipped)} skipped"
        + (f", {len(summary.reused)} reused" if summary.reused else "")
        + (f", {len(summary.interrupted)} interrupted" if summary.interrupted else "")
        + f"; manifest: {plan.sweep_dir / 'sweep.json'}"
    )
    for outcome in summary.failed:
        echo(f"  failed: {outcome.trial_id}: {outcome.error}")
    if summary.signal is not None:
        echo(f"sweep: stopped by {signal.Signals(summary.signal).name}; run the same command again to resume")
    else:
        echo(f"report: rlp report {plan.sweep_dir}")
    return summary


def _rel(plan: SweepPlan, path: Any) -> str | None:
    """A run directory relative to the sweep directory (the manifest stays valid if the sweep is moved)."""
    if path is None:
        return None
    try:
        return str(os.path.relpath(path, plan.sweep_dir))
    except ValueError:
        return str(path)


def _run_sequential(jobs: list[TrialJob], record: Callable[[TrialOutcome, int], None], summary: SweepSummary) -> None:
    try:
        for done, job in enumerate(jobs, 1):
            outcome = execute_trial(job)  # a signal while it waits stops the run with a checkpoint
            record(outcome, done)
            if outcome.status == "interrupted":
                if summary.signal is None:
                    summary.signal = signal.SIGTERM if outcome.exit_code == 143 else signal.SIGINT
                return
    except KeyboardInterrupt:  # between two trials: nothing is running
        summary.signal = summary.signal or signal.SIGINT


def _ray_init(ray: Any, address: str | None, num_cpus: int | None, cpus_per_trial: int) -> None:
    """Join the cluster at ``address``, or start a local Ray on this machine; check it has the CPUs a trial asks.

    :raises SweepError: Ray does not start, the cluster cannot be joined, or it has too few CPUs.
    """
    kwargs: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.WARNING}
    try:
        if address:
            ray.init(address=address, **kwargs)
        else:
            # address="local": a Ray of its own, never one that `ray start` left running (RAY_ADDRESS, or Ray's
            # record of the last cluster started on this machine, would otherwise be joined silently).
            ray.init(
                address="local",
                num_cpus=num_cpus or os.cpu_count(),
                include_dashboard=False,
                object_store_memory=LOCAL_OBJECT_STORE,
                **kwargs,
            )
    except (ConnectionError, ValueError, RuntimeError, ray.exceptions.RayError) as exc:
        if not address:
            raise SweepError(f"--num-cpus: cannot start Ray ({' '.join(str(exc).split())[:300]})") from None
        raise SweepError(_join_error(address, exc)) from None
    total = ray.cluster_resources().get("CPU", 0)
    if total < cpus_per_trial:
        ray.shutdown()
        raise SweepError(f"--cpus-per-trial: {cpus_per_trial} CPUs per trial, but the Ray cluster has {total:g}")


def _join_error(address: str, exc: BaseException) -> str:
    """One line for a failed join: a token problem says what to set, anything else also says it if the
    client has not turned token authentication on (the most common reason on Ray >= 2.52)."""
    chain, cause = [], exc
    while cause is not None and len(chain) < 5:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    if any(type(e).__name__ == "AuthenticationError" or "InvalidAuthToken" in str(e) for e in chain):
        mode = os.environ.get("RAY_AUTH_MODE")
        now = f"RAY_AUTH_MODE is {mode!r} here" if mode else "RAY_AUTH_MODE is not set here"
        return (
            f"--address: cannot join Ray at {address}: the cluster uses token authentication and this "
            f"client has no matching token ({now}); {TOKEN_HINT}"
        )
    first = " ".join(str(exc).split())[:300]
    hint = (
        f"; if the cluster uses token authentication, {TOKEN_HINT}" if os.environ.get("RAY_AUTH_MODE") is None else ""
    )
    return f"--address: cannot join Ray at {address} ({first}){hint}"


def _run_ray(
    ray: Any,
    jobs: list[TrialJob],
    record: Callable[[TrialOutcome, int], None],
    summary: SweepSummary,
    max_concurrent: int | None,
    cpus_per_trial: int,
    echo: Callable[[str], None],
) -> None:
    """Submit the trials as Ray tasks and record each outcome as it arrives (the caller shuts Ray down)."""
    # max_retries=0: a trial that fails is reported, not rerun (a rerun of the sweep resumes it).
    remote = ray.remote(num_cpus=cpus_per_trial, max_retries=0)(execute_trial)
    limit = max_concurrent or len(jobs)
    pending = list(jobs)
    running: dict[Any, TrialJob] = {}
    done = 0
    try:
        while pending or running:
            while pending and len(running) < limit:
                job = pending.pop(0)
                running[remote.remote(job)] = job
            ready, _ = ray.wait(list(running), num_returns=1)
            for ref in ready:
                job = running.pop(ref)
                done += 1
                record(_result(ray, ref, job), done)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (on_sigterm has set summary.signal)
        summary.signal = summary.signal or signal.SIGINT
        # Every trial is submitted at once, so Ray holds some queued: a trial has started when its run is held.
        started = {job.trial_id for job in running.values() if _run_held(job)}
        queued = len(running) - len(started)
        echo(
            f"sweep: stopping {len(started)} running trial(s); each writes a checkpoint first"
            + (f"; {queued} queued trial(s) will not start" if queued else "")
        )
        for ref in running:
            ray.cancel(ref)  # KeyboardInterrupt in the task: it SIGTERMs its run and waits for it
        try:
            ray.wait(list(running), num_returns=len(running))
        except KeyboardInterrupt:  # a second Ctrl-C: stop waiting (the runs still get SIGTERM on shutdown)
            pass
        name = signal.Signals(summary.signal).name
        for job in running.values():
            done += 1
            state = trial_state(job.sweep_dir, job.label, job.seed)
            if job.trial_id in started:
                why = f"stopped by {name} ({state.describe() if state else 'no checkpoint yet'})"
            else:
                why = f"not started: {name} came first" + (f" ({state.describe()})" if state else "")
            record(
                TrialOutcome(job.trial_id, "interrupted", "started", state and str(state.run_dir), None, why, 0.0),
                done,
            )


def _run_held(job: TrialJob) -> bool:
    """Whether a run of the trial is being written now (its ``rlp train`` holds the run's lock)."""
    return any(is_locked(run.run_dir) for run in trial_runs(Path(job.sweep_dir), job.label, job.seed))


def _result(ray: Any, ref: Any, job: TrialJob) -> TrialOutcome:
    """The task's outcome; a task that died in Ray (a lost worker or node) is a failed trial."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayError as exc:
        first = next(iter(str(exc).strip().splitlines()), type(exc).__name__)
        # Its run got SIGTERM when the worker died (trial.py), so it has a checkpoint to resume from.
        state = trial_state(job.sweep_dir, job.label, job.seed)
        where = f" ({state.describe()})" if state is not None else ""
        return TrialOutcome(
            job.trial_id,
            "failed",
            "started",
            state and str(state.run_dir),
            None,
            f"Ray: {type(exc).__name__}: {first}{where}",
            0.0,
        )
