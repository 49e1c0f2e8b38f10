"""Tests of the RoI aligner: Model Garden's RoIAlign by `crop_and_resize`."""
import megdet_tf  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TF)
import numpy as np
import pytest
import tensorflow as tf

from official.vision.modeling import layers as mg_layers

from megdet_tf.modeling.layers import MultilevelROIAligner

_IMAGE_SIZE = 1024  # Levels 2-6: 256 x 256 down to 16 x 16.


def _features(dtype, batch=2, channels=8):
  rng = np.random.default_rng(0)
  return {str(level): tf.constant(
      rng.normal(size=(batch, _IMAGE_SIZE >> level, _IMAGE_SIZE >> level,
                       channels)), dtype) for level in range(2, 7)}


def _boxes(batch=2, num_random=200):
  """Random boxes of every level, boxes on the edges, empty padding rows."""
  rng = np.random.default_rng(1)
  top_left = rng.uniform(0, _IMAGE_SIZE - 1, (batch, num_random, 2))
  sides = np.exp(rng.uniform(0, np.log(_IMAGE_SIZE), (batch, num_random, 2)))
  boxes = np.concatenate(
      [top_left, np.minimum(top_left + sides, _IMAGE_SIZE)], axis=-1)
  size = _IMAGE_SIZE
  special = [[0, 0, size, size],              # Whole image: level 6.
             [size - 3, size - 5, size, size],  # Small, bottom-right corner.
             [0, size - 40, 30, size],          # On the right edge.
             [size - 1, 0, size, 1],            # 1 px, bottom-left corner.
             [100, 120, 100, 120],              # Empty.
             [0, 0, 0, 0]]                      # Padding row.
  boxes = np.concatenate([boxes, np.tile(special, [batch, 1, 1])], axis=1)
  return tf.constant(boxes, tf.float32)


def _output_and_feature_gradients(layer, features, boxes):
  cotangent = tf.random.stateless_normal(
      [boxes.shape[0], boxes.shape[1], 7, 7, 8], seed=[1, 2])
  with tf.GradientTape() as tape:
    tape.watch(features)
    crops = layer(features, boxes)
    loss = tf.reduce_sum(tf.cast(crops, tf.float32) * cotangent)
  return crops, tape.gradient(loss, features)


def test_equals_model_gardens_roialign_and_its_gradients():
  features, boxes = _features(tf.float32), _boxes()
  sides = np.sqrt(np.prod(boxes[..., 2:] - boxes[..., :2], axis=-1))
  levels = np.floor(np.log2(sides[:, :-2] / 224)) + 4  # Not the empty ones.
  assert set(np.clip(levels, 2, 6).ravel()) == {2, 3, 4, 5, 6}
  expected, expected_grads = _output_and_feature_gradients(
      mg_layers.MultilevelROIAligner(crop_size=7), features, boxes)
  crops, grads = _output_and_feature_gradients(
      MultilevelROIAligner(crop_size=7, use_crop_and_resize=True), features,
      boxes)
  assert crops.shape == (2, 206, 7, 7, 8) and crops.dtype == tf.float32
  np.testing.assert_allclose(crops, expected, atol=1e-4)
  for level in features:
    # Every level receives gradient; sums of up to hundreds of samples.
    assert np.abs(grads[level]).max() > 0
    np.testing.assert_allclose(grads[level], expected_grads[level],
                               atol=1e-3)


@pytest.mark.parametrize("sample_offset", [0.0, 0.25])
def test_sample_offset_as_model_gardens(sample_offset):
  features, boxes = _features(tf.float32), _boxes(num_random=50)
  expected = mg_layers.MultilevelROIAligner(
      crop_size=5, sample_offset=sample_offset)(features, boxes)
  crops = MultilevelROIAligner(crop_size=5, sample_offset=sample_offset,
                               use_crop_and_resize=True)(features, boxes)
  np.testing.assert_allclose(crops, expected, atol=1e-4)


def test_mixed_bfloat16_gives_bfloat16_crops_close_to_float32():
  boxes = _boxes(num_random=50)
  exact = MultilevelROIAligner(use_crop_and_resize=True)(
      _features(tf.float32), boxes)
  features = _features(tf.bfloat16)
  crops, grads = _output_and_feature_gradients(
      MultilevelROIAligner(use_crop_and_resize=True, dtype="mixed_bfloat16"),
      features, boxes)
  assert crops.dtype == tf.bfloat16
  assert all(grads[level].dtype == tf.bfloat16 for level in grads)
  # Features rounded to bfloat16 (8 bits), then one rounding of the crop.
  np.testing.assert_allclose(tf.cast(crops, tf.float32), exact, rtol=2e-2,
                             atol=2e-2)


def test_off_by_default_is_model_gardens_own_path():
  features, boxes = _features(tf.float32), _boxes(num_random=50)
  expected = mg_layers.MultilevelROIAligner()(features, boxes)
  np.testing.assert_array_equal(MultilevelROIAligner()(features, boxes),
                                expected)


def test_config_round_trip():
  layer = MultilevelROIAligner(crop_size=5, sample_offset=0.25,
                               use_crop_and_resize=True)
  restored = tf.keras.layers.deserialize(tf.keras.layers.serialize(layer))
  assert isinstance(restored, MultilevelROIAligner)
  assert restored.get_config() == layer.get_config()
