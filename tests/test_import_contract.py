"""The layer rules of the code base, checked statically on its imports (``ast``, no module is imported).

- ``envs`` imports nothing of the project: the environments stand alone.
- ``rl_plasticity.probes`` imports no stable_baselines3 and nothing of the project outside itself: the probes are
  pure functions of tensors and modules.
- Nothing outside ``agents`` imports a concrete agent class (``PlasticDQN``, ``PlasticPPO``, ``agents.dqn``,
  ``agents.ppo``): the rest of the code uses :class:`agents.hooks.PlasticAgent` and builds agents by name through
  ``agents.AGENTS``. Tests may import them.
- Nothing below the runner imports ``rl_plasticity.config``: the agents, envs, probes, interventions, probing,
  recording, monitor, checkpointing, evaluation, kernel checks, run logger, task copies and run-directory
  helpers take plain arguments (the monitor, evaluation and checkpoints a settings dataclass of their own,
  which the runner fills from the validated config); the runner and the CLI validate the config. No module
  is exempt.
- ``rl_plasticity.config`` imports nothing of the project: it is a plain schema, validated against the
  registries its caller passes in (:func:`rl_plasticity.catalog.registries`).

Every import counts, at module level or inside a function (a lazy import is still an arrow), and under
``TYPE_CHECKING`` too.
"""

from __future__ import annotations

import ast
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("agents", "envs", "rl_plasticity", "benchmarks")
PROJECT = ("agents", "envs", "rl_plasticity")

#: Concrete agent modules and classes.
CONCRETE_AGENTS = ("agents.dqn", "agents.ppo", "agents.PlasticDQN", "agents.PlasticPPO")
#: Modules outside ``agents`` allowed to name a concrete agent class: benchmarks are scripts that time one
#: algorithm on purpose (they build a ``PlasticDQN`` and call its stock-SB3 parent to compare paths).
CONCRETE_AGENT_ALLOWED = ("benchmarks",)

#: Modules below the runner (prefixes): none of them may import ``rl_plasticity.config``.
BELOW_RUNNER = (
    "agents",
    "envs",
    "rl_plasticity.probes",
    "rl_plasticity.interventions",
    "rl_plasticity.probing",
    "rl_plasticity.recording",
    "rl_plasticity.monitor",
    "rl_plasticity.checkpoint",
    "rl_plasticity.evaluation",
    "rl_plasticity.kernels",
    "rl_plasticity.run_logger",
    "rl_plasticity.task_envs",
    "rl_plasticity.task_logging",
    "rl_plasticity.probe_sets",
    "rl_plasticity.provenance",
    "rl_plasticity.layout",
    "rl_plasticity.runlock",
    "rl_plasticity.rundirs",
)


def module_name(path: Path) -> str:
    """``rl_plasticity/probes/gram.py`` -> ``rl_plasticity.probes.gram`` (a package is its ``__init__``)."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(source: str, module: str, is_package: bool = False) -> Iterator[str]:
    """Every name ``source`` (of ``module``) imports, absolute: ``import a.b`` -> ``a.b``; ``from a import b`` ->
    ``a`` and ``a.b`` (``b`` may be a module or a class); relative imports resolved against ``module``."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".") if is_package else module.split(".")[:-1]
                anchor = package[: len(package) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)


def within(name: str, prefixes: tuple[str, ...] | str) -> bool:
    """Whether dotted ``name`` is one of ``prefixes`` or inside one of them."""
    prefixes = (prefixes,) if isinstance(prefixes, str) else prefixes
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def envs_rule(module: str, name: str) -> str | None:
    if within(module, "envs") and within(name, PROJECT) and not within(name, "envs"):
        return "envs imports nothing of the project"
    return None


def probes_rule(module: str, name: str) -> str | None:
    if not within(module, "rl_plasticity.probes"):
        return None
    if within(name, "stable_baselines3"):
        return "rl_plasticity.probes imports no stable_baselines3"
    if within(name, PROJECT) and not within(name, "rl_plasticity.probes") and name != "rl_plasticity":
        return "rl_plasticity.probes imports nothing of the project outside itself"
    return None


def agent_class_rule(module: str, name: str) -> str | None:
    if within(module, ("agents", *CONCRETE_AGENT_ALLOWED)):
        return None
    if within(name, CONCRETE_AGENTS):
        return "only agents/ imports a concrete agent class (use agents.hooks.PlasticAgent, agents.AGENTS)"
    return None


def config_rule(module: str, name: str) -> str | None:
    if within(module, BELOW_RUNNER) and within(name, "rl_plasticity.config"):
        return "nothing below the runner imports rl_plasticity.config"
    return None


def plain_config_rule(module: str, name: str) -> str | None:
    if module == "rl_plasticity.config" and within(name, PROJECT) and name != "rl_plasticity":
        return "rl_plasticity.config imports nothing of the project (the registries come from its caller)"
    return None


RULES: list[Callable[[str, str], str | None]] = [
    envs_rule,
    probes_rule,
    agent_class_rule,
    config_rule,
    plain_config_rule,
]


def violations(source: str, module: str, is_package: bool = False) -> list[str]:
    """``"<module> imports <name>: <rule>"`` for each import of ``source`` that breaks a rule."""
    found = []
    for name in imported_names(source, module, is_package):
        for rule in RULES:
            reason = rule(module, name)
            if reason is not None:
                found.append(f"{module} imports {name}: {reason}")
    return found


def source_files() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


def test_the_tree_keeps_the_layer_rules() -> None:
    files = source_files()
    assert len(files) > 50  # the walk found the tree
    found = [v for path in files for v in violations(path.read_text(), module_name(path), path.name == "__init__.py")]
    assert found == []


@pytest.mark.parametrize(
    ("source", "module", "rule"),
    [
        ("from agents import AGENTS\n", "envs.sequence", "envs imports nothing"),
        ("import rl_plasticity.runner\n", "envs.minatar", "envs imports nothing"),
        (
            "from stable_baselines3.common.buffers import ReplayBufferSamples\n",
            "rl_plasticity.probes.gram",
            "no stable_baselines3",
        ),
        ("from rl_plasticity.recording import activation_outputs\n", "rl_plasticity.probes.rank", "outside itself"),
        ("from ..recording import activation_outputs\n", "rl_plasticity.probes.rank", "outside itself"),
        ("from agents import PlasticDQN\n", "rl_plasticity.monitor", "concrete agent"),
        ("def f():\n    from agents.ppo import PPOLoss\n", "rl_plasticity.interventions.l2", "concrete agent"),
        ("from rl_plasticity.config import MonitorConfig\n", "rl_plasticity.probing", "below the runner"),
        ("from rl_plasticity.config import MonitorConfig\n", "rl_plasticity.monitor", "below the runner"),
        ("from rl_plasticity.config import ConfigError\n", "rl_plasticity.kernels", "below the runner"),
        ("def f():\n    from .config import EvalConfig\n", "rl_plasticity.evaluation", "below the runner"),
        ("from rl_plasticity import config\n", "rl_plasticity.checkpoint", "below the runner"),
        ("def f():\n    from envs import SEQUENCES\n", "rl_plasticity.config", "registries come from its caller"),
        ("from rl_plasticity.interventions import INTERVENTIONS\n", "rl_plasticity.config", "registries come from"),
        ("from .probes import probe_kinds\n", "rl_plasticity.config", "registries come from its caller"),
        ("from .config import RunConfig\n", "rl_plasticity.recording", "below the runner"),
        ("from rl_plasticity import config\n", "agents.dqn", "below the runner"),
    ],
)
def test_each_rule_flags_a_violation(source: str, module: str, rule: str) -> None:
    found = violations(source, module)
    assert found and any(rule in v for v in found), found


@pytest.mark.parametrize(
    ("source", "module"),
    [
        ("from envs.registry import ENVS\nimport numpy\n", "envs.sequence"),
        ("from rl_plasticity.probes._checks import check\nimport torch\n", "rl_plasticity.probes.rank"),
        (
            "from . import registry\n",
            "rl_plasticity.probes",
        ),
        ("from agents import AGENTS\nfrom agents.hooks import PlasticAgent\n", "rl_plasticity.runner"),
        ("from agents import PlasticDQN\n", "agents.fast_dqn"),
        ("from rl_plasticity.config import RunConfig\n", "rl_plasticity.runner"),
        ("from rl_plasticity.config import load_config\n", "rl_plasticity.cli"),
        ("from rl_plasticity.config import ConfigError\n", "rl_plasticity.sweep.plan"),
    ],
)
def test_allowed_imports_pass(source: str, module: str) -> None:
    assert violations(source, module, is_package=module == "rl_plasticity.probes") == []
