"""``rlp sweep``: a grid of ordinary runs (arms x grid points x seeds, plus a fresh-network arm), run side by
side on Ray, resumable, with a manifest that ``rlp report`` reads.

- :mod:`~rl_plasticity.sweep.grid`: seed ranges, ``--grid key=[...]`` and named arms;
- :mod:`~rl_plasticity.sweep.plan`: the trials, validated as full configs up front, and ``sweep.json``;
- :mod:`~rl_plasticity.sweep.trial`: one trial = ``rlp train`` (or ``--resume``) in a subprocess;
- :mod:`~rl_plasticity.sweep.driver`: Ray tasks (or one after another), skip and resume, outcomes.
"""

from rl_plasticity.sweep.driver import SweepSummary, require_ray, run_sweep
from rl_plasticity.sweep.grid import SweepError, expand_grid, load_arms, parse_grid, parse_seeds
from rl_plasticity.sweep.plan import MANIFEST, SweepPlan, Trial, build_plan, read_manifest
from rl_plasticity.sweep.trial import TrialJob, TrialOutcome, execute_trial

__all__ = [
    "MANIFEST",
    "SweepError",
    "SweepPlan",
    "SweepSummary",
    "Trial",
    "TrialJob",
    "TrialOutcome",
    "build_plan",
    "execute_trial",
    "expand_grid",
    "load_arms",
    "parse_grid",
    "parse_seeds",
    "read_manifest",
    "require_ray",
    "run_sweep",
]
