"""Fixed probe sets: per task, the first samples met on its first visit, then frozen.

Probing a fixed set separates changes of the network from changes of the data it is probed on (rank on
fresh on-policy batches is confounded by the policy's own data; metrics.md, "Probe data"). A set holds
what the agent's own training loss needs, so the curvature probes can use that loss on it: transitions
for DQN, rollout samples (with their advantages and returns as collected) for PPO.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch as th
from stable_baselines3.common.buffers import ReplayBufferSamples, RolloutBufferSamples

#: Fields kept per sample, in the order of the SB3 sample tuple each agent's loss takes.
DQN_FIELDS = ("observations", "actions", "next_observations", "dones", "rewards")
PPO_FIELDS = ("observations", "actions", "old_values", "old_log_prob", "advantages", "returns")


class ProbeSets:
    """Per-task fixed probe sets, filled in arrival order until ``size`` samples, then frozen.

    :param size: samples per task.
    :param fields: the sample fields stored (:data:`DQN_FIELDS` or :data:`PPO_FIELDS`).
    """

    def __init__(self, size: int, fields: tuple[str, ...]) -> None:
        self.size = size
        self.fields = fields
        self._parts: dict[int, dict[str, list[np.ndarray]]] = {}
        self._counts: dict[int, int] = {}
        self._frozen: dict[int, dict[str, np.ndarray]] = {}

    def full(self, task_id: int) -> bool:
        """Whether the set of ``task_id`` is complete (and so frozen)."""
        return task_id in self._frozen

    def add(self, task_id: int, samples: dict[str, np.ndarray]) -> bool:
        """Add a block of samples (first axis = samples) to an unfinished set.

        :return: ``True`` if this block completed the set.
        """
        if self.full(task_id):
            return False
        parts = self._parts.setdefault(task_id, {name: [] for name in self.fields})
        take = min(self.size - self._counts.get(task_id, 0), len(samples[self.fields[0]]))
        for name in self.fields:
            # Copies: SB3 reuses some of its arrays between steps.
            parts[name].append(np.array(samples[name][:take], copy=True))
        self._counts[task_id] = self._counts.get(task_id, 0) + take
        if self._counts[task_id] < self.size:
            return False
        self._frozen[task_id] = {name: np.concatenate(parts[name]) for name in self.fields}
        del self._parts[task_id]
        return True

    def arrays(self, task_id: int) -> dict[str, np.ndarray] | None:
        """The samples of ``task_id`` so far (frozen or not), or ``None`` if there are none."""
        if task_id in self._frozen:
            return self._frozen[task_id]
        parts = self._parts.get(task_id)
        if not parts or not parts[self.fields[0]]:
            return None
        return {name: np.concatenate(chunks) for name, chunks in parts.items()}

    def batch(self, task_id: int, device: th.device, limit: int | None = None) -> NamedTuple | None:
        """The set of ``task_id`` as the SB3 sample tuple the agent's ``training_loss`` takes."""
        arrays = self.arrays(task_id)
        if arrays is None:
            return None
        tensors = [th.as_tensor(arrays[name][:limit], device=device) for name in self.fields]
        return ReplayBufferSamples(*tensors) if self.fields == DQN_FIELDS else RolloutBufferSamples(*tensors)

    def state_dict(self) -> dict[str, Any]:
        """Frozen sets only: an unfinished set is re-collected on resume."""
        return {"size": self.size, "fields": self.fields, "frozen": self._frozen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.size, self.fields = state["size"], tuple(state["fields"])
        self._frozen = dict(state["frozen"])
        self._parts, self._counts = {}, {task: self.size for task in self._frozen}

    def save(self, path: Path) -> None:
        """Write the frozen sets atomically (temporary file, then rename), so a kill never leaves half a file."""
        tmp = path.with_suffix(path.suffix + ".tmp")
        buffer = io.BytesIO()  # torch.save into memory, then a plain write: a full disk is then an OSError
        th.save(self.state_dict(), buffer)
        tmp.write_bytes(buffer.getvalue())
        tmp.replace(path)
