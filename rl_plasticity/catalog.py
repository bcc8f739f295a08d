"""The project's registries: what ``rlp list`` shows (every registered agent, task sequence, intervention, probe
and config preset), and :func:`registries`, the names a config is validated against."""

from __future__ import annotations

import re
from pathlib import Path

from agents import AGENTS
from envs import SEQUENCES
from rl_plasticity.config import CONFIGS_DIR, Registries
from rl_plasticity.interventions import INTERVENTIONS, InterventionSpec
from rl_plasticity.probes import PROBES, ProbeSpec, probe_kinds


def registries() -> Registries:
    """The task sequences, interventions and probes registered now, for :func:`rl_plasticity.config.load_config`
    and :func:`~rl_plasticity.config.validate_config` (the config module imports no registry)."""
    return Registries(sequences=SEQUENCES, interventions=INTERVENTIONS, probe_kinds=probe_kinds())


def _first_doc_line(obj: object) -> str:
    """The first docstring line, with Sphinx roles such as :class:`~a.B` reduced to their text."""
    line = (obj.__doc__ or "").strip().splitlines()[0]
    return re.sub(r":\w+:`~?([^`]+)`", r"\1", line)


def _config_summary(path: Path) -> str:
    """The first comment line of a preset (its header says what it studies)."""
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def _intervention_summary(spec: InterventionSpec) -> str:
    params = ", ".join(f"{k}={v!r}" for k, v in spec.defaults().items())
    agents = "dqn, ppo" if len(spec.algos) == 2 else f"{', '.join(spec.algos)} only: {spec.why_not}"
    return f"{spec.description} [{agents}; params: {params or 'none'}]"


def _probe_summary(spec: ProbeSpec) -> str:
    when = "every round" if spec.kind == "light" else "heavy: at task switches"
    settings = f"; settings: monitor.{', monitor.'.join(spec.settings)}" if spec.settings else ""
    return f"{spec.description} [{when}; tags: {', '.join(spec.tags)}{settings}]"


def catalog() -> dict[str, list[tuple[str, str]]]:
    """Section -> (name, one-line description) rows."""
    sequences = []
    for name, spec in SEQUENCES.items():
        options = ", ".join(f"{k}={v!r}" for k, v in spec.defaults.items())
        sequences.append((name, f"{spec.description} [{spec.gym_id}; options: {options}]"))
    return {
        "agents": [(name, _first_doc_line(cls)) for name, cls in AGENTS.items()],
        "sequences": sequences,
        "interventions": [(name, _intervention_summary(spec)) for name, spec in sorted(INTERVENTIONS.items())],
        "probes": [(name, _probe_summary(spec)) for name, spec in PROBES.items()],
        "configs": [
            (f"configs/{p.relative_to(CONFIGS_DIR)}", _config_summary(p)) for p in sorted(CONFIGS_DIR.rglob("*.yaml"))
        ],
    }
