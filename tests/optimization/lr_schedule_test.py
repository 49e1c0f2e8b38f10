"""Tests of the MegDet learning-rate policy and its Gin files."""
import os

from absl.testing import parameterized
import gin
import megdet_tf  # noqa: F401  pylint: disable=unused-import
import tensorflow as tf

from megdet_tf import optimization
from megdet_tf.optimization import lr_schedule

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
COCO_TRAIN_IMAGES = 117266
# ceil(117266 / batch): 7329.1 -> 7330 at batch 16, 458.1 -> 459 at 256.
STEPS_PER_EPOCH = {16: 7330, 256: 459}
# The paper's policies: (epoch, factor on the peak rate) and the last epoch.
PAPER_POLICIES = {
    "normal": ([(8, 0.1), (10, 0.01)], 11),
    "long": ([(11, 0.1), (14, 0.01), (17, 0.005)], 18),
}


def _rates(schedule, steps):
  return [float(schedule(step)) for step in steps]


class WarmupLinearScalingTest(tf.test.TestCase, parameterized.TestCase):

  def setUp(self):
    super().setUp()
    gin.clear_config()
    self.addCleanup(gin.clear_config)

  def test_exported_from_package(self):
    self.assertIs(optimization.WarmupLinearScaling,
                  lr_schedule.WarmupLinearScaling)

  def test_steps_per_epoch_rounds_up(self):
    self.assertEqual(lr_schedule.steps_per_epoch(256, 16), 16)
    self.assertEqual(lr_schedule.steps_per_epoch(257, 16), 17)
    for batch, steps in STEPS_PER_EPOCH.items():
      self.assertEqual(lr_schedule.steps_per_epoch(COCO_TRAIN_IMAGES, batch),
                       steps)

  @parameterized.product(policy=["normal", "long"], batch=[16, 256])
  def test_paper_policy_rates(self, policy, batch):
    schedule = lr_schedule.build_lr_schedule(
        global_batch_size=batch, num_train_images=COCO_TRAIN_IMAGES,
        policy=policy, warmup_epochs=0.5)
    per_epoch = STEPS_PER_EPOCH[batch]
    peak = 0.02 * batch / 16  # 0.02 at batch 16, 0.32 at batch 256.
    decays, last_epoch = PAPER_POLICIES[policy]
    warmup = round(per_epoch / 2)
    self.assertEqual(schedule.warmup_steps, warmup)
    self.assertEqual(schedule.total_steps, last_epoch * per_epoch)
    self.assertAllClose(schedule.peak_learning_rate, peak)
    # Warmup from the unscaled 0.02 to the peak, then each decay exactly at
    # its epoch boundary (the last step before it keeps the previous rate).
    self.assertAllClose(_rates(schedule, [0, warmup // 2, warmup]),
                        [0.02, 0.02 + (peak - 0.02) * (warmup // 2) / warmup,
                         peak])
    previous = peak
    for epoch, factor in decays:
      boundary = epoch * per_epoch
      self.assertAllClose(_rates(schedule, [boundary - 1, boundary]),
                          [previous, peak * factor])
      previous = peak * factor
    self.assertAllClose(float(schedule(schedule.total_steps - 1)), previous)

  def test_policy_steps_custom_epochs(self):
    policy = lr_schedule.DecayPolicy(total_epochs=3, decay_epochs=(1.5, 2),
                                     multipliers=(0.1, 0.01))
    # 95 images at batch 10: 10 steps per epoch.
    self.assertEqual(lr_schedule.policy_steps(policy, 95, 10),
                     ((15, 20), (0.1, 0.01), 30))

  def test_warmup_is_linear_per_step_in_tf_function(self):
    schedule = optimization.WarmupLinearScaling(
        base_learning_rate=0.02, reference_batch_size=16,
        global_batch_size=256, warmup_steps=10)
    step = tf.Variable(0, dtype=tf.int64)
    rate = tf.function(lambda: schedule(step))
    values = []
    for k in range(12):
      step.assign(k)
      values.append(rate())
    self.assertEqual(values[0].dtype, tf.float32)
    self.assertAllClose(values, [0.02 + 0.03 * k for k in range(10)] +
                        [0.32, 0.32])

  def test_no_warmup_starts_at_peak(self):
    schedule = lr_schedule.build_lr_schedule(
        global_batch_size=256, num_train_images=COCO_TRAIN_IMAGES,
        warmup_steps=0)
    self.assertEqual(schedule.warmup_steps, 0)
    self.assertAllClose(_rates(schedule, [0, 1, 3672]), [0.32, 0.32, 0.032])

  def test_half_learning_rate(self):
    schedule = lr_schedule.build_lr_schedule(
        global_batch_size=256, num_train_images=COCO_TRAIN_IMAGES,
        peak_scale=0.5)
    self.assertAllClose(_rates(schedule, [0, 230, 3672, 4590]),
                        [0.02, 0.16, 0.016, 0.0016])

  @parameterized.parameters(
      # Half of batch 16's rate is below 0.02: no ramp down, flat at 0.01.
      dict(batch=16, peak_scale=0.5, start=None, expected=(0.01, 0.01)),
      dict(batch=8, peak_scale=1.0, start=None, expected=(0.01, 0.01)),
      # A start above a small batch's peak is capped at the peak.
      dict(batch=8, peak_scale=1.0, start=0.015, expected=(0.01, 0.01)),
      dict(batch=256, peak_scale=1.0, start=0.0, expected=(0.0, 0.16)))
  def test_warmup_start(self, batch, peak_scale, start, expected):
    schedule = optimization.WarmupLinearScaling(
        base_learning_rate=0.02, reference_batch_size=16,
        global_batch_size=batch, warmup_steps=4,
        warmup_start_learning_rate=start, peak_scale=peak_scale)
    self.assertAllClose(_rates(schedule, [0, 2]), expected)

  def test_config_round_trip(self):
    schedule = lr_schedule.build_lr_schedule(
        global_batch_size=256, num_train_images=COCO_TRAIN_IMAGES,
        policy="long", peak_scale=0.5)
    steps = [0, 100, 230, 5048, 5049, 6426, 7803, 8261]
    restored = optimization.WarmupLinearScaling.from_config(
        schedule.get_config())
    self.assertEqual(restored.get_config(), schedule.get_config())
    self.assertEqual(restored.total_steps, 8262)
    self.assertAllClose(_rates(restored, steps), _rates(schedule, steps))

    serialized = tf.keras.optimizers.schedules.serialize(schedule)
    self.assertEqual(serialized["registered_name"],
                     "megdet_tf>WarmupLinearScaling")
    deserialized = tf.keras.optimizers.schedules.deserialize(serialized)
    self.assertIsInstance(deserialized, optimization.WarmupLinearScaling)
    self.assertAllClose(_rates(deserialized, steps), _rates(schedule, steps))

  @parameterized.named_parameters(
      ("lengths_differ", dict(boundaries=(10, 20), multipliers=(0.1,)),
       "2 boundaries but 1 multipliers"),
      ("not_increasing", dict(boundaries=(20, 20), multipliers=(0.1, 0.01)),
       "strictly increasing"),
      ("inside_warmup", dict(boundaries=(5,), multipliers=(0.1,)),
       "inside the warmup"),
      ("negative_warmup", dict(warmup_steps=-1), "warmup_steps"),
      ("zero_batch", dict(global_batch_size=0), "global_batch_size"),
      ("negative_start", dict(warmup_start_learning_rate=-0.1),
       "warmup_start_learning_rate must be >= 0"),
      ("ends_before_decay", dict(boundaries=(20,), multipliers=(0.1,),
                                 total_steps=20), "total_steps=20"),
      ("zero_multiplier", dict(boundaries=(20,), multipliers=(0.0,)),
       "multipliers must be > 0"))
  def test_invalid_arguments(self, overrides, message):
    kwargs = dict(base_learning_rate=0.02, reference_batch_size=16,
                  global_batch_size=64, warmup_steps=10)
    kwargs.update(overrides)
    with self.assertRaisesRegex(ValueError, message):
      optimization.WarmupLinearScaling(**kwargs)

  def test_invalid_policies(self):
    with self.assertRaisesRegex(ValueError, "Unknown LR policy 'short'"):
      lr_schedule.policy_steps("short", 100, 10)
    with self.assertRaisesRegex(ValueError, "before total_epochs"):
      lr_schedule.DecayPolicy(total_epochs=8, decay_epochs=(8,),
                              multipliers=(0.1,))
    with self.assertRaisesRegex(ValueError, "num_train_images"):
      lr_schedule.steps_per_epoch(0, 16)


class GinFilesTest(tf.test.TestCase, parameterized.TestCase):
  """The schedule files derive the run's schedule from the global batch."""

  def setUp(self):
    super().setUp()
    cwd = os.getcwd()
    os.chdir(REPO_ROOT)  # Gin includes are relative to the repository.
    self.addCleanup(os.chdir, cwd)
    gin.clear_config()
    self.addCleanup(gin.clear_config)

  def _schedule(self, files, bindings=(), batch=256):
    gin.parse_config_files_and_bindings(
        files, [f"NUM_TRAIN_IMAGES = {COCO_TRAIN_IMAGES}", *bindings])
    return lr_schedule.build_lr_schedule(global_batch_size=batch)

  @parameterized.parameters("normal", "long")
  def test_policy_files(self, policy):
    schedule = self._schedule([f"gin/schedule/{policy}.gin"])
    decays, last_epoch = PAPER_POLICIES[policy]
    self.assertEqual(schedule.boundaries,
                     tuple(epoch * 459 for epoch, _ in decays))
    self.assertAllClose(schedule.multipliers, [f for _, f in decays])
    self.assertEqual(schedule.total_steps, last_epoch * 459)
    self.assertEqual(schedule.warmup_steps, 230)
    self.assertAllClose(_rates(schedule, [0, 230]), [0.02, 0.32])

  def test_table2_variants_compose(self):
    schedule = self._schedule(["gin/schedule/normal.gin",
                               "gin/schedule/no_warmup.gin",
                               "gin/schedule/half_lr.gin"], batch=64)
    self.assertEqual(schedule.warmup_steps, 0)
    self.assertAllClose(_rates(schedule, [0]), [0.04])  # 0.02 * 64/16 / 2.

  def test_overrides(self):
    schedule = self._schedule(
        ["gin/schedule/long.gin"],
        ["build_lr_schedule.warmup_steps = 500",
         "build_lr_schedule.policy = @DecayPolicy()",
         "DecayPolicy.total_epochs = 2",
         "DecayPolicy.decay_epochs = [1.5]",
         "DecayPolicy.multipliers = [0.1]"],
        batch=16)
    self.assertEqual(schedule.warmup_steps, 500)
    self.assertEqual(schedule.boundaries, (10995,))  # 1.5 * 7330.
    self.assertEqual(schedule.total_steps, 14660)

  def test_optimizer_binding(self):
    gin.parse_config_files_and_bindings(
        ["gin/schedule/normal.gin"], ["NUM_TRAIN_IMAGES = 100"])
    self.assertEqual(
        gin.query_parameter("build_training_optimizer.momentum"), 0.9)
    optimizer = optimization.build_training_optimizer(0.1)
    self.assertIsInstance(optimizer, tf.keras.optimizers.SGD)
    self.assertAllClose(optimizer.momentum, 0.9)


if __name__ == "__main__":
  tf.test.main()
