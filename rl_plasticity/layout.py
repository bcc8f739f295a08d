"""The names of the files and folders in a run directory (and the lock a sweep directory shares).

One owner for each name, so the writers (runner, monitor, checkpoints, provenance) and the readers (``rlp report``,
``rlp sweep``, :mod:`rl_plasticity.rundirs`) cannot drift apart. Imports nothing, so any layer may use it.
"""

from __future__ import annotations

#: The resolved config of the run.
CONFIG_FILE = "config.yaml"
#: Code, libraries, CPU and command of each session (:mod:`rl_plasticity.provenance`).
PROVENANCE_FILE = "provenance.json"
#: Held while a process writes to the directory (:mod:`rl_plasticity.runlock`; a sweep directory has one too).
LOCK_FILE = ".lock"
#: The final model (SB3 zip); a checkpoint folder holds one of the same name.
MODEL_FILE = "model.zip"
#: The checkpoint folders (``step_<k>``) and the pointer to the newest complete one.
CHECKPOINTS_DIR = "checkpoints"
LATEST = "latest"
#: One row per task visit, written by the monitor, read by the report.
SUMMARY_FILE = "task_summary.csv"
#: The monitor's fixed probe sets: per task, and from each task's first visit.
PROBE_SETS_FILE = "probe_sets.pt"
FIRST_VISIT_FILE = "first_visit_sets.pt"
