"""MegDet's learning-rate policy: linear scaling, linear warmup, step decay.

The peak rate is derived, never typed: `base_learning_rate` is the paper's
rate r = 0.02 for `reference_batch_size` = 16 images, and a global batch k
times larger trains at k·r (the paper's variance-equivalence argument: one
step at batch kN with rate k·r has the variance of k steps at batch N with
rate r). Training starts at r and climbs linearly, every iteration, to k·r
(Goyal et al.'s gradual warmup), then the rate drops by the policy's
multipliers at epoch boundaries converted to steps from the dataset size and
the global batch.

Steps count optimizer updates already applied (`optimizer.iterations`, from
0): the update made at step s uses `schedule(s)`.
"""
import dataclasses
import math
from typing import Optional, Sequence, Tuple, Union

import gin
import tensorflow as tf


def _check(condition: bool, message: str):
  if not condition:
    raise ValueError(message)


@gin.register
@tf.keras.utils.register_keras_serializable(package="megdet_tf")
class WarmupLinearScaling(tf.keras.optimizers.schedules.LearningRateSchedule):
  """Linearly scaled peak rate, linear warmup, piecewise-constant decay.

  lr(s) = start + (peak - start) · s / warmup_steps     for s < warmup_steps
        = peak · multipliers[i]  for the last i with s >= boundaries[i]
        = peak                   otherwise,
  with peak = base_learning_rate · global_batch_size / reference_batch_size
  · peak_scale. Decay boundaries may not fall inside the warmup: a decay the
  warmup would hide is a misconfiguration (usually a warmup given in steps on
  a small dataset), so it is an error rather than a silent choice.
  """

  def __init__(self,
               base_learning_rate: float,
               reference_batch_size: int,
               global_batch_size: int,
               warmup_steps: int,
               warmup_start_learning_rate: Optional[float] = None,
               boundaries: Sequence[int] = (),
               multipliers: Sequence[float] = (),
               peak_scale: float = 1.0,
               total_steps: Optional[int] = None):
    """Initializes the schedule.

    Args:
      base_learning_rate: rate r for `reference_batch_size` images per step.
      reference_batch_size: the batch r is given for.
      global_batch_size: images per step over all replicas.
      warmup_steps: steps of linear warmup; 0 = start at the peak.
      warmup_start_learning_rate: rate at step 0, capped at the peak (a
        warmup never ramps down); None = r, as in the paper.
      boundaries: steps, strictly increasing, at or after the warmup, where
        the rate drops.
      multipliers: `multipliers[i]` is the factor on the peak rate from
        `boundaries[i]` on, e.g. (0.1, 0.01).
      peak_scale: extra factor on the peak; 0.5 is the paper's "half learning
        rate" rows of Table 2.
      total_steps: the length of training, when known (`build_lr_schedule`
        sets it); kept with the schedule so the training loop reads the
        schedule and its end from one object.
    """
    name = type(self).__name__
    _check(base_learning_rate > 0,
           f"{name}.base_learning_rate must be > 0, got {base_learning_rate}")
    for arg, value in (("reference_batch_size", reference_batch_size),
                       ("global_batch_size", global_batch_size)):
      _check(int(value) == value and value > 0,
             f"{name}.{arg} must be a positive integer, got {value}")
    _check(int(warmup_steps) == warmup_steps and warmup_steps >= 0,
           f"{name}.warmup_steps must be an integer >= 0, got {warmup_steps}")
    _check(peak_scale > 0, f"{name}.peak_scale must be > 0, got {peak_scale}")
    _check(len(boundaries) == len(multipliers),
           f"{name}: {len(boundaries)} boundaries but {len(multipliers)} "
           "multipliers; give one multiplier per boundary")
    _check(all(int(b) == b for b in boundaries),
           f"{name}.boundaries must be integer steps, got {tuple(boundaries)}")
    _check(all(a < b for a, b in zip(boundaries, boundaries[1:])),
           f"{name}.boundaries must be strictly increasing, got "
           f"{tuple(boundaries)}")
    _check(not boundaries or boundaries[0] >= warmup_steps,
           f"{name}: decay boundary {boundaries[:1]} falls inside the warmup "
           f"(warmup_steps={warmup_steps}); shorten the warmup or move the "
           "decay")
    _check(all(m > 0 for m in multipliers),
           f"{name}.multipliers must be > 0, got {tuple(multipliers)}")
    self.base_learning_rate = float(base_learning_rate)
    self.reference_batch_size = int(reference_batch_size)
    self.global_batch_size = int(global_batch_size)
    self.warmup_steps = int(warmup_steps)
    self.peak_scale = float(peak_scale)
    self.boundaries = tuple(int(b) for b in boundaries)
    self.multipliers = tuple(float(m) for m in multipliers)
    self.peak_learning_rate = (self.base_learning_rate * self.global_batch_size
                               / self.reference_batch_size * self.peak_scale)
    if warmup_start_learning_rate is None:
      warmup_start_learning_rate = self.base_learning_rate
    _check(warmup_start_learning_rate >= 0,
           f"{name}.warmup_start_learning_rate must be >= 0, got "
           f"{warmup_start_learning_rate}")
    # A warmup never ramps down: a config written for large batches (start
    # below the peak) still runs at a batch whose peak is below the start.
    self.warmup_start_learning_rate = min(float(warmup_start_learning_rate),
                                          self.peak_learning_rate)
    if total_steps is not None:
      _check(int(total_steps) == total_steps and total_steps > 0,
             f"{name}.total_steps must be a positive integer, got "
             f"{total_steps}")
      _check(total_steps >= self.warmup_steps and
             all(b < total_steps for b in self.boundaries),
             f"{name}: total_steps={total_steps} ends before the warmup "
             f"({self.warmup_steps}) or a decay {self.boundaries}")
      total_steps = int(total_steps)
    self.total_steps = total_steps

  def __call__(self, step) -> tf.Tensor:
    with tf.name_scope(type(self).__name__):
      step = tf.cast(step, tf.int64)
      # Rates after the warmup, indexed by how many boundaries are behind.
      rates = tf.constant([self.peak_learning_rate] +
                          [self.peak_learning_rate * m
                           for m in self.multipliers], tf.float32)
      boundaries = tf.constant(self.boundaries, tf.int64,
                               shape=[len(self.boundaries)])
      passed = tf.reduce_sum(tf.cast(step >= boundaries, tf.int32))
      rate = tf.gather(rates, passed)
      if not self.warmup_steps:
        return rate
      fraction = (tf.cast(tf.minimum(step, self.warmup_steps), tf.float32)
                  / self.warmup_steps)
      start = self.warmup_start_learning_rate
      warmup = start + (self.peak_learning_rate - start) * fraction
      return tf.where(step < self.warmup_steps, warmup, rate)

  def get_config(self) -> dict:
    return dict(base_learning_rate=self.base_learning_rate,
                reference_batch_size=self.reference_batch_size,
                global_batch_size=self.global_batch_size,
                warmup_steps=self.warmup_steps,
                warmup_start_learning_rate=self.warmup_start_learning_rate,
                boundaries=list(self.boundaries),
                multipliers=list(self.multipliers),
                peak_scale=self.peak_scale,
                total_steps=self.total_steps)


@gin.register
@dataclasses.dataclass(frozen=True)
class DecayPolicy:
  """A decay policy in epochs: the rate is `multipliers[i]` × peak from epoch
  `decay_epochs[i]` on, and training stops after `total_epochs`.

  A custom policy in Gin:
    build_lr_schedule.policy = @DecayPolicy()
    DecayPolicy.decay_epochs = (6, 8)
    DecayPolicy.multipliers = (0.1, 0.01)
    DecayPolicy.total_epochs = 9
  """
  total_epochs: float
  decay_epochs: Sequence[float] = ()
  multipliers: Sequence[float] = ()

  def __post_init__(self):
    object.__setattr__(self, "decay_epochs", tuple(self.decay_epochs))
    object.__setattr__(self, "multipliers", tuple(self.multipliers))
    _check(len(self.decay_epochs) == len(self.multipliers),
           f"DecayPolicy: {len(self.decay_epochs)} decay_epochs but "
           f"{len(self.multipliers)} multipliers")
    epochs = (0,) + self.decay_epochs + (self.total_epochs,)
    _check(all(a < b for a, b in zip(epochs, epochs[1:])),
           "DecayPolicy: decay_epochs must be positive, strictly increasing "
           f"and before total_epochs, got {self.decay_epochs} and "
           f"total_epochs={self.total_epochs}")


# The paper's two policies: "normal" decays ×0.1 at epochs 8 and 10
# and stops at 11; "long" decays ×0.1 at 11 and 14, ×0.5 at 17, stops at 18.
POLICIES = {
    "normal": DecayPolicy(total_epochs=11, decay_epochs=(8, 10),
                          multipliers=(0.1, 0.01)),
    "long": DecayPolicy(total_epochs=18, decay_epochs=(11, 14, 17),
                        multipliers=(0.1, 0.01, 0.005)),
}


def steps_per_epoch(num_train_images: int, global_batch_size: int) -> int:
  """ceil(images / batch): the training input repeats, every step reads a full
  global batch, and one epoch of steps reads every image at least once."""
  for name, value in (("num_train_images", num_train_images),
                      ("global_batch_size", global_batch_size)):
    _check(int(value) == value and value > 0,
           f"{name} must be a positive integer, got {value}")
  return math.ceil(num_train_images / global_batch_size)


def policy_steps(policy: Union[str, DecayPolicy], num_train_images: int,
                 global_batch_size: int
                 ) -> Tuple[Tuple[int, ...], Tuple[float, ...], int]:
  """Returns (boundaries, multipliers, total_steps) of a policy in steps.

  Args:
    policy: `normal`, `long` or a `DecayPolicy`.
    num_train_images: images in one training epoch.
    global_batch_size: images per step over all replicas.

  Fractional epochs round to the nearest step.
  """
  if isinstance(policy, str):
    _check(policy in POLICIES, f"Unknown LR policy {policy!r}; use one of "
           f"{sorted(POLICIES)} or a DecayPolicy")
    policy = POLICIES[policy]
  per_epoch = steps_per_epoch(num_train_images, global_batch_size)
  boundaries = tuple(round(e * per_epoch) for e in policy.decay_epochs)
  return boundaries, policy.multipliers, round(policy.total_epochs * per_epoch)


@gin.configurable
def build_lr_schedule(global_batch_size: int,
                      num_train_images: int,
                      policy: Union[str, DecayPolicy] = "normal",
                      base_learning_rate: float = 0.02,
                      reference_batch_size: int = 16,
                      warmup_epochs: float = 0.5,
                      warmup_steps: Optional[int] = None,
                      warmup_start_learning_rate: Optional[float] = None,
                      peak_scale: float = 1.0) -> WarmupLinearScaling:
  """The schedule of a training run, with `total_steps` set.

  Args:
    global_batch_size: images per step over all replicas (from the input
      pipeline / strategy setup).
    num_train_images: images in one training epoch.
    policy: `normal`, `long` or a `DecayPolicy` (epochs).
    base_learning_rate: the rate for `reference_batch_size` (paper: 0.02).
    reference_batch_size: paper: 16.
    warmup_epochs: warmup length in epochs (rounded to steps).
    warmup_steps: warmup length in steps; when set, replaces `warmup_epochs`
      (0 = no warmup).
    warmup_start_learning_rate: see `WarmupLinearScaling`.
    peak_scale: 0.5 = the paper's half-learning-rate variant.
  """
  boundaries, multipliers, total_steps = policy_steps(
      policy, num_train_images, global_batch_size)
  if warmup_steps is None:
    _check(warmup_epochs >= 0,
           f"build_lr_schedule.warmup_epochs must be >= 0, got {warmup_epochs}")
    warmup_steps = round(
        warmup_epochs * steps_per_epoch(num_train_images, global_batch_size))
  return WarmupLinearScaling(
      base_learning_rate=base_learning_rate,
      reference_batch_size=reference_batch_size,
      global_batch_size=global_batch_size,
      warmup_steps=warmup_steps,
      warmup_start_learning_rate=warmup_start_learning_rate,
      boundaries=boundaries,
      multipliers=multipliers,
      peak_scale=peak_scale,
      total_steps=total_steps)
