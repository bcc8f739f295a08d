"""The SB3 callback that logs the task sequence: task ids, per-task returns and switch markers."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.logger import HParam

# Rich values go to TensorBoard only; the text formats cannot show them.
#: The SB3 logger formats a value skips to go to TensorBoard only (rich values, the many plasticity scalars).
TB_ONLY = ("stdout", "log", "json", "csv")


def step_events(infos: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """What one vec-env step reports: the infos of the episodes it finished, and the first task switch info.

    All parallel copies switch on the same step, so the first switch info stands for all of them.
    """
    episodes = [info for info in infos if "episode" in info]
    switch = next((info for info in infos if info.get("task_switch")), None)
    return episodes, switch


class TaskLogCallback(BaseCallback):
    """Logs, through the model's SB3 logger (so all of it lands in the run's one events file):

    - ``task/id``: the current task id, recorded every step and written at every dump;
    - ``task/<name>/episode_return`` and ``task/<name>/episode_length``: the mean over the episodes of
      that task finished since the last dump (an episode cut by a switch counts for the task it ran in);
    - ``task/switch``: a text marker ``"<from> -> <to>"`` at the exact step of each switch, where the
      logger is also dumped so that ``task/id`` steps there;
    - ``hparams``: the run's hyperparameters, once at the start.

    :param hparams: flat mapping of hyperparameter name -> scalar or string, for TensorBoard's HPARAMS tab.
    :param task_names: names of the sequence's tasks, indexed by task id.
    """

    def __init__(self, hparams: Mapping[str, bool | str | float | int | None], task_names: list[str]) -> None:
        super().__init__()
        self.hparams = dict(hparams)
        self.task_names = list(task_names)
        self.num_switches = 0
        self._resumed = False

    def state_dict(self) -> dict[str, int]:
        """For checkpoints: the switches seen so far."""
        return {"num_switches": self.num_switches}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Continue a checkpointed run: the hyperparameters are logged already, so they are not logged again."""
        self.num_switches = int(state["num_switches"])
        self._resumed = True

    def _on_training_start(self) -> None:
        if self._resumed:
            return
        metrics = {"rollout/ep_rew_mean": 0.0, "train/loss": 0.0}
        self.logger.record("hparams", HParam(self.hparams, metrics), exclude=TB_ONLY)

    def _on_step(self) -> bool:
        infos = self.locals["infos"]
        episodes, switch = step_events(infos)
        for info in episodes:
            name, episode = info["task_name"], info["episode"]
            self.logger.record_mean(f"task/{name}/episode_return", float(episode["r"]))
            self.logger.record_mean(f"task/{name}/episode_length", float(episode["l"]))
        if switch is None:
            self.logger.record("task/id", infos[0]["task_id"])
        else:
            self.num_switches += 1
            to_task = int(switch["next_task_id"])
            self.logger.record("task/id", to_task)
            self.logger.record("task/switch", f"{switch['task_name']} -> {self.task_names[to_task]}", exclude=TB_ONLY)
            # A plastic agent's interventions log some values only at dumps (stock SB3 agents have none).
            if hasattr(self.model, "record_logged_values"):
                self.model.record_logged_values()
            self.logger.dump(step=self.num_timesteps)
        return True
