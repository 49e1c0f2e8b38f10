"""MegDet's Cross-GPU Batch Normalization: statistics over groups of replicas.

Keras' `BatchNormalization(synchronized=True)` shares statistics between all
replicas; MegDet shares them within groups of replicas (the paper's "BN size"
is the number of images in one group, best around 32, one group per machine).
No TensorFlow library forms such groups, hence this layer.
"""
import functools
import threading
from typing import Optional, Tuple
import weakref

import tensorflow as tf
# The collective launcher TensorFlow's own strategies use: it assigns instance
# keys at call time and orders a device's collectives with a per-device token.
from tensorflow.python.distribute import cross_device_ops
from tensorflow.python.distribute import cross_device_utils
from tensorflow.python.distribute import distribute_utils

from megdet_tf.ops import group_norm_kernels

# Group keys identify a set of devices across the whole cluster. The
# strategies' own keys count up from 1; ours live far above them and encode
# (group size, group index), so every process derives the same key for a group.
_GROUP_KEY_BASE = 1 << 28
_MAX_GROUPS = 1 << 16

# How group members share their rows in a traced step (see the layer).
EXCHANGES = ("auto", "collective")

# Group launchers by the strategy launcher they follow, then (group key,
# group size); they live as long as the strategy's launchers.
_launchers = weakref.WeakKeyDictionary()
# MirroredStrategy traces its replicas in threads.
_launchers_lock = threading.Lock()


def _strategy_launcher(
    strategy: tf.distribute.Strategy,
    local_index: int) -> cross_device_utils.CollectiveReplicaLauncher:
  """The launcher of the strategy's collectives on its `local_index` device.

  TensorFlow keeps it private (read here and in `_launcher` only). Group
  collectives take its ordering token: all collectives of a device, the
  group's and the strategy's (gradients), then run in one program order, the
  same on every replica, so none waits for a peer stuck behind another one.
  NCCL runs a GPU's communicators on one stream, where two
  unordered collectives can deadlock (TF's SyncBatchNormalization hangs of
  tensorflow#42111). They also take its options: the implementation and the
  timeout (`build_strategy.collective_timeout_seconds`), so a dead or stalled
  peer ends a group exchange as it ends a gradient all-reduce.
  """
  ops = strategy.extended._cross_device_ops  # pylint: disable=protected-access
  if not isinstance(ops, cross_device_ops.CollectiveAllReduce):
    raise ValueError(
        "Cross-replica BN groups exchanging through collectives need the "
        "strategy's cross-device ops to be CollectiveAllReduce (the default "
        "of MirroredStrategy and MultiWorkerMirroredStrategy) to order "
        f"their collectives with the strategy's, not {type(ops).__name__}.")
  return ops._launchers[local_index]  # pylint: disable=protected-access


def _launcher(
    group_key: int, group_size: int,
    strategy_launcher: cross_device_utils.CollectiveReplicaLauncher
) -> cross_device_utils.CollectiveReplicaLauncher:
  """The launcher of group `group_key` on `strategy_launcher`'s device.

  Shared by all BN layers; it issues the group's collectives (own group key
  and instance keys) on the strategy launcher's ordering token and options
  (see `_strategy_launcher`).
  """
  # pylint: disable=protected-access
  with _launchers_lock:
    launchers = _launchers.setdefault(strategy_launcher, {})
    key = (group_key, group_size)
    if key not in launchers:
      device = strategy_launcher._device
      collective_keys = cross_device_utils.CollectiveKeys(
          group_key_start=group_key)
      collective_keys.get_group_key([device])  # Registers device for group_key.
      launcher = cross_device_utils.CollectiveReplicaLauncher(
          group_key, group_size, collective_keys, device,
          strategy_launcher._options)
      # One token per device: BN and strategy collectives in one order.
      launcher._ordering_token = strategy_launcher._ordering_token
      launchers[key] = launcher
    return launchers[key]


def _on_cpus(replica_ctx) -> bool:
  """Whether this worker's replicas all run on CPUs."""
  return all("CPU" in device.upper()
             for device in replica_ctx.strategy.extended.worker_devices)


def _concatenate(values):
  return tf.concat(values, 0)


def _share_in_graph(strategy: tf.distribute.Strategy, value,
                    group_size: int, combine):
  """Each local replica's `combine` of its group's values, on its device.

  A `merge_call` function: `value` holds every local replica's tensor (the
  other arguments must be the same objects in every replica).
  """
  values = strategy.experimental_local_results(value)
  shared = []
  for index, device in enumerate(strategy.extended.worker_devices):
    first = index // group_size * group_size
    with tf.device(device):
      shared.append(combine(list(values[first:first + group_size])))
  return distribute_utils.regroup(tuple(shared))


def _fused_training_norm(
    x: tf.Tensor, scale: tf.Tensor, offset: tf.Tensor,
    epsilon: float) -> Tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
  """Per-replica BN of `x` [N, H, W, C] by the fused kernel.

  Returns y, the count N*H*W and the float32 mean and biased variance. The
  kernel computes them in two passes (the mean, then the squares around it)
  whatever the input dtype; its variance carries Bessel's correction, undone
  here. An empty `x` gives zero statistics (the kernel's NaNs are dropped).
  """
  y, mean, variance, _, _, _ = tf.raw_ops.FusedBatchNormV3(
      x=x, scale=scale, offset=offset, mean=tf.constant([]),
      variance=tf.constant([]), epsilon=epsilon, is_training=True)
  count = tf.cast(tf.reduce_prod(tf.shape(x)[:-1]), tf.float32)
  has_data = count > 0
  biased = tf.math.divide_no_nan(tf.maximum(count - 1, 0.0), count)
  return (y, count, tf.where(has_data, mean, 0.0),
          tf.where(has_data, variance * biased, 0.0))


def _merge_moments(count: tf.Tensor, mean: tf.Tensor,
                   m2: tf.Tensor) -> Tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
  """(count, mean, M2) of the union of replicas given theirs, stacked on axis 0.

  See the layer's docstring for the formulas.
  """
  total = tf.reduce_sum(count, 0)
  reference = tf.math.divide_no_nan(tf.reduce_sum(count * mean, 0), total)
  offset = mean - reference
  mean_minus_reference = tf.math.divide_no_nan(
      tf.reduce_sum(count * offset, 0), total)
  gap = mean_minus_reference - offset  # Group mean - replica mean.
  return (total, reference + mean_minus_reference,
          tf.reduce_sum(m2 + count * tf.square(gap), 0))


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
  Training across replicas normalizes the last axis, takes a Python bool
  `training` and no mask.

  Speed: only per-channel vectors travel, and each pass over the activations
  runs in one kernel. Forward, each replica takes its float32 mean and M2
  (also for float16/bfloat16 inputs); the group merges them; TensorFlow's
  fused inference kernel normalizes with the group statistics (and Grappler
  fuses a following ReLU into it). Backward, each replica sums dy and
  dy * x_hat (which are also the gradients of beta and gamma); the group sums
  those; dx = gamma / std * (dy - mean(dy) - x_hat * mean(dy * x_hat)) with
  the group's means, as the paper's backward pass does. On CPUs the
  statistics, the sums and dx come from `megdet_tf.ops.group_norm_kernels`
  (the statistics in two reading passes, the sums in one, dx in one);
  elsewhere, or without a C++ compiler, from TensorFlow's fused kernels: the
  training kernel for the statistics, the gradient kernel for the sums and
  dy * gamma / std, and the inference kernel for the rest of dx (an affine map
  of x per channel), with the same results. With group_size 1 the fused
  training kernel and its gradient do everything. Images stay [N, H, W, C]
  for the kernels, so Grappler keeps their layouts and fusions; other ranks
  are reshaped to [N', 1, 1, C].

  Merging: replica r contributes its element count n_r, mean c_r and
  M2_r = n_r * variance_r. The group computes

    n = sum n_r,   ref = sum n_r c_r / n,   o_r = c_r - ref,
    mean = ref + d,   d = sum n_r o_r / n,
    M2 = sum (M2_r + n_r (mean - c_r)^2),   variance = M2 / n (biased),

  the mean and variance of the concatenated group batch. Replicas are weighted
  by their counts, so uneven batches and empty replicas (n_r = 0 adds
  nothing) are handled. If the whole group is empty the moving statistics
  stay unchanged. Accuracy: the fused kernel sums squares around the
  replica's own mean, c_r - ref are differences of nearby floats, d is small,
  and M2 sums non-negative terms, so nothing cancels as in E[x^2] - E[x]^2
  (off by ~1 in float32 at mean 1e4 and unit variance). What remains is the
  rounding of each c_r by the kernel's float32 sum (~1e-3 at mean 1e4), which
  reaches the group variance to first order: ~1e-4 relative there.

  Communication per layer and training step, within the group only:
  forward, an all-gather of each replica's packed [3, C] (n, c, M2) into
  [group_size, 3C]; backward, an all-reduce of [2C]. How they run is
  `exchange`: with "auto" (the default), a group of CPU replicas of one worker
  shares the rows inside the traced graph (each member concatenates or adds
  its group's tensors, which live in the process's memory), which is cheaper
  than TensorFlow's CPU collectives; any other group, and every group with
  "collective", runs collectives over its own devices: own group keys, and
  the strategy's implementation (NCCL on GPUs), timeout and per-device
  ordering, so that a device runs its BN and gradient collectives in one
  program order. Every member computes the same merged statistics from the
  same gathered tensor, so its copy of the moving statistics (SyncOnRead
  variables, updated from the group statistics with the biased variance, as
  Keras' synchronized BN does) equals its group's; reading them in
  cross-replica context gives the mean over groups. All replicas must run the
  same layers in the same order. Replicas run eagerly (no tf.function; slow,
  for debugging) exchange their rows through global all-reduces instead, with
  the same results.
  """

  def __init__(self, group_size: Optional[int] = None, exchange: str = "auto",
               **kwargs):
    if group_size is not None and (not isinstance(group_size, int) or
                                   group_size < 1):
      raise ValueError(f"group_size must be None or a positive int, got "
                       f"{group_size!r}")
    if exchange not in EXCHANGES:
      raise ValueError(f"exchange must be one of {EXCHANGES}, got "
                       f"{exchange!r}")
    for option in ("virtual_batch_size", "adjustment", "renorm"):
      if kwargs.get(option):
        raise ValueError(f"{option} cannot be combined with cross-replica "
                         "groups; use BatchNormalization.")
    super().__init__(synchronized=True, **kwargs)
    self.group_size = group_size
    self.exchange = exchange

  def build(self, input_shape):
    super().build(input_shape)
    self.resolve_group_size(tf.distribute.get_strategy())

  def get_config(self):
    return {**super().get_config(), "group_size": self.group_size,
            "exchange": self.exchange}

  def resolve_group_size(self, strategy: tf.distribute.Strategy) -> int:
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
    # Reached with a single replica only (see call): plain BN's moments.
    return self._no_sync_calculate_mean_and_var(inputs, reduction_axes,
                                                keep_dims, mask=mask)

  def call(self, inputs, training=None, mask=None):
    replica_ctx = tf.distribute.get_replica_context()
    training = self._get_training_value(training)
    training_value = (training if isinstance(training, bool) else
                      tf.get_static_value(training))
    if (replica_ctx is None or replica_ctx.num_replicas_in_sync == 1 or
        (training_value is not None and not training_value)):
      return super().call(inputs, training=training, mask=mask)
    inputs = tf.cast(inputs, self.compute_dtype)
    self._check_can_share(inputs, training_value, mask)
    with tf.name_scope("group_batch_norm"):
      group_size = self.resolve_group_size(replica_ctx.strategy)
      # The fused kernels take [N, H, W, C]; other ranks become [N', 1, 1, C].
      is_image = inputs.shape.rank == 4
      x = inputs if is_image else tf.reshape(inputs,
                                             [-1, 1, 1, inputs.shape[-1]])
      y, count, mean, variance = self._normalize_with_group(
          x, replica_ctx, group_size)
      has_data = count > 0
      for moving, value in ((self.moving_mean, mean),
                            (self.moving_variance, variance)):
        self.add_update(functools.partial(
            self._assign_moving_average, moving,
            tf.where(has_data, value, moving), self.momentum, None))
      return y if is_image else tf.reshape(y, tf.shape(inputs))

  def _check_can_share(self, inputs, training_value, mask):
    problem = None
    if training_value is None:
      problem = "`training` must be a Python bool"
    elif mask is not None:
      problem = "masks are not supported"
    elif self.axis != [inputs.shape.rank - 1]:
      problem = f"only the last axis can be normalized, not {self.axis}"
    elif inputs.dtype == tf.float64:
      problem = "float64 is not supported (use float32, float16 or bfloat16)"
    if problem:
      raise ValueError(f"{self.name}: training across replicas: {problem}.")

  def _scale_and_offset(self, channels: int) -> Tuple[tf.Tensor, tf.Tensor]:
    return (tf.convert_to_tensor(self.gamma) if self.scale else
            tf.ones([channels]),
            tf.convert_to_tensor(self.beta) if self.center else
            tf.zeros([channels]))

  def _normalize_with_group(self, x, replica_ctx, group_size):
    """BN of `x` [N, H, W, C] with its group's statistics (see the class).

    Returns y, and the group's count, mean and biased variance.
    """
    channels = x.shape[-1]
    if group_size == 1:
      return _fused_training_norm(x, *self._scale_and_offset(channels),
                                  self.epsilon)
    kernels = group_norm_kernels.load() if _on_cpus(replica_ctx) else None
    if kernels:
      local_count = tf.cast(tf.reduce_prod(tf.shape(x)[:-1]), tf.float32)
      local_mean, local_m2 = kernels.megdet_channel_moments(x)
    else:
      _, local_count, local_mean, local_variance = _fused_training_norm(
          x, tf.ones([channels]), tf.zeros([channels]), self.epsilon)
      local_m2 = local_count * local_variance
    rows = self._gather_group(
        tf.reshape(tf.stack([tf.fill([channels], local_count), local_mean,
                             local_m2]), [1, -1]),
        replica_ctx, group_size)
    count, mean, m2 = _merge_moments(
        *tf.unstack(tf.reshape(rows, [group_size, 3, channels]), axis=1))
    variance = tf.math.divide_no_nan(m2, count)
    epsilon = self.epsilon
    # The backward collective is named after this layer too (it would
    # otherwise land at the top level), so that profiles attribute it.
    scope = tf.get_current_name_scope()

    @tf.custom_gradient
    def normalize(x, gamma, beta):
      y, _, _, _, _, reserve = tf.raw_ops.FusedBatchNormV3(
          x=x, scale=gamma, offset=beta, mean=mean, variance=variance,
          epsilon=epsilon, is_training=False)

      def grad(dy):
        # dx = gamma / std * (dy - mean(dy) - x_hat * mean(dy * x_hat)) with
        # the group's means of the local sums of dy and dy * x_hat.
        inverse_std = tf.math.rsqrt(variance + epsilon)
        if kernels:
          sum_dy, sum_dy_centered = kernels.megdet_channel_grad_sums(
              dy, x, mean)
          sum_dy_x_hat = sum_dy_centered * inverse_std
        else:  # The fused kernel gives the sums and the first term of dx.
          dx, sum_dy_x_hat, sum_dy, _, _ = tf.raw_ops.FusedBatchNormGradV3(
              y_backprop=dy, x=x, scale=gamma, reserve_space_1=mean,
              reserve_space_2=variance, reserve_space_3=reserve,
              epsilon=epsilon, is_training=False)
        group_sums = tf.math.divide_no_nan(self._sum_group(
            tf.concat([sum_dy, sum_dy_x_hat], 0), replica_ctx, group_size,
            scope), tf.concat([count, count], 0))
        mean_dy, mean_dy_x_hat = tf.split(group_sums, 2)
        gamma_over_std = gamma * inverse_std
        if kernels:
          dx = kernels.megdet_group_norm_grad(
              dy, x, mean, gamma_over_std,
              -gamma_over_std * inverse_std * mean_dy_x_hat,
              -gamma_over_std * mean_dy)
        else:
          # The rest, -gamma / std * (mean(dy) + x_hat * mean(dy * x_hat)),
          # is an affine map of x per channel: the fused inference kernel
          # applies it in one pass over x.
          correction, _, _, _, _, _ = tf.raw_ops.FusedBatchNormV3(
              x=x, scale=-gamma_over_std * mean_dy_x_hat,
              offset=-gamma_over_std * mean_dy, mean=mean,
              variance=variance, epsilon=epsilon, is_training=False)
          dx += correction
        return dx, sum_dy_x_hat, sum_dy

      return y, grad

    y = normalize(x, *self._scale_and_offset(channels))
    return y, count, mean, variance

  def _group_member(self, replica_ctx, group_size):
    """(global replica id, group index) of the calling replica."""
    strategy = replica_ctx.strategy
    replica_id = tf.get_static_value(replica_ctx.replica_id_in_sync_group)
    if replica_id is None:
      raise ValueError(f"{self.name}: {type(strategy).__name__} has no static "
                       "replica ids; use MirroredStrategy or "
                       "MultiWorkerMirroredStrategy.")
    group_index = int(replica_id) // group_size
    if group_index >= _MAX_GROUPS:
      raise ValueError(f"{self.name}: more than {_MAX_GROUPS} BN groups.")
    return int(replica_id), group_index

  def _group_launcher(self, replica_ctx, group_size):
    replica_id, group_index = self._group_member(replica_ctx, group_size)
    strategy = replica_ctx.strategy
    return _launcher(
        _GROUP_KEY_BASE + group_size * _MAX_GROUPS + group_index, group_size,
        _strategy_launcher(strategy, replica_id %
                           len(strategy.extended.worker_devices)))

  def _gather_group(self, packed, replica_ctx, group_size):
    """All group members' `packed` rows, [group_size, D], in replica order."""
    if tf.executing_eagerly():
      # Eager MirroredStrategy runs its replicas one at a time, so a group
      # collective would wait forever for its peers. Keras' all-reduce meets
      # them in a merge_call: all-reduce [num_replicas, D] rows, each replica
      # filling its own, and keep the group's rows.
      replica_id, group_index = self._group_member(replica_ctx, group_size)
      rows = tf.scatter_nd([[replica_id]], packed,
                           [replica_ctx.num_replicas_in_sync, packed.shape[1]])
      return replica_ctx.all_reduce(tf.distribute.ReduceOp.SUM, rows)[
          group_index * group_size:(group_index + 1) * group_size]
    with tf.name_scope("cgbn_allgather"):
      if self._shares_in_graph(replica_ctx, group_size):
        return replica_ctx.merge_call(
            _share_in_graph, args=(packed, group_size, _concatenate))
      return self._group_launcher(replica_ctx, group_size)._all_gather(  # pylint: disable=protected-access
          packed, None)

  def _sum_group(self, values, replica_ctx, group_size, scope):
    """The sum of `values` [D] over the group, named after `scope`."""
    if tf.executing_eagerly():
      return tf.reduce_sum(
          self._gather_group(values[tf.newaxis], replica_ctx, group_size), 0)
    # A name ending in "/" re-enters `scope` from wherever backprop runs.
    with tf.name_scope(f"{scope}/cgbn_grad_allreduce/" if scope else
                       "cgbn_grad_allreduce"):
      if self._shares_in_graph(replica_ctx, group_size):
        return replica_ctx.merge_call(
            _share_in_graph, args=(values, group_size, tf.add_n))
      return self._group_launcher(replica_ctx, group_size).all_reduce(values)

  def _shares_in_graph(self, replica_ctx, group_size) -> bool:
    """Whether the group is CPU replicas of this worker and `exchange` allows."""
    return (self.exchange == "auto" and _on_cpus(replica_ctx) and
            len(replica_ctx.strategy.extended.worker_devices) % group_size == 0)
