"""The private TensorFlow and Keras APIs cross-replica BN needs, in one place.

Why private: group BN must run its collectives the way the strategy runs its
own (same collective implementation, timeout and per-device ordering token,
see `group_launcher`), and TensorFlow exposes none of that publicly; the layer
also builds on Keras' BatchNormalization, whose update and training hooks are
protected. Everything here is checked by the CGBN tests (results, traced
collectives and their ordering), which are what to run after upgrading
TensorFlow.
"""
import functools

import tensorflow as tf
from tensorflow.python.distribute import cross_device_ops
from tensorflow.python.distribute import cross_device_utils
from tensorflow.python.distribute import distribute_utils

CollectiveLauncher = cross_device_utils.CollectiveReplicaLauncher
# Packs per-replica tensors into the strategy's distributed value.
regroup = distribute_utils.regroup


def strategy_launcher(strategy: tf.distribute.Strategy,
                      local_index: int) -> CollectiveLauncher:
  """The launcher of the strategy's collectives on its `local_index` device."""
  ops = strategy.extended._cross_device_ops  # pylint: disable=protected-access
  if not isinstance(ops, cross_device_ops.CollectiveAllReduce):
    raise ValueError(
        "Cross-replica BN groups exchanging through collectives need the "
        "strategy's cross-device ops to be CollectiveAllReduce (the default "
        "of MirroredStrategy and MultiWorkerMirroredStrategy) to order "
        f"their collectives with the strategy's, not {type(ops).__name__}.")
  return ops._launchers[local_index]  # pylint: disable=protected-access


def group_launcher(group_key: int, group_size: int,
                   follow: CollectiveLauncher) -> CollectiveLauncher:
  """A launcher for group `group_key` on the device of `follow`.

  It assigns its own instance keys at call time, and takes `follow`'s options
  (implementation, timeout) and ordering token, so that a device runs its
  group collectives and the strategy's in one program order.
  """
  # pylint: disable=protected-access
  device = follow._device
  collective_keys = cross_device_utils.CollectiveKeys(
      group_key_start=group_key)
  collective_keys.get_group_key([device])  # Registers device for group_key.
  launcher = CollectiveLauncher(group_key, group_size, collective_keys, device,
                                follow._options)
  launcher._ordering_token = follow._ordering_token
  return launcher


def all_gather(launcher: CollectiveLauncher, value: tf.Tensor) -> tf.Tensor:
  """The group's `value`s concatenated on axis 0, in replica order."""
  return launcher._all_gather(value, None)  # pylint: disable=protected-access


def keras_training_value(layer: tf.keras.layers.BatchNormalization, training):
  """`training` as Keras resolves it (the call argument, else the phase)."""
  return layer._get_training_value(training)  # pylint: disable=protected-access


def keras_moving_average_update(layer: tf.keras.layers.BatchNormalization,
                                variable: tf.Variable, value: tf.Tensor):
  """The update that moves `variable` towards `value` by the layer's momentum,
  as a callable for `layer.add_update`."""
  return functools.partial(layer._assign_moving_average, variable, value,  # pylint: disable=protected-access
                           layer.momentum, None)


def keras_local_moments(layer: tf.keras.layers.BatchNormalization, inputs,
                        reduction_axes, keep_dims, mask=None):
  """Keras BN's moments of `inputs` alone (no cross-replica sum)."""
  return layer._no_sync_calculate_mean_and_var(  # pylint: disable=protected-access
      inputs, reduction_axes, keep_dims, mask=mask)
