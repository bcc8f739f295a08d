"""Same config and seed on CPU: identical parameters and identical logged scalars, for DQN and for PPO."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch as th
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from agents import PlasticDQN, PlasticPPO
from rl_plasticity.catalog import registries
from rl_plasticity.config import validate_config
from rl_plasticity.runner import train

AGENTS = {
    "dqn": dict(
        algo="dqn",
        learning_starts=50,
        buffer_size=1000,
        batch_size=16,
        train_freq=1,
        target_update_interval=50,
        double_q=True,
    ),
    "ppo": dict(algo="ppo", n_steps=64, batch_size=32, n_epochs=2),
}


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every logged scalar except wall-clock ones, as (step, value) lists."""
    (events,) = run_dir.glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
    acc.Reload()
    return {
        tag: [(e.step, e.value) for e in acc.Scalars(tag)]
        for tag in acc.Tags()["scalars"]
        if not tag.startswith("time/")
    }


@pytest.mark.parametrize("algo", ["dqn", "ppo"])
def test_same_seed_same_parameters_and_scalars(tmp_path: Path, algo: str):
    runs = []
    for i in range(2):
        cfg = validate_config(
            dict(
                name=f"det{i}",
                seed=4,
                total_steps=640,
                agent=AGENTS[algo],
                net=dict(kind="mlp", width=16, depth=2),
                env=dict(sequence="cartpole_shift", switch_every=320),
                interventions=["l2"],
                logging=dict(root_dir=str(tmp_path), progress_bar=False),
                monitor=dict(probe_every=50, probe_set_size=32, hessian_order=3, gram_size=16, trainability_steps=3),
                checkpoint=dict(every=None, replay_buffer=False),
            ),
            registries=registries(),
        )
        runs.append(train(cfg))
    cls = PlasticDQN if algo == "dqn" else PlasticPPO
    first, second = (cls.load(r / "model.zip", device="cpu").policy.state_dict() for r in runs)
    for key in first:
        assert th.equal(first[key], second[key]), key
    logged = [scalars(r) for r in runs]
    assert logged[0].keys() == logged[1].keys() and len(logged[0]) > 20
    for tag in logged[0]:
        # assert_array_equal counts NaN == NaN (NC values are NaN by definition when a batch has one class)
        np.testing.assert_array_equal(np.array(logged[0][tag]), np.array(logged[1][tag]), err_msg=tag)
