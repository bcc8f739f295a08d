"""Every registered intervention, end to end through `train()` with the monitor on, on the stock and the fast DQN
path: it fires and logs."""

from __future__ import annotations

from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from rl_plasticity.catalog import registries
from rl_plasticity.config import validate_config
from rl_plasticity.interventions import INTERVENTIONS
from rl_plasticity.runner import train

# Parameters that make each intervention act within a 600-step run (defaults elsewhere).
FAST = {"redo": {"every": 20}, "cbp": {"replacement_rate": 0.05, "maturity_threshold": 10}}


@pytest.mark.parametrize("fast", [False, True], ids=["stock", "fast"])
@pytest.mark.parametrize("name", sorted(INTERVENTIONS))
def test_intervention_runs_and_logs_its_tags(tmp_path: Path, name: str, fast: bool):
    cfg = validate_config(
        dict(
            name="e2e",
            seed=1,
            total_steps=600,
            agent=dict(
                algo="dqn",
                learning_starts=50,
                buffer_size=1000,
                batch_size=16,
                train_freq=1,
                target_update_interval=50,
                double_q=True,
                fast=fast,
            ),
            net=dict(kind="mlp", width=16, depth=2),
            env=dict(sequence="cartpole_shift", switch_every=200),
            logging=dict(root_dir=str(tmp_path), progress_bar=False, save_model=False),
            monitor=dict(probe_every=100, probe_set_size=32, hessian_order=3, gram_size=16, trainability_steps=3),
            checkpoint=dict(every=None, replay_buffer=False),
            interventions=[name],
            intervention_params={name: FAST[name]} if name in FAST else {},
        ),
        registries=registries(),
    )
    run_dir = train(cfg)
    (events,) = run_dir.glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
    acc.Reload()
    tags = [t for t in acc.Tags()["scalars"] if t.startswith(f"interventions/{name}/")]
    assert tags, f"no interventions/{name}/ tags"
    # The monitor kept working alongside (weights probe included).
    assert "plasticity/weight_l2_norm/total" in acc.Tags()["scalars"]
    penalty = getattr(INTERVENTIONS[name].cls, "penalty_key", None)
    if penalty is not None:
        # An L2 penalty's value is logged at every dump, the monitor's probe rounds included.
        probe_steps = {e.step for e in acc.Scalars("plasticity/erank/value_head@batch")}
        assert probe_steps and probe_steps <= {e.step for e in acc.Scalars(f"interventions/{name}/{penalty}")}
