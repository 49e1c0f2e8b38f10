"""MegDet's Cross-GPU Batch Normalization: statistics over groups of replicas.

Keras' `BatchNormalization(synchronized=True)` shares statistics between all
replicas; MegDet shares them within groups of replicas (the paper's "BN size"
is the number of images in one group, best around 32, one group per machine).
No TensorFlow library forms such groups, hence this layer. Its two halves live
in `megdet_tf.ops`: `group_statistics` (what each replica computes) and
`group_exchange` (how a group shares it).
"""
from typing import Optional, Tuple

import tensorflow as tf

from megdet_tf.ops import group_exchange
from megdet_tf.ops import group_statistics
from megdet_tf.ops import private_tf_api


@tf.keras.utils.register_keras_serializable(package="megdet_tf")
class CrossReplicaBatchNormalization(tf.keras.layers.BatchNormalization):
  """Batch normalization with statistics shared by a group of replicas.

  Same weights, config, checkpoints and inference as
  `BatchNormalization(synchronized=True)`; only the training statistics differ.

  Groups: global replica ids are cut into contiguous blocks of `group_size`.
  `None` means all replicas of the local worker (the paper's one-machine rule),
  1 per-replica BN, `num_replicas_in_sync` global sync BN. It must divide
  `num_replicas_in_sync` (checked when built under a strategy and when
  called). With a single replica the layer is plain non-fused BN, so a model
  trained with groups evaluates and exports on one device.

  What is exchanged, within the group only, per layer and training step:
  forward, each replica's count, mean and M2 per channel ([3, C], gathered);
  backward, its sums of dy and dy * x_hat ([2C], summed). Every member merges
  the same rows, so its moving statistics (SyncOnRead, biased variance, as
  Keras' synchronized BN) equal its group's; a cross-replica read gives the
  mean over groups. Uneven batches weigh by their counts and empty replicas
  add nothing; an all-empty group leaves the moving statistics unchanged. The
  merge sums squares around each replica's mean, so nothing cancels as in
  E[x^2] - E[x]^2. All replicas must run the same layers in the same order.
  Training across replicas normalizes the last axis, takes a Python bool
  `training` and no mask. `exchange` is one of `group_exchange.EXCHANGES`.
  """

  def __init__(self, group_size: Optional[int] = None, exchange: str = "auto",
               **kwargs):
    if group_size is not None and (not isinstance(group_size, int) or
                                   group_size < 1):
      raise ValueError(f"group_size must be None or a positive int, got "
                       f"{group_size!r}")
    if exchange not in group_exchange.EXCHANGES:
      raise ValueError(f"exchange must be one of {group_exchange.EXCHANGES}, got "
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
    return private_tf_api.keras_local_moments(self, inputs, reduction_axes,
                                              keep_dims, mask=mask)

  def call(self, inputs, training=None, mask=None):
    replica_ctx = tf.distribute.get_replica_context()
    training = private_tf_api.keras_training_value(self, training)
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
          x, replica_ctx.strategy, group_exchange.GroupExchange(
              replica_ctx, group_size, self.exchange, self.name))
      has_data = count > 0
      for moving, value in ((self.moving_mean, mean),
                            (self.moving_variance, variance)):
        self.add_update(private_tf_api.keras_moving_average_update(
            self, moving, tf.where(has_data, value, moving)))
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

  def _normalize_with_group(self, x, strategy, exchange):
    """BN of `x` [N, H, W, C] with its group's statistics.

    Returns y, and the group's count, mean and biased variance.
    """
    channels = x.shape[-1]
    if exchange.group_size == 1:
      return group_statistics.fused_training_norm(
          x, *self._scale_and_offset(channels), self.epsilon)
    statistics = group_statistics.for_devices(
        group_exchange.on_cpus(strategy))
    local_count, local_mean, local_m2 = statistics.moments(x, self.epsilon)
    rows = exchange.gather(
        tf.reshape(tf.stack([tf.fill([channels], local_count), local_mean,
                             local_m2]), [1, -1]))
    count, mean, m2 = group_statistics.merge_moments(*tf.unstack(
        tf.reshape(rows, [exchange.group_size, 3, channels]), axis=1))
    variance = tf.math.divide_no_nan(m2, count)
    epsilon = self.epsilon
    # The backward exchange is named after this layer too (it would otherwise
    # land at the top level), so that profiles attribute it.
    scope = tf.get_current_name_scope()

    def group_means(sum_dy, sum_dy_x_hat):
      sums = tf.math.divide_no_nan(
          exchange.sum(tf.concat([sum_dy, sum_dy_x_hat], 0), scope),
          tf.concat([count, count], 0))
      return tf.split(sums, 2)

    @tf.custom_gradient
    def normalize(x, gamma, beta):
      y, _, _, _, _, reserve = tf.raw_ops.FusedBatchNormV3(
          x=x, scale=gamma, offset=beta, mean=mean, variance=variance,
          epsilon=epsilon, is_training=False)
      return y, lambda dy: statistics.backward(
          dy, x, gamma, mean, variance, reserve, epsilon, group_means)

    y = normalize(x, *self._scale_and_offset(channels))
    return y, count, mean, variance
