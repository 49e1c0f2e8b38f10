"""Internal: profiles one setting of tools/profile_allreduce.py.

  python tools/profile_allreduce_worker.py '{"run_dir": ..., "group_size": K,
      "profile_steps": [a, b], "gin_files": [...], "gin_params": [...]}'

Runs in a fresh process (logical devices and the strategy must exist before
TensorFlow initialises): builds the trainer as tools/train.py does, trains to
step b with `ProfileWindow.profile_steps=(a, b)`, reads the profile back with
`allreduce_report`, writes its figures as TensorBoard scalars into run_dir
and prints them as its `result_line`.
"""
import json
import os
import sys

import megdet_tf  # noqa: F401  pylint: disable=unused-import
import tensorflow as tf

from megdet_tf import result_line
from megdet_tf.training import allreduce_report
from megdet_tf.training import experiment
from megdet_tf.training import strategy as strategy_lib


def profile(run_dir, group_size, profile_steps, gin_files, gin_params):
  """Trains and profiles one setting; returns its report."""
  first, last = profile_steps
  experiment.parse_gin(gin_files, list(gin_params) + [
      f"build_norm.group_size={group_size}",
      f"ProfileWindow.profile_steps=({first}, {last})"])
  num_replicas = strategy_lib.build_strategy().num_replicas_in_sync
  if num_replicas % group_size:
    return {"group_size": group_size, "skipped": (
        f"group size {group_size} does not divide {num_replicas} replicas")}
  trainer = experiment.build_trainer(run_dir)
  trainer.train(max_steps=last)
  # The trace records no tensor shapes; the loop's graph gives each
  # collective's payload. A new iterator of the same type finds the traced
  # function (no retrace).
  iterator = iter(trainer.train_reader.distribute(trainer.strategy,
                                                  trainer.step))
  function = trainer._train_loop.get_concrete_function(  # pylint: disable=protected-access
      iterator, tf.constant(1))
  result = allreduce_report.report(
      run_dir, num_replicas, allreduce_report.collective_payloads(function))
  result.update(group_size=group_size,
                global_batch_size=trainer.global_batch_size,
                profile_steps=[first, last])
  with tf.summary.create_file_writer(run_dir).as_default(step=last):
    for key, value in result.items():
      if isinstance(value, float):
        tf.summary.scalar(f"allreduce/{key}", value)
  return result


if __name__ == "__main__":
  result_line.print_result(profile(**json.loads(sys.argv[1])))
  os._exit(0)  # Skips the slow teardown of the traced graphs.
