"""Test helper: trains a few steps one at a time and reports, as JSON.

  python tests/training/train_steps_main.py MODEL_DIR STEPS GIN_PARAM...

Builds everything as tools/train.py does (gin/demo.gin plus the bindings),
then prints its `result_line`: the total loss after each step, the largest
difference between any replica's copy of a weight and replica 0's, a
checksum of the weights (to compare workers), the detector's normalization
layer classes and how many of them moved their moving mean off its zero
initial value.
"""
import sys

import megdet_tf  # noqa: F401  pylint: disable=unused-import
import numpy as np
import tensorflow as tf

from megdet_tf import result_line
from megdet_tf.training import experiment


def main(model_dir, steps, gin_params):
  experiment.parse_gin(["gin/demo.gin"], gin_params)
  trainer = experiment.build_trainer(model_dir)
  losses = [trainer.train(max_steps=step)["total_loss"]
            for step in range(1, steps + 1)]
  copies = [getattr(v, "values", (v,))  # One copy without a mirror.
            for v in trainer.model.trainable_variables]
  replica_diff = max(float(np.max(np.abs(value.numpy() - values[0].numpy())))
                     for values in copies for value in values)
  checksum = float(sum(np.sum(np.abs(v.numpy()))
                       for v in trainer.model.trainable_variables))
  norms = [layer for layer in trainer.model.submodules
           if isinstance(layer, tf.keras.layers.BatchNormalization)]
  result_line.print_result({
      "losses": losses, "replica_weight_max_diff": replica_diff,
      "checksum": checksum,
      "num_replicas": trainer.strategy.num_replicas_in_sync,
      "norm_classes": sorted({type(n).__name__ for n in norms}),
      "norms": len(norms),
      "norms_moved": sum(bool(np.any(n.moving_mean.numpy() != 0))
                         for n in norms)})


if __name__ == "__main__":
  main(sys.argv[1], int(sys.argv[2]), sys.argv[3:])
