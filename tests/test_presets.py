"""Every shipped preset and every arm of the study is a valid config."""

from __future__ import annotations

import pytest
import yaml

from rl_plasticity.catalog import registries
from rl_plasticity.config import CONFIGS_DIR, load_config

PRESETS = sorted(p for p in CONFIGS_DIR.rglob("*.yaml") if p.name != "arms.yaml")
ARMS = yaml.safe_load((CONFIGS_DIR / "arms.yaml").read_text())["arms"]


@pytest.mark.parametrize("path", PRESETS, ids=[str(p.relative_to(CONFIGS_DIR)) for p in PRESETS])
def test_preset_is_valid_and_documented(path):
    cfg = load_config(path, registries=registries())
    assert path.read_text().startswith("#"), "each preset starts with a comment header"
    assert cfg.name


def test_intervention_presets_are_reduced_continual_minatar():
    for path in (CONFIGS_DIR / "interventions").glob("*.yaml"):
        cfg = load_config(path, registries=registries())
        assert cfg.env.sequence == "continual_minatar" and cfg.env.switch_every == 100_000
        assert cfg.agent.algo == "dqn" and cfg.agent.double_q


@pytest.mark.parametrize("arm", sorted(ARMS))
def test_every_arm_is_a_valid_override_list(arm):
    cfg = load_config(CONFIGS_DIR / "interventions" / "base.yaml", ARMS[arm], registries=registries())
    preset = CONFIGS_DIR / "interventions" / f"{arm}.yaml"
    assert preset.is_file(), f"arm {arm} has a preset of its own"
    assert cfg.model_dump(exclude={"name"}) == load_config(preset, registries=registries()).model_dump(exclude={"name"})
