"""The divergence guard: a non-finite or exploding loss stops training.

A step's loss is computed on the weights before its update, so the update
that diverges is seen one step later. When that step is the first after a
checkpoint, the checkpoint holds the diverged weights: it is removed, and the
latest checkpoint left is one whose own loss was healthy. The chief writes
`DIVERGED_FILE` (step, learning rate, loss terms), which a script or a job
scheduler reads instead of the log; a later run in model_dir removes it.
"""
import dataclasses
import json
import os
from typing import Callable, Dict, Optional

import numpy as np
import tensorflow as tf

DIVERGED_FILE = "diverged.json"  # In model_dir, after a divergence stop.


class TrainingDivergedError(RuntimeError):
  """The loss became non-finite or exploded; no diverged checkpoint is left."""


@dataclasses.dataclass(frozen=True)
class DivergenceGuard:
  """Checks a trainer's losses; only the chief changes model_dir."""
  model_dir: str
  checkpoint_manager: tf.train.CheckpointManager
  schedule: Callable[[int], tf.Tensor]  # The learning rate of a step.
  max_loss: float
  is_chief: bool

  def is_healthy(self, total_loss) -> tf.Tensor:
    return tf.math.is_finite(total_loss) & (total_loss <= self.max_loss)

  def clear(self):
    """Removes an earlier run's `DIVERGED_FILE`."""
    path = os.path.join(self.model_dir, DIVERGED_FILE)
    if self.is_chief and os.path.exists(path):
      os.remove(path)

  def check(self, losses: Dict[str, float], step: int,
            first_step_of_loop: bool):
    """Raises `TrainingDivergedError` if the loss of `step` is unhealthy."""
    if bool(self.is_healthy(losses["total_loss"])):
      return
    bad = [k for k, v in losses.items() if not np.isfinite(v)] or [
        max((k for k in losses if k.endswith("loss") and k != "total_loss"),
            key=lambda k: losses[k])]
    learning_rate = float(self.schedule(step - 1))
    removed = (self._remove_latest_checkpoint(step - 1)
               if first_step_of_loop and self.is_chief else None)
    if self.is_chief:
      with open(os.path.join(self.model_dir, DIVERGED_FILE), "w") as f:
        json.dump(dict(step=step, learning_rate=learning_rate,
                       bad_terms=bad, losses=losses,
                       removed_checkpoint=removed), f, indent=1)
    raise TrainingDivergedError(
        f"Training diverged at step {step}: total_loss="
        f"{losses['total_loss']:.4g} (max_loss={self.max_loss:g}), "
        f"learning rate {learning_rate:.4g}; "
        f"first bad term: {', '.join(bad)} (all terms: " +
        ", ".join(f"{k}={v:.4g}" for k, v in sorted(losses.items())) +
        "). " + (f"Checkpoint {removed} held the diverged weights and was "
                 "removed; " if removed else "") +
        f"the latest checkpoint in {self.model_dir} is a healthy state. "
        "Lower the learning rate, lengthen the warmup or use cross-replica "
        "BN (norm 'cgbn').")

  def _remove_latest_checkpoint(self, step: int) -> Optional[str]:
    """Deletes the latest checkpoint if it is of `step`; returns its path."""
    checkpoints = list(self.checkpoint_manager.checkpoints)
    if not checkpoints or not checkpoints[-1].endswith(f"-{step}"):
      return None
    for path in tf.io.gfile.glob(checkpoints[-1] + ".*"):
      tf.io.gfile.remove(path)
    if len(checkpoints) > 1:
      tf.compat.v1.train.update_checkpoint_state(
          self.model_dir, checkpoints[-2],
          all_model_checkpoint_paths=checkpoints[:-1])
    else:
      tf.io.gfile.remove(os.path.join(self.model_dir, "checkpoint"))
    return checkpoints[-1]
