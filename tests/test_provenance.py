"""Provenance: ``provenance.json`` of a run (commit, versions, CPU, torch's kernels, command line), kept and
extended on resume; ``rlp report`` lists the runs' commits and machines and warns when they differ."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch as th
from click.testing import CliRunner

import rl_plasticity.provenance as provenance
from rl_plasticity.cli import cli
from rl_plasticity.layout import PROVENANCE_FILE
from rl_plasticity.provenance import cpu_info, git_state, read_sessions
from rl_plasticity.report import make_report

TINY = """\
name: tiny
seed: 1
total_steps: 300
threads: 1
agent: {algo: dqn, learning_starts: 50, buffer_size: 1000, batch_size: 16, train_freq: 4, target_update_interval: 50}
net: {kind: mlp, width: 8, depth: 1}
env: {sequence: cartpole_shift, switch_every: 100}
logging: {progress_bar: false, root_dir: out}
monitor: {enabled: false}
checkpoint: {every: 100}
"""

needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout.strip()


def cli_run(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


@pytest.fixture
def tiny_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A finished tiny run (300 steps), trained through the CLI in ``tmp_path``."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.yaml").write_text(TINY)
    monkeypatch.setattr(sys, "argv", ["rlp", "train", "tiny.yaml", "seed=1"])
    result = cli_run("train", "tiny.yaml", "seed=1")
    assert result.exit_code == 0, result.output
    (run_dir,) = (tmp_path / "out" / "tiny").iterdir()
    return run_dir


# -- the git state -------------------------------------------------------------------------------------------


@needs_git
def test_git_state_commit_dirty_and_unknown(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / "a.py").write_text("x = 1\n")
    git(repo, "add", "a.py")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "one")
    assert git_state(repo) == {"commit": git(repo, "rev-parse", "HEAD"), "dirty": False}

    (repo / "b.py").write_text("untracked\n")  # untracked files do not make the tree dirty
    assert git_state(repo)["dirty"] is False
    (repo / "a.py").write_text("x = 2\n")
    state = git_state(repo)
    assert state["dirty"] is True and state["commit"] == git(repo, "rev-parse", "HEAD")
    diff = subprocess.run(["git", "-C", str(repo), "diff", "HEAD"], capture_output=True, check=True).stdout
    assert state["diff_sha256"] == hashlib.sha256(diff).hexdigest()

    # A folder inside a checkout is not that checkout's code (an installed copy in a venv kept in a repo).
    (repo / "venv" / "site-packages").mkdir(parents=True)
    assert git_state(repo / "venv" / "site-packages") == {"commit": "unknown", "dirty": "unknown"}
    plain = tmp_path / "plain"
    plain.mkdir()
    assert git_state(plain) == {"commit": "unknown", "dirty": "unknown"}
    monkeypatch.setenv("PATH", str(tmp_path / "no-git-here"))  # git missing
    assert git_state(repo) == {"commit": "unknown", "dirty": "unknown"}


def test_cpu_info_parses_the_first_processor(tmp_path: Path):
    fake = tmp_path / "cpuinfo"
    fake.write_text(
        "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Gold 6230 CPU\n"
        "flags\t\t: fpu sse4_1 sse4_2 avx avx2 fma avx512f avx512bw\n\n"
        "processor\t: 1\nmodel name\t: Something Else\n"
    )
    assert cpu_info(fake) == {
        "cpu": "Intel(R) Xeon(R) Gold 6230 CPU",
        "cpu_vendor": "GenuineIntel",
        "cpu_flags": ["sse4_1", "sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw"],
    }
    missing = cpu_info(tmp_path / "none")
    assert missing["cpu"] == (platform.processor() or "unknown") and missing["cpu_flags"] == "unknown"


# -- a run's provenance.json ------------------------------------------------------------------------------------


def test_run_records_its_provenance(tiny_run: Path):
    (session,) = read_sessions(tiny_run)
    assert json.loads((tiny_run / PROVENANCE_FILE).read_text())["format"] == 1
    assert session["kind"] == "train" and "resumed_at" not in session
    assert session["command"] == ["rlp", "train", "tiny.yaml", "seed=1"]

    root = Path(provenance.__file__).resolve().parents[1]
    if shutil.which("git") and (root / ".git").exists():
        assert session["code"]["commit"] == git(root, "rev-parse", "HEAD")
        dirty = bool(git(root, "status", "--porcelain", "--untracked-files=no"))
        assert session["code"]["dirty"] is dirty
    for name in ("torch", "stable-baselines3", "gymnasium", "MinAtar", "numpy"):
        assert session["versions"][name] == importlib.metadata.version(name)
    assert session["versions"]["python"] == platform.python_version()

    # The CPU as /proc/cpuinfo names it (read here with a regular expression, not the module's parser).
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.MULTILINE)
        if model:
            assert session["machine"]["cpu"] == model.group(1).strip()
    assert session["machine"]["hostname"] == platform.node()
    # torch as the run had it: threads=1 from the config, the kernels torch chose, its build.
    torch_info = session["torch"]
    assert torch_info["num_threads"] == 1
    assert torch_info["cpu_capability"] == th.backends.cpu.get_cpu_capability()
    assert torch_info["mkldnn_enabled"] == th.backends.mkldnn.enabled
    assert torch_info["build"] == th.__config__.show()
    assert "at::get_num_threads() : 1" in torch_info["parallel_info"]


def test_resume_keeps_the_first_session_and_adds_its_own(tiny_run: Path, monkeypatch: pytest.MonkeyPatch):
    (first,) = read_sessions(tiny_run)
    monkeypatch.setattr(sys, "argv", ["rlp", "train", "--resume", str(tiny_run)])
    monkeypatch.setenv("MKL_CBWR", "COMPATIBLE")
    result = cli_run("train", "--resume", str(tiny_run), "--force", "total_steps=400")
    assert result.exit_code == 0, result.output
    original, resumed = read_sessions(tiny_run)
    assert original == first
    assert resumed["kind"] == "resume" and resumed["resumed_at"] == 300
    assert resumed["command"] == ["rlp", "train", "--resume", str(tiny_run)]
    assert resumed["env"]["MKL_CBWR"] == "COMPATIBLE"
    # A complete run: nothing ran, so nothing is recorded.
    assert cli_run("train", "--resume", str(tiny_run)).exit_code == 0
    assert len(read_sessions(tiny_run)) == 2


def test_resume_from_a_corrupt_checkpoint_records_nothing(tiny_run: Path):
    before = (tiny_run / PROVENANCE_FILE).read_text()
    config = tiny_run / "config.yaml"
    config.write_text(config.read_text().replace("total_steps: 300", "total_steps: 600"))
    # A model that the checkpoint's own checks pass but the agent cannot load: the resume fails in restore().
    model = tiny_run / "checkpoints" / (tiny_run / "checkpoints" / "latest").read_text().strip() / "model.zip"
    model.write_bytes(bytes(model.stat().st_size))
    result = cli_run("train", "--resume", str(tiny_run))
    assert result.exit_code == 2 and "model.zip" in result.stderr
    assert (tiny_run / PROVENANCE_FILE).read_text() == before


# -- rlp report ---------------------------------------------------------------------------------------------


def fake_session(
    commit: str,
    cpu: str,
    torch_version: str = "2.13.0",
    capability: str = "AVX2",
    dirty: bool = False,
    env: dict | None = None,
) -> dict:
    return {
        "kind": "train",
        "started": "2026-01-01T00:00:00+00:00",
        "code": {"commit": commit, "dirty": dirty},
        "versions": {"torch": torch_version},
        "machine": {"cpu": cpu, "hostname": "h"},
        "torch": {"cpu_capability": capability},
        "env": env or {},
    }


def fake_run(root: Path, name: str, seed: int, sessions: list[dict] | None) -> Path:
    """A run directory with only what the report needs: a config (no visits logged yet) and provenance."""
    run_dir = root / name
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(
        f"seed: {seed}\ntotal_steps: 100\ninterventions: []\nenv: {{sequence: cartpole_shift, switch_every: 100}}\n"
    )
    if sessions is not None:
        (run_dir / PROVENANCE_FILE).write_text(json.dumps({"format": 1, "sessions": sessions}))
    return run_dir


def test_report_lists_commits_and_machines_and_warns_when_they_differ(tmp_path: Path):
    root = tmp_path / "runs"
    fake_run(root, "a_seed0", 0, [fake_session("aaa", "Intel Xeon", dirty=True)])
    fake_run(
        root,
        "b_seed1",
        1,
        [
            fake_session("bbb", "AMD EPYC", capability="AVX512"),
            fake_session("bbb", "Intel Xeon", env={"MKL_CBWR": "COMPATIBLE"}),
        ],
    )
    fake_run(root, "c_seed2", 2, None)  # an old run: no provenance.json

    report = make_report(root, tmp_path / "out", points=5, n_resamples=200)
    summary = report.provenance
    assert summary.counts["commit"] == {"aaa+dirty": 1, "bbb": 1, "unknown": 1}
    assert summary.counts["machine"] == {"Intel Xeon, torch 2.13.0": 2, "AMD EPYC, torch 2.13.0": 1, "unknown": 1}
    assert summary.counts["kernels"] == {"AVX2": 1, "AVX512": 1, "AVX2 (MKL_CBWR=COMPATIBLE)": 1, "unknown": 1}
    assert summary.mixed_runs == ["b_seed1"]  # resumed on another machine
    assert summary.warning() == (
        "warning: the runs come from 3 commits and 3 machines and 4 kernel choices "
        "(see Provenance in report.md): they agree statistically, not bit for bit"
    )
    md = (tmp_path / "out" / "report.md").read_text()
    section = md.split("## Provenance")[1].split("## Files")[0]
    assert "**Warning**" in section and "| `aaa+dirty` | 1 |" in section and "| `unknown` | 1 |" in section
    assert "| `AMD EPYC, torch 2.13.0` | 1 |" in section and "`b_seed1`" in section
    frame = pd.read_csv(tmp_path / "out" / "provenance.csv")
    assert frame[["run", "session", "commit"]].values.tolist() == [
        ["a_seed0", 0, "aaa+dirty"],
        ["b_seed1", 0, "bbb"],
        ["b_seed1", 1, "bbb"],
        ["c_seed2", 0, "unknown"],
    ]

    result = cli_run("report", str(root), "--out", str(tmp_path / "out2"), "--points", "5", "--resamples", "200")
    assert result.exit_code == 0, result.output
    assert summary.warning() in result.output.splitlines()


def test_report_of_runs_from_one_commit_and_machine_does_not_warn(tmp_path: Path):
    root = tmp_path / "runs"
    for seed in range(2):
        fake_run(root, f"r_seed{seed}", seed, [fake_session("ccc", "Intel Xeon")])
    report = make_report(root, tmp_path / "out", points=5, n_resamples=200)
    assert report.provenance.differing == [] and report.provenance.warning() is None
    assert report.provenance.counts["commit"] == {"ccc": 2}
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| `ccc` | 2 |" in md and "**Warning**" not in md
    result = cli_run("report", str(root), "--out", str(tmp_path / "out2"), "--points", "5", "--resamples", "200")
    assert result.exit_code == 0 and "warning" not in result.output


def test_report_of_old_runs_says_unknown_without_warning(tmp_path: Path):
    root = tmp_path / "runs"
    for seed in range(2):
        fake_run(root, f"r_seed{seed}", seed, None)
    summary = make_report(root, tmp_path / "out", points=5, n_resamples=200).provenance
    assert summary.counts == {"commit": {"unknown": 2}, "machine": {"unknown": 2}, "kernels": {"unknown": 2}}
    assert summary.warning() is None


# -- cpu_kernels: portable --------------------------------------------------------------------------------------

MINATAR = """\
name: mini
seed: 1
total_steps: 200
threads: 1
agent: {algo: dqn, learning_starts: 50, buffer_size: 1000, batch_size: 16, train_freq: 1, target_update_interval: 50}
net: {kind: minatar}
env: {sequence: permuted_minatar, switch_every: 100, options: {game: breakout, num_tasks: 2}}
logging: {progress_bar: false, root_dir: out}
monitor: {enabled: false}
"""
PINS = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA")


def final_parameters(run_dir: Path) -> dict[str, th.Tensor]:
    from stable_baselines3.common.save_util import load_from_zip_file

    _, params, _ = load_from_zip_file(run_dir / "model.zip")
    return params["policy"]


def rlp_subprocess(folder: Path, *args: str, env: dict[str, str] | None = None) -> Path:
    """``rlp train mini.yaml ARGS`` in a fresh process (no kernel pin inherited unless given) -> its run directory."""
    clean = {k: v for k, v in os.environ.items() if k not in PINS}
    root = folder / f"out{len(list(folder.glob('out*')))}"
    subprocess.run(
        [str(Path(sys.executable).with_name("rlp")), "train", "mini.yaml", f"logging.root_dir={root}", *args],
        cwd=folder,
        env={**clean, **(env or {})},
        check=True,
        capture_output=True,
    )
    (run_dir,) = (root / "mini").iterdir()
    return run_dir


@pytest.mark.skipif(
    platform.machine() not in ("x86_64", "AMD64") or not th.backends.mkl.is_available(),
    reason="portable kernels are x86-64 with MKL",
)
def test_portable_kernels_through_rlp_equal_pins_set_before_the_process(tmp_path: Path):
    (tmp_path / "mini.yaml").write_text(MINATAR)
    native = rlp_subprocess(tmp_path)
    portable = rlp_subprocess(tmp_path, "cpu_kernels=portable")
    # The pins exported by the shell before Python starts: what rlp's own export must amount to.
    shell = rlp_subprocess(
        tmp_path, "cpu_kernels=portable", env={"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "COMPATIBLE"}
    )

    got, want, other = final_parameters(portable), final_parameters(shell), final_parameters(native)
    assert all(th.equal(got[k], want[k]) for k in want)
    assert not all(th.equal(got[k], other[k]) for k in other)  # the pins change the kernels (MKL's path at least)

    (session,) = read_sessions(portable)
    assert session["cpu_kernels"] == "portable"
    assert session["env"]["ATEN_CPU_CAPABILITY"] == "avx2" and session["env"]["MKL_CBWR"] == "COMPATIBLE"
    assert session["torch"]["cpu_capability"] == "AVX2" and session["torch"]["mkldnn_enabled"] is False
    (session,) = read_sessions(native)
    assert session["cpu_kernels"] == "native" and session["torch"]["mkldnn_enabled"] is True
    assert not set(PINS) & set(session["env"])


def test_portable_kernels_refused_without_threads_or_without_the_pins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.yaml").write_text(TINY)
    result = cli_run("train", "tiny.yaml", "cpu_kernels=portable", "threads=null")
    assert result.exit_code == 2 and not (tmp_path / "out").exists()
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("rlp: error: cpu_kernels: 'portable' needs threads set")
    result = cli_run("train", "tiny.yaml", "cpu_kernels=fast")
    assert result.exit_code == 2 and "cpu_kernels" in result.stderr and "portable" in result.stderr

    # From Python, in a process where torch already computed with its own choice: refused, nothing written.
    from rl_plasticity.catalog import registries
    from rl_plasticity.config import load_config
    from rl_plasticity.kernels import KernelError
    from rl_plasticity.runner import train

    for key in PINS:
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(KernelError, match="needs ATEN_CPU_CAPABILITY=avx2 MKL_CBWR=COMPATIBLE in the environment"):
        train(load_config(tmp_path / "tiny.yaml", ["cpu_kernels=portable"], registries=registries()))
    assert not (tmp_path / "out").exists()
