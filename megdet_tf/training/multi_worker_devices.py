"""Several replicas per worker for MultiWorkerMirroredStrategy on CPU.

On a worker without GPUs, TensorFlow's MultiWorkerMirroredStrategy makes one
replica (`CollectiveAllReduceExtended._initialize_local_devices` hard-codes one
CPU device). Tests and CPU experiments of group BN need groups inside a worker,
so this splits the CPU into logical devices and makes one replica per device.
It overrides a private method: unsupported by TensorFlow, kept to this file.
"""
from typing import Optional

import tensorflow as tf
from tensorflow.python.distribute import collective_all_reduce_strategy


def split_cpu(num_devices: int) -> None:
  """Splits the physical CPU into `num_devices` logical CPU devices.

  Must run before TensorFlow initialises its devices (before the first op);
  afterwards it only succeeds if the split is already in place.
  """
  cpu = tf.config.list_physical_devices("CPU")[0]
  try:
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * num_devices)
  except RuntimeError as e:  # Devices already initialised.
    have = len(tf.config.list_logical_devices("CPU"))
    if have != num_devices:
      raise RuntimeError(
          f"Cannot split the CPU into {num_devices} logical devices: "
          f"TensorFlow already initialised {have}. Call split_cpu before any "
          "TensorFlow op runs.") from e


class _CPUReplicasExtended(
    collective_all_reduce_strategy.CollectiveAllReduceExtended):
  """Gives a GPU-less worker one replica per logical CPU device."""

  def __init__(self, container_strategy, replicas_per_worker: int, **kwargs):
    self._replicas_per_worker = replicas_per_worker
    super().__init__(container_strategy, **kwargs)

  def _initialize_local_devices(self, cluster_resolver, worker_device):
    devices, device_type = super()._initialize_local_devices(
        cluster_resolver, worker_device)
    if device_type != "CPU":
      return devices, device_type
    return tuple(f"{worker_device}/device:CPU:{i}"
                 for i in range(self._replicas_per_worker)), "CPU"


class _CPUReplicasStrategy(tf.distribute.MultiWorkerMirroredStrategy):
  """MultiWorkerMirroredStrategy whose CPU workers have several replicas."""

  def __init__(self, replicas_per_worker, cluster_resolver,
               communication_options):
    tf.distribute.Strategy.__init__(  # pylint: disable=non-parent-init-called
        self,
        _CPUReplicasExtended(
            self,
            replicas_per_worker,
            cluster_resolver=cluster_resolver,
            communication_options=(communication_options or
                                   tf.distribute.experimental
                                   .CommunicationOptions())))


def multi_worker_strategy_with_local_replicas(
    replicas_per_worker: int = 1,
    cluster_resolver: Optional[
        tf.distribute.cluster_resolver.ClusterResolver] = None,
    communication_options: Optional[
        tf.distribute.experimental.CommunicationOptions] = None
) -> tf.distribute.MultiWorkerMirroredStrategy:
  """A MultiWorkerMirroredStrategy with `replicas_per_worker` CPU replicas.

  Splits the CPU (see `split_cpu`, so call this before any TensorFlow op) and
  builds the strategy from `TF_CONFIG` or `cluster_resolver`. Workers with
  GPUs keep TensorFlow's one replica per GPU and ignore `replicas_per_worker`.
  """
  if replicas_per_worker < 1:
    raise ValueError(
        f"replicas_per_worker must be >= 1, got {replicas_per_worker}")
  if replicas_per_worker == 1 or tf.config.list_physical_devices("GPU"):
    return tf.distribute.MultiWorkerMirroredStrategy(
        cluster_resolver=cluster_resolver,
        communication_options=communication_options)
  split_cpu(replicas_per_worker)
  return _CPUReplicasStrategy(replicas_per_worker, cluster_resolver,
                              communication_options)
