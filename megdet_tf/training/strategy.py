"""Distribution strategies for MegDet training, chosen by Gin.

- `one_device`: the first GPU, or the CPU.
- `mirrored`: all local GPUs with NCCL collectives; without GPUs, the CPU is
  split into `num_cpu_replicas` logical devices so that multi-replica
  training (and cross-replica BN) can be tried on a laptop.
- `multi_worker`: `MultiWorkerMirroredStrategy` from `TF_CONFIG`, NCCL on
  GPUs, and a collective timeout so that a dead peer ends the job with an
  error instead of a hang.

Logical CPU devices can only be configured before TensorFlow initialises its
runtime, so build the strategy before anything else touches a device.
"""
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
    collective_timeout_seconds: `multi_worker` collectives (the strategy's
      and cross-replica BN's, which take its options) that wait longer than
      this fail (a dead worker then stops the job).
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
    if gpus or num_cpu_replicas == 1:
      return tf.distribute.MultiWorkerMirroredStrategy(
          communication_options=options)
    return multi_worker_devices.multi_worker_strategy_with_local_replicas(
        num_cpu_replicas, communication_options=options)
  raise ValueError(f"build_strategy.kind must be one of {STRATEGIES}, "
                   f"got {kind!r}")
