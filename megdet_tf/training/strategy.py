"""Distribution strategies for MegDet training, chosen by Gin.

- `one_device`: the first GPU, or the CPU.
- `mirrored`: all local GPUs with NCCL collectives; without GPUs, the CPU is
  split into `num_cpu_replicas` logical devices so that multi-replica
  training (and cross-replica BN) can be tried on a laptop.
- `multi_worker`: `MultiWorkerMirroredStrategy` from `TF_CONFIG`, NCCL on
  GPUs, and one timeout for waiting on the other workers (to start, then in
  every collective) so that a dead or stalled peer ends the job with an error
  instead of a hang.

Logical CPU devices can only be configured before TensorFlow initialises its
runtime, so build the strategy before anything else touches a device.
"""
import contextlib
import faulthandler
from typing import Optional

from absl import logging
import gin
import tensorflow as tf

from megdet_tf.training import multi_worker_devices

STRATEGIES = ("one_device", "mirrored", "multi_worker")


def is_chief(resolver) -> bool:
  """Whether this task writes checkpoints and prepares data: the chief, or
  worker 0 when the cluster has no chief (also without a cluster)."""
  if resolver is None or not resolver.task_type:
    return True
  return (resolver.task_type == "chief" or
          (resolver.task_type == "worker" and resolver.task_id == 0 and
           "chief" not in resolver.cluster_spec().as_dict()))


@gin.configurable
def build_strategy(kind: str = "mirrored",
                   num_cpu_replicas: int = 1,
                   collective_timeout_seconds: float = 600.0
                   ) -> tf.distribute.Strategy:
  """Returns the strategy that trains (and evaluates) the detector.

  Args:
    kind: one of `one_device`, `mirrored`, `multi_worker`.
    num_cpu_replicas: replicas per machine when it has no GPU (logical CPU
      devices, see `multi_worker_devices`).
    collective_timeout_seconds: how long a `multi_worker` worker waits for
      the others: to start (building the strategy), then in any collective
      (the strategy's and cross-replica BN's, which take its options). Longer
      fails, so that a dead or stalled worker stops the job.
  """
  gpus = tf.config.list_physical_devices("GPU")
  if kind == "one_device":
    return tf.distribute.OneDeviceStrategy("/gpu:0" if gpus else "/cpu:0")
  if kind == "mirrored":
    if gpus:
      # TensorFlow's default: collectives with NCCL, ordered per device by
      # launchers whose ordering cross-replica BN shares.
      return tf.distribute.MirroredStrategy()
    multi_worker_devices.split_cpu(num_cpu_replicas)
    return tf.distribute.MirroredStrategy(
        devices=[d.name for d in tf.config.list_logical_devices("CPU")])
  if kind == "multi_worker":
    options = tf.distribute.experimental.CommunicationOptions(
        implementation=(tf.distribute.experimental.CommunicationImplementation
                        .NCCL if gpus else tf.distribute.experimental
                        .CommunicationImplementation.AUTO),
        timeout_seconds=collective_timeout_seconds)
    with _exit_unless_done_within(collective_timeout_seconds):
      if gpus or num_cpu_replicas == 1:
        return tf.distribute.MultiWorkerMirroredStrategy(
            communication_options=options)
      return multi_worker_devices.multi_worker_strategy_with_local_replicas(
          num_cpu_replicas, communication_options=options)
  raise ValueError(f"build_strategy.kind must be one of {STRATEGIES}, "
                   f"got {kind!r}")


def collective_timeout(strategy: tf.distribute.Strategy) -> Optional[float]:
  """The timeout of `strategy`'s collectives in seconds; None: no limit."""
  # TensorFlow keeps a strategy's CommunicationOptions private.
  options = getattr(strategy.extended, "_communication_options", None)
  return options and options.timeout_seconds


@contextlib.contextmanager
def _exit_unless_done_within(timeout_seconds: float):
  """Ends the process (exit code 1) if building the strategy takes longer.

  MultiWorkerMirroredStrategy waits in TensorFlow's runtime until every
  worker of TF_CONFIG has started its own: a worker that failed before then
  leaves the others waiting, with no timeout of its own. That
  wait holds the GIL and neither raises nor yields to SIGTERM (TensorFlow's
  preemption notifier catches it), so only faulthandler's watchdog thread,
  which needs no GIL, can end it; it prints where each thread waited.
  """
  logging.info(
      "Waiting for the other workers of TF_CONFIG to start; if one has not "
      "started its strategy within %g s "
      "(build_strategy.collective_timeout_seconds), this worker stops.",
      timeout_seconds)
  faulthandler.dump_traceback_later(timeout_seconds, exit=True)
  try:
    yield
  finally:
    faulthandler.cancel_dump_traceback_later()
