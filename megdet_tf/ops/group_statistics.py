"""The local half of group BN: each replica's statistics and gradient sums.

Forward, a replica gives its element count n_r, float32 mean c_r and
M2_r = sum (x - c_r)^2 per channel (also for float16/bfloat16 inputs), and
`merge_moments` turns its group's into the group's. Backward, it sums dy and
dy * x_hat (also the gradients of beta and gamma); given the group's means of
those, dx = gamma / std * (dy - mean(dy) - x_hat * mean(dy * x_hat)), as the
paper's backward pass.

Two backends, same results, each pass over the activations in one kernel:
- `CompiledKernels` (CPUs): `megdet_tf.ops.group_norm_kernels`; the
  statistics in two reading passes, the sums in one, dx in one.
- `FusedKernels` (elsewhere, or without a C++ compiler): TensorFlow's fused
  BN kernels; the training kernel for the statistics, the gradient kernel for
  the sums and dy * gamma / std, the inference kernel for the rest of dx.
"""
from typing import Callable, Tuple

import tensorflow as tf

from megdet_tf.ops import group_norm_kernels

# (sum dy, sum dy * x_hat) -> the group's (mean dy, mean dy * x_hat).
GroupMeans = Callable[[tf.Tensor, tf.Tensor], Tuple[tf.Tensor, tf.Tensor]]


def fused_training_norm(
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


def merge_moments(count: tf.Tensor, mean: tf.Tensor,
                  m2: tf.Tensor) -> Tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
  """(n, mean, M2) of the union of replicas given theirs, stacked on axis 0.

    n = sum n_r,   ref = sum n_r c_r / n,   o_r = c_r - ref,
    mean = ref + d,   d = sum n_r o_r / n,
    M2 = sum (M2_r + n_r (mean - c_r)^2)

  Replicas weigh by their counts, so uneven and empty ones (n_r = 0 adds
  nothing) are handled. Nothing cancels as in E[x^2] - E[x]^2 (off by ~1 in
  float32 at mean 1e4 and unit variance): c_r - ref are differences of
  nearby floats, d is small and M2 sums non-negative terms. What remains is
  the float32 rounding of each c_r, ~1e-4 relative in the group variance at
  mean 1e4.
  """
  total = tf.reduce_sum(count, 0)
  reference = tf.math.divide_no_nan(tf.reduce_sum(count * mean, 0), total)
  offset = mean - reference
  mean_minus_reference = tf.math.divide_no_nan(
      tf.reduce_sum(count * offset, 0), total)
  gap = mean_minus_reference - offset  # Group mean - replica mean.
  return (total, reference + mean_minus_reference,
          tf.reduce_sum(m2 + count * tf.square(gap), 0))


class CompiledKernels:
  """Statistics, sums and dx by `megdet_tf.ops.group_norm_kernels`."""

  def __init__(self, kernels):
    self._kernels = kernels

  def moments(self, x: tf.Tensor, epsilon: float):
    """(n, mean, M2) of `x` [N, H, W, C]; `epsilon` unused."""
    del epsilon
    count = tf.cast(tf.reduce_prod(tf.shape(x)[:-1]), tf.float32)
    mean, m2 = self._kernels.megdet_channel_moments(x)
    return count, mean, m2

  def backward(self, dy, x, gamma, mean, variance, reserve, epsilon,
               group_means: GroupMeans):
    """(dx, sum dy * x_hat, sum dy) given the group's statistics.

    `reserve` is the forward fused kernel's reserve space (unused here).
    """
    del reserve
    inverse_std = tf.math.rsqrt(variance + epsilon)
    sum_dy, sum_dy_centered = self._kernels.megdet_channel_grad_sums(
        dy, x, mean)
    sum_dy_x_hat = sum_dy_centered * inverse_std
    mean_dy, mean_dy_x_hat = group_means(sum_dy, sum_dy_x_hat)
    gamma_over_std = gamma * inverse_std
    dx = self._kernels.megdet_group_norm_grad(
        dy, x, mean, gamma_over_std,
        -gamma_over_std * inverse_std * mean_dy_x_hat,
        -gamma_over_std * mean_dy)
    return dx, sum_dy_x_hat, sum_dy


class FusedKernels:
  """Statistics, sums and dx by TensorFlow's fused BN kernels."""

  def moments(self, x: tf.Tensor, epsilon: float):
    """(n, mean, M2) of `x` [N, H, W, C]."""
    channels = x.shape[-1]
    _, count, mean, variance = fused_training_norm(
        x, tf.ones([channels]), tf.zeros([channels]), epsilon)
    return count, mean, count * variance

  def backward(self, dy, x, gamma, mean, variance, reserve, epsilon,
               group_means: GroupMeans):
    """(dx, sum dy * x_hat, sum dy) given the group's statistics.

    `reserve` is the forward fused kernel's reserve space.
    """
    inverse_std = tf.math.rsqrt(variance + epsilon)
    # The gradient kernel gives the sums and dy * gamma / std.
    dx, sum_dy_x_hat, sum_dy, _, _ = tf.raw_ops.FusedBatchNormGradV3(
        y_backprop=dy, x=x, scale=gamma, reserve_space_1=mean,
        reserve_space_2=variance, reserve_space_3=reserve, epsilon=epsilon,
        is_training=False)
    mean_dy, mean_dy_x_hat = group_means(sum_dy, sum_dy_x_hat)
    gamma_over_std = gamma * inverse_std
    # The rest, -gamma / std * (mean(dy) + x_hat * mean(dy * x_hat)), is an
    # affine map of x per channel: the inference kernel applies it in one pass.
    correction, _, _, _, _, _ = tf.raw_ops.FusedBatchNormV3(
        x=x, scale=-gamma_over_std * mean_dy_x_hat,
        offset=-gamma_over_std * mean_dy, mean=mean, variance=variance,
        epsilon=epsilon, is_training=False)
    return dx + correction, sum_dy_x_hat, sum_dy


def for_devices(on_cpus: bool):
  """The compiled kernels on CPUs when they build, else the fused ones."""
  kernels = group_norm_kernels.load() if on_cpus else None
  return CompiledKernels(kernels) if kernels else FusedKernels()
