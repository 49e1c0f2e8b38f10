"""MegDet's Cross-GPU Batch Normalization: statistics over groups of replicas.

Keras' `BatchNormalization(synchronized=True)` shares statistics between all
replicas; MegDet shares them within groups of replicas (the paper's "BN size"
is the number of images in one group, best around 32, one group per machine).
No TensorFlow library forms such groups, hence this layer.
"""
import threading
from typing import Optional, Sequence, Tuple

import tensorflow as tf
# The collective launcher TensorFlow's own strategies use: it assigns instance
# keys at call time and orders a device's collectives with a per-device token.
from tensorflow.python.distribute import collective_util
from tensorflow.python.distribute import cross_device_utils

# Group keys identify a set of devices across the whole cluster. The
# strategies' own keys count up from 1; ours live far above them and encode
# (group size, group index), so every process derives the same key for a group.
_GROUP_KEY_BASE = 1 << 28
_MAX_GROUPS = 1 << 16

_launchers = {}
# MirroredStrategy traces its replicas in threads.
_launchers_lock = threading.Lock()


def _launcher(group_key: int, group_size: int,
              device: str) -> cross_device_utils.CollectiveReplicaLauncher:
  """The launcher of `device` in group `group_key`, shared by all BN layers.

  Sharing it means one ordering token per device and group: all BN collectives
  of a device run in program order, the same order on every group member.
  """
  with _launchers_lock:
    key = (group_key, group_size, device)
    if key not in _launchers:
      collective_keys = cross_device_utils.CollectiveKeys(
          group_key_start=group_key)
      collective_keys.get_group_key([device])  # Registers device for group_key.
      implementation = (
          collective_util.CommunicationImplementation.NCCL
          if "GPU" in device.upper() else
          collective_util.CommunicationImplementation.AUTO)
      _launchers[key] = cross_device_utils.CollectiveReplicaLauncher(
          group_key, group_size, collective_keys, device,
          collective_util.Options(implementation=implementation))
    return _launchers[key]


def _group_all_gather(launcher: cross_device_utils.CollectiveReplicaLauncher,
                      rank: int, packed: tf.Tensor) -> tf.Tensor:
  """Gathers every member's `packed` [1, D] into [group_size, D].

  `CollectiveGatherV2` has no registered gradient. Member r's row reaches every
  member, so its gradient is the group sum of the incoming gradients' row r:
  one all-reduce of [group_size, D] in the backward pass.

  Both collectives are named after the calling layer's scope
  (`.../cgbn_allgather`, `.../cgbn_grad_allreduce`) so that profiles attribute
  them; the gradient would otherwise be created anonymously at the top level.
  """
  scope = tf.get_current_name_scope()
  scope = f"{scope}/" if scope else ""

  @tf.custom_gradient
  def gather(x):
    def grad(dy):
      with tf.name_scope(f"{scope}cgbn_grad_allreduce/"):
        return launcher.all_reduce(dy)[rank:rank + 1]
    with tf.name_scope("cgbn_allgather"):
      gathered = launcher._all_gather(x, None)  # pylint: disable=protected-access
    return gathered, grad

  return gather(packed)


def _replica_sums(x: tf.Tensor, axes: Sequence[int],
                  mask: Optional[tf.Tensor]) -> tf.Tensor:
  """This replica's [count, shift, sum(x - shift), sum((x - shift)^2)].

  Reduced over `axes` (kept as size-1 dimensions) and stacked on a new first
  axis. `shift` is the replica's own mean as rounded to the compute dtype,
  held constant for differentiation; an empty batch gives zeros, not NaN.
  """
  if mask is None:
    weights = None
    total = tf.reduce_sum(x, axes, keepdims=True)
    size = tf.reduce_prod(tf.gather(tf.shape(x), axes))
    count = tf.fill(tf.shape(total), tf.cast(size, x.dtype))
  else:
    weights = tf.broadcast_to(
        tf.expand_dims(tf.cast(mask, x.dtype), -1), tf.shape(x))
    total = tf.reduce_sum(weights * x, axes, keepdims=True)
    count = tf.reduce_sum(weights, axes, keepdims=True)
  shift = tf.stop_gradient(tf.math.divide_no_nan(total, count))
  centered = x - shift
  weighted = centered if weights is None else weights * centered
  return tf.stack([
      count, shift,
      tf.reduce_sum(weighted, axes, keepdims=True),
      tf.reduce_sum(weighted * centered, axes, keepdims=True)
  ])


def _merge_sums(sums: tf.Tensor) -> Tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
  """(count, mean, M2) of the union of the replicas whose sums are stacked.

  `sums` is [num_replicas, 4, ...] from `_replica_sums`; see the layer's
  docstring for the formulas.
  """
  count, shift, s1, s2 = tf.unstack(sums, axis=1)
  total = tf.reduce_sum(count, 0)
  reference = tf.math.divide_no_nan(tf.reduce_sum(count * shift, 0), total)
  offset = shift - reference
  mean_minus_reference = tf.math.divide_no_nan(
      tf.reduce_sum(s1 + count * offset, 0), total)
  e = mean_minus_reference - offset  # mean - shift, per replica.
  m2 = tf.reduce_sum(s2 - 2 * e * s1 + count * tf.square(e), 0)
  return total, reference + mean_minus_reference, m2


@tf.keras.utils.register_keras_serializable(package="megdet_tf")
class CrossReplicaBatchNormalization(tf.keras.layers.BatchNormalization):
  """Batch normalization with statistics shared by a group of replicas.

  Same weights, config, checkpoints and inference as
  `BatchNormalization(synchronized=True)`; only the training statistics differ.

  Groups: global replica ids are cut into contiguous blocks of `group_size`
  (group g = replicas g*group_size ... (g+1)*group_size - 1). `None` means all
  replicas of the local worker (the paper's one-machine rule; no traffic
  between workers), 1 per-replica BN, `num_replicas_in_sync` global sync BN.
  Groups may span workers. With a single replica (no strategy, one-device
  strategy) the layer is plain non-fused BN whatever `group_size` says, so a
  model trained with groups can be evaluated and exported on one device. The
  group size must divide `num_replicas_in_sync`: checked when the layer is
  built under a strategy, and again whenever it is called in a replica context.

  Numerics: statistics are computed in float32 (float64 for float64 layers;
  the base class upcasts float16/bfloat16 inputs). Each replica r computes,
  per channel, its element count n_r, a shift c_r (its own mean rounded to
  float32, a constant for differentiation) and the shifted sums
  s1_r = sum(x - c_r) and s2_r = sum((x - c_r)^2). The group merges them:

    n = sum n_r,   ref = sum n_r c_r / n,   o_r = c_r - ref,
    mean = ref + d,   d = sum (s1_r + n_r o_r) / n,   e_r = d - o_r,
    M2 = sum (s2_r - 2 e_r s1_r + n_r e_r^2),   variance = M2 / n (biased),

  which is exactly the mean and variance of the concatenated group batch
  (e_r = mean - c_r expands each replica's squares around the group mean).
  Replicas are weighted by their counts, so uneven batches and empty replicas
  (n_r = 0 adds nothing) are handled. Nothing cancels: x - c_r and c_r - ref
  are differences of nearby floats (exact when the mean is large), s1_r is
  tiny, and M2 sums non-negative terms, unlike E[x^2] - E[x]^2, which in
  float32 loses the variance of inputs with mean 1e4 and unit variance. The
  shifts also avoid the ~1e-4 relative error a plain merge of float32 means
  (Chan's formula) makes there. If the whole group is empty the moving
  statistics stand in, so they stay unchanged.

  Communication per layer and training step, over the group's own devices
  only (own group keys, NCCL on GPUs): forward, one all-gather of each
  replica's packed [4, C] (n, c, s1, s2) into [group_size, 4C]; backward, one
  all-reduce of its [group_size, 4C] gradient. Every member computes the same
  merged statistics from the same gathered tensor, so its copy of the moving
  statistics (SyncOnRead variables, updated from the group statistics) equals
  its group's; reading them in cross-replica context gives the mean over
  groups. All replicas must run the same layers in the same order. Replicas
  run eagerly (no tf.function; slow, for debugging) exchange their rows
  through one global all-reduce instead, with the same results.
  """

  def __init__(self, group_size: Optional[int] = None, **kwargs):
    if group_size is not None and (not isinstance(group_size, int) or
                                   group_size < 1):
      raise ValueError(f"group_size must be None or a positive int, got "
                       f"{group_size!r}")
    if kwargs.get("virtual_batch_size") is not None:
      raise ValueError("virtual_batch_size (ghost batches) cannot be combined "
                       "with cross-replica groups; use BatchNormalization.")
    super().__init__(synchronized=True, **kwargs)
    self.group_size = group_size

  def build(self, input_shape):
    super().build(input_shape)
    self._resolve_group_size(tf.distribute.get_strategy())

  def get_config(self):
    return {**super().get_config(), "group_size": self.group_size}

  def _support_zero_size_input(self):
    # The base class skips the moving-statistics update of an empty replica;
    # here its group's statistics still apply (see _calculate_mean_and_var).
    return False

  def _resolve_group_size(self, strategy: tf.distribute.Strategy) -> int:
    """Replicas per group under `strategy`; 1 if there is nothing to share."""
    num_replicas = strategy.num_replicas_in_sync
    if num_replicas == 1:
      return 1
    group_size = self.group_size or len(strategy.extended.worker_devices)
    if group_size > num_replicas or num_replicas % group_size:
      raise ValueError(
          f"{self.name}: group_size={group_size} must divide the "
          f"{num_replicas} replicas in sync of {type(strategy).__name__} "
          f"(use a divisor, or None for the replicas of one worker).")
    return group_size

  def _calculate_mean_and_var(self, inputs, reduction_axes, keep_dims,
                              mask=None):
    with tf.name_scope("group_moments"):
      sums = _replica_sums(inputs, reduction_axes, mask)
      replica_ctx = tf.distribute.get_replica_context()
      group_size = (self._resolve_group_size(replica_ctx.strategy)
                    if replica_ctx is not None else 1)
      if group_size > 1:
        packed = tf.reshape(sums, [1, -1])
        sums = tf.reshape(
            self._gather_group(packed, replica_ctx, group_size),
            tf.concat([[group_size], tf.shape(sums)], 0))
      else:
        sums = sums[tf.newaxis]
      count, mean, m2 = _merge_sums(sums)
      variance = tf.math.divide_no_nan(m2, count)
      if not keep_dims:
        count, mean, variance = (tf.squeeze(t, reduction_axes)
                                 for t in (count, mean, variance))
      has_data = count > 0
      return (tf.where(has_data, mean, self.moving_mean),
              tf.where(has_data, variance, self.moving_variance))

  def _gather_group(self, packed, replica_ctx, group_size):
    """All group members' `packed` rows, [group_size, D], in replica order."""
    strategy = replica_ctx.strategy
    replica_id = tf.get_static_value(replica_ctx.replica_id_in_sync_group)
    if replica_id is None:
      raise ValueError(f"{self.name}: {type(strategy).__name__} has no static "
                       "replica ids; use MirroredStrategy or "
                       "MultiWorkerMirroredStrategy.")
    group_index, rank = divmod(int(replica_id), group_size)
    if tf.executing_eagerly():
      # Eager MirroredStrategy runs its replicas one at a time, so a group
      # collective would wait forever for its peers. Keras' all-reduce meets
      # them in a merge_call: all-reduce [num_replicas, D] rows, each replica
      # filling its own, and keep the group's rows.
      rows = tf.scatter_nd([[replica_id]], packed,
                           [strategy.num_replicas_in_sync, packed.shape[1]])
      return replica_ctx.all_reduce(tf.distribute.ReduceOp.SUM, rows)[
          group_index * group_size:(group_index + 1) * group_size]
    if group_index >= _MAX_GROUPS:
      raise ValueError(f"{self.name}: more than {_MAX_GROUPS} BN groups.")
    local_devices = strategy.extended.worker_devices
    launcher = _launcher(
        _GROUP_KEY_BASE + group_size * _MAX_GROUPS + group_index, group_size,
        local_devices[replica_id % len(local_devices)])
    return _group_all_gather(launcher, rank, packed)
