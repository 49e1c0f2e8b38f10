"""The optimizer: Keras SGD with momentum 0.9, as in the paper.

Weight decay (λ = 1e-4) is not here: the paper puts it in the loss as the
L2 term (λ/2)‖w‖² (eq. 1), so it is part of the detector's loss and its
gradient goes through momentum like every other term. Gradient clipping
(`clipnorm` per variable, `global_clipnorm` over all) acts on the gradients
after they are summed over replicas.

`MomentumSGD` is Keras' SGD with its dense update in one fused kernel.

LARS and LAMB (Model Garden's implementations) are there for batches beyond
the paper's 256; their own `weight_decay_rate` defaults to 0 for the same
reason.

Not named `build_optimizer`: Model Garden registers a Gin configurable of that
name, and a bare `build_optimizer.momentum` binding would be ambiguous.
"""
from typing import Optional, Union

import gin
import tensorflow as tf

from official.modeling.optimization import lamb
from official.modeling.optimization import lars

OPTIMIZERS = ("sgd", "lars", "lamb")

LearningRate = Union[float, tf.keras.optimizers.schedules.LearningRateSchedule]


@tf.keras.utils.register_keras_serializable(package="megdet_tf")
class MomentumSGD(tf.keras.optimizers.SGD):
  """`tf.keras.optimizers.SGD` whose dense momentum update is one kernel.

  `ResourceApplyKerasMomentum` (the kernel of Keras' legacy SGD) computes
  SGD's own update, m <- momentum m - lr g and w <- w + m (Nesterov: w <- w +
  momentum m - lr g), in one pass over w, m and g. SGD's `update_step` runs
  six element-wise ops per variable instead, which XLA fuses only on GPUs:
  on CPUs each is its own pass over every variable.
  Slots, checkpoints and config are SGD's; sparse gradients and momentum 0
  take SGD's path.
  """

  def update_step(self, gradient, variable):
    if isinstance(gradient, tf.IndexedSlices) or not self.momentum:
      return super().update_step(gradient, variable)
    momentum = self.momentums[self._index_dict[self._var_key(variable)]]
    return tf.raw_ops.ResourceApplyKerasMomentum(
        var=variable.handle, accum=momentum.handle,
        lr=tf.cast(self.learning_rate, variable.dtype), grad=gradient,
        momentum=tf.cast(self.momentum, variable.dtype),
        use_nesterov=self.nesterov)


@gin.configurable
def build_training_optimizer(learning_rate: LearningRate,
                    optimizer: str = "sgd",
                    momentum: float = 0.9,
                    nesterov: bool = False,
                    clipnorm: Optional[float] = None,
                    global_clipnorm: Optional[float] = None,
                    **kwargs) -> tf.keras.optimizers.Optimizer:
  """Returns the training optimizer.

  Args:
    learning_rate: a float or the run's schedule (`build_lr_schedule`); the
      update at `optimizer.iterations` = s uses `learning_rate(s)`.
    optimizer: `sgd` (`MomentumSGD`, Keras' SGD), `lars` or `lamb`.
    momentum: momentum of `sgd` and `lars` (`lamb` has `beta_1` instead).
    nesterov: Nesterov momentum for `sgd` and `lars`.
    clipnorm: clip each variable's gradient to this norm.
    global_clipnorm: clip all gradients together to this global norm.
    **kwargs: passed to the optimizer class, e.g. `eeta` for LARS or
      `beta_1` for LAMB.
  """
  if clipnorm is not None and global_clipnorm is not None:
    raise ValueError("Set at most one of build_training_optimizer.clipnorm "
                     "and build_training_optimizer.global_clipnorm")
  kwargs.update({k: v for k, v in (("clipnorm", clipnorm),
                                   ("global_clipnorm", global_clipnorm))
                 if v is not None})
  if optimizer == "sgd":
    return MomentumSGD(learning_rate, momentum=momentum, nesterov=nesterov,
                       **kwargs)
  if optimizer == "lars":
    return lars.LARS(learning_rate, momentum=momentum, nesterov=nesterov,
                     **kwargs)
  if optimizer == "lamb":
    return lamb.LAMB(learning_rate, **kwargs)
  raise ValueError("build_training_optimizer.optimizer must be one of "
                   f"{OPTIMIZERS}, got {optimizer!r}")
