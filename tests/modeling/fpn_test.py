"""FPN: level shapes, top-down pathway, P6 subsampling, norms, config."""
import megdet_tf  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TF)
import gin
import numpy as np
import pytest
import tensorflow as tf

from megdet_tf.modeling.decoders import fpn


def _backbone_features(size=64, channels=(8, 16, 32, 64), seed=0):
  return {str(level): tf.random.stateless_normal(
      [2, size // 2**level, size // 2**level, c], seed=[seed, level])
          for level, c in zip(range(2, 6), channels)}


def test_outputs_p2_to_p6():
  features = fpn.FPN(num_filters=24)(_backbone_features())
  assert sorted(features) == ["2", "3", "4", "5", "6"]
  for level in range(2, 7):
    side = 64 // 2**level
    assert features[str(level)].shape == (2, side, side, 24)
    assert features[str(level)].dtype == tf.float32


def test_p6_subsamples_p5():
  features = fpn.FPN(num_filters=8)(_backbone_features(size=128))
  np.testing.assert_array_equal(features["6"], features["5"][:, ::2, ::2])


def test_top_down_pathway_reaches_every_level():
  model = fpn.FPN(num_filters=8)
  inputs = _backbone_features()
  with tf.GradientTape() as tape:
    tape.watch(inputs["5"])
    outputs = model(inputs)
  grad = tape.gradient(outputs["2"], inputs["5"])
  assert float(tf.reduce_max(tf.abs(grad))) > 0  # C5 -> P2.
  with tf.GradientTape() as tape:
    tape.watch(inputs["2"])
    outputs = model(inputs)
  assert tape.gradient(outputs["3"], inputs["2"]) is None  # No bottom-up.


def test_odd_sizes():
  inputs = {"2": tf.zeros([1, 17, 13, 4]), "3": tf.zeros([1, 9, 7, 4]),
            "4": tf.zeros([1, 5, 4, 4]), "5": tf.zeros([1, 3, 2, 4])}
  outputs = fpn.FPN(num_filters=4)(inputs)
  assert outputs["2"].shape == (1, 17, 13, 4)
  assert outputs["6"].shape == (1, 2, 1, 4)


@pytest.mark.parametrize("use_norm", [False, True])
def test_norms_from_build_norm(use_norm):
  gin.bind_parameter("build_norm.norm", "bn")
  model = fpn.FPN(num_filters=8, use_norm=use_norm)
  model(_backbone_features())
  norms = [l for l in model._flatten_layers()
           if isinstance(l, tf.keras.layers.BatchNormalization)]
  convs = [l for l in model._flatten_layers()
           if isinstance(l, tf.keras.layers.Conv2D)]
  assert len(convs) == 8
  assert len(norms) == (8 if use_norm else 0)
  assert all(c.use_bias != use_norm for c in convs)


def test_levels_must_nest():
  with pytest.raises(ValueError, match="backbone_max_level"):
    fpn.FPN(min_level=3, max_level=4, backbone_max_level=5)


def test_get_config_round_trip():
  model = fpn.FPN(min_level=3, max_level=7, num_filters=16, use_norm=True,
                  name="decoder")
  restored = tf.keras.layers.deserialize(tf.keras.layers.serialize(model))
  assert isinstance(restored, fpn.FPN)
  assert restored.get_config() == model.get_config()
  features = restored(_backbone_features())
  assert sorted(features) == ["3", "4", "5", "6", "7"]
