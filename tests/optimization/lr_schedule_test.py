"""Tests of the MegDet learning-rate policy and its Gin files."""
import os

import gin
import megdet_tf  # noqa: F401  pylint: disable=unused-import
import numpy as np
import pytest
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


def test_exported_from_package():
  assert optimization.WarmupLinearScaling is lr_schedule.WarmupLinearScaling


def test_steps_per_epoch_rounds_up():
  assert lr_schedule.steps_per_epoch(256, 16) == 16
  assert lr_schedule.steps_per_epoch(257, 16) == 17
  for batch, steps in STEPS_PER_EPOCH.items():
    assert lr_schedule.steps_per_epoch(COCO_TRAIN_IMAGES, batch) == steps


@pytest.mark.parametrize("batch", [16, 256])
@pytest.mark.parametrize("policy", ["normal", "long"])
def test_paper_policy_rates(policy, batch):
  schedule = lr_schedule.build_lr_schedule(
      global_batch_size=batch, num_train_images=COCO_TRAIN_IMAGES,
      policy=policy, warmup_epochs=0.5)
  per_epoch = STEPS_PER_EPOCH[batch]
  peak = 0.02 * batch / 16  # 0.02 at batch 16, 0.32 at batch 256.
  decays, last_epoch = PAPER_POLICIES[policy]
  warmup = round(per_epoch / 2)
  assert schedule.warmup_steps == warmup
  assert schedule.total_steps == last_epoch * per_epoch
  np.testing.assert_allclose(schedule.peak_learning_rate, peak, rtol=1e-6)
  # Warmup from the unscaled 0.02 to the peak, then each decay exactly at
  # its epoch boundary (the last step before it keeps the previous rate).
  np.testing.assert_allclose(
      _rates(schedule, [0, warmup // 2, warmup]),
      [0.02, 0.02 + (peak - 0.02) * (warmup // 2) / warmup, peak], rtol=1e-6)
  previous = peak
  for epoch, factor in decays:
    boundary = epoch * per_epoch
    np.testing.assert_allclose(_rates(schedule, [boundary - 1, boundary]),
                               [previous, peak * factor], rtol=1e-6)
    previous = peak * factor
  np.testing.assert_allclose(float(schedule(schedule.total_steps - 1)),
                             previous, rtol=1e-6)


def test_policy_steps_custom_epochs():
  policy = lr_schedule.DecayPolicy(total_epochs=3, decay_epochs=(1.5, 2),
                                   multipliers=(0.1, 0.01))
  # 95 images at batch 10: 10 steps per epoch.
  assert lr_schedule.policy_steps(policy, 95, 10) == ((15, 20), (0.1, 0.01),
                                                      30)


def test_warmup_is_linear_per_step_in_tf_function():
  schedule = optimization.WarmupLinearScaling(
      base_learning_rate=0.02, reference_batch_size=16,
      global_batch_size=256, warmup_steps=10)
  step = tf.Variable(0, dtype=tf.int64)
  rate = tf.function(lambda: schedule(step))
  values = []
  for k in range(12):
    step.assign(k)
    values.append(rate())
  assert values[0].dtype == tf.float32
  np.testing.assert_allclose(values, [0.02 + 0.03 * k for k in range(10)] +
                             [0.32, 0.32], rtol=1e-6)


def test_no_warmup_starts_at_peak():
  schedule = lr_schedule.build_lr_schedule(
      global_batch_size=256, num_train_images=COCO_TRAIN_IMAGES,
      warmup_steps=0)
  assert schedule.warmup_steps == 0
  np.testing.assert_allclose(_rates(schedule, [0, 1, 3672]),
                             [0.32, 0.32, 0.032], rtol=1e-6)


def test_half_learning_rate():
  schedule = lr_schedule.build_lr_schedule(
      global_batch_size=256, num_train_images=COCO_TRAIN_IMAGES,
      peak_scale=0.5)
  np.testing.assert_allclose(_rates(schedule, [0, 230, 3672, 4590]),
                             [0.02, 0.16, 0.016, 0.0016], rtol=1e-6)


@pytest.mark.parametrize("batch, peak_scale, start, expected", [
    # Half of batch 16's rate is below 0.02: no ramp down, flat at 0.01.
    (16, 0.5, None, (0.01, 0.01)),
    (8, 1.0, None, (0.01, 0.01)),
    # A start above a small batch's peak is capped at the peak.
    (8, 1.0, 0.015, (0.01, 0.01)),
    (256, 1.0, 0.0, (0.0, 0.16))])
def test_warmup_start(batch, peak_scale, start, expected):
  schedule = optimization.WarmupLinearScaling(
      base_learning_rate=0.02, reference_batch_size=16,
      global_batch_size=batch, warmup_steps=4,
      warmup_start_learning_rate=start, peak_scale=peak_scale)
  np.testing.assert_allclose(_rates(schedule, [0, 2]), expected, rtol=1e-6)


def test_config_round_trip():
  schedule = lr_schedule.build_lr_schedule(
      global_batch_size=256, num_train_images=COCO_TRAIN_IMAGES,
      policy="long", peak_scale=0.5)
  steps = [0, 100, 230, 5048, 5049, 6426, 7803, 8261]
  restored = optimization.WarmupLinearScaling.from_config(
      schedule.get_config())
  assert restored.get_config() == schedule.get_config()
  assert restored.total_steps == 8262
  np.testing.assert_allclose(_rates(restored, steps), _rates(schedule, steps),
                             rtol=1e-6)

  serialized = tf.keras.optimizers.schedules.serialize(schedule)
  assert serialized["registered_name"] == "megdet_tf>WarmupLinearScaling"
  deserialized = tf.keras.optimizers.schedules.deserialize(serialized)
  assert isinstance(deserialized, optimization.WarmupLinearScaling)
  np.testing.assert_allclose(_rates(deserialized, steps),
                             _rates(schedule, steps), rtol=1e-6)


@pytest.mark.parametrize("overrides, message", [
    (dict(boundaries=(10, 20), multipliers=(0.1,)),
     "2 boundaries but 1 multipliers"),
    (dict(boundaries=(20, 20), multipliers=(0.1, 0.01)),
     "strictly increasing"),
    (dict(boundaries=(5,), multipliers=(0.1,)), "inside the warmup"),
    (dict(warmup_steps=-1), "warmup_steps"),
    (dict(global_batch_size=0), "global_batch_size"),
    (dict(warmup_start_learning_rate=-0.1),
     "warmup_start_learning_rate must be >= 0"),
    (dict(boundaries=(20,), multipliers=(0.1,), total_steps=20),
     "total_steps=20"),
    (dict(boundaries=(20,), multipliers=(0.0,)), "multipliers must be > 0"),
], ids=["lengths_differ", "not_increasing", "inside_warmup", "negative_warmup",
        "zero_batch", "negative_start", "ends_before_decay", "zero_multiplier"])
def test_invalid_arguments(overrides, message):
  kwargs = dict(base_learning_rate=0.02, reference_batch_size=16,
                global_batch_size=64, warmup_steps=10)
  kwargs.update(overrides)
  with pytest.raises(ValueError, match=message):
    optimization.WarmupLinearScaling(**kwargs)


def test_invalid_policies():
  with pytest.raises(ValueError, match="Unknown LR policy 'short'"):
    lr_schedule.policy_steps("short", 100, 10)
  with pytest.raises(ValueError, match="before total_epochs"):
    lr_schedule.DecayPolicy(total_epochs=8, decay_epochs=(8,),
                            multipliers=(0.1,))
  with pytest.raises(ValueError, match="num_train_images"):
    lr_schedule.steps_per_epoch(0, 16)


# --- The schedule files derive the run's schedule from the global batch. -----

def _schedule_from_files(monkeypatch, files, bindings=(), batch=256):
  monkeypatch.chdir(REPO_ROOT)  # Gin includes are relative to the repository.
  gin.parse_config_files_and_bindings(
      files, [f"NUM_TRAIN_IMAGES = {COCO_TRAIN_IMAGES}", *bindings])
  return lr_schedule.build_lr_schedule(global_batch_size=batch)


@pytest.mark.parametrize("policy", ["normal", "long"])
def test_policy_files(monkeypatch, policy):
  schedule = _schedule_from_files(monkeypatch, [f"gin/schedule/{policy}.gin"])
  decays, last_epoch = PAPER_POLICIES[policy]
  assert schedule.boundaries == tuple(epoch * 459 for epoch, _ in decays)
  np.testing.assert_allclose(schedule.multipliers, [f for _, f in decays])
  assert schedule.total_steps == last_epoch * 459
  assert schedule.warmup_steps == 230
  np.testing.assert_allclose(_rates(schedule, [0, 230]), [0.02, 0.32],
                             rtol=1e-6)


def test_table2_variants_compose(monkeypatch):
  schedule = _schedule_from_files(
      monkeypatch, ["gin/schedule/normal.gin", "gin/schedule/no_warmup.gin",
                    "gin/schedule/half_lr.gin"], batch=64)
  assert schedule.warmup_steps == 0
  np.testing.assert_allclose(_rates(schedule, [0]), [0.04],  # 0.02·64/16/2.
                             rtol=1e-6)


def test_overrides(monkeypatch):
  schedule = _schedule_from_files(
      monkeypatch, ["gin/schedule/long.gin"],
      ["build_lr_schedule.warmup_steps = 500",
       "build_lr_schedule.policy = @DecayPolicy()",
       "DecayPolicy.total_epochs = 2",
       "DecayPolicy.decay_epochs = [1.5]",
       "DecayPolicy.multipliers = [0.1]"],
      batch=16)
  assert schedule.warmup_steps == 500
  assert schedule.boundaries == (10995,)  # 1.5 * 7330.
  assert schedule.total_steps == 14660


def test_optimizer_binding(monkeypatch):
  monkeypatch.chdir(REPO_ROOT)
  gin.parse_config_files_and_bindings(
      ["gin/schedule/normal.gin"], ["NUM_TRAIN_IMAGES = 100"])
  assert gin.query_parameter("build_training_optimizer.momentum") == 0.9
  optimizer = optimization.build_training_optimizer(0.1)
  assert isinstance(optimizer, tf.keras.optimizers.SGD)
  np.testing.assert_allclose(optimizer.momentum, 0.9)
