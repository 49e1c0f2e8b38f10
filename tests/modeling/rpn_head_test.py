"""RPN head: per-level shapes, weights shared across levels, norms, config."""
import megdet_tf  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TF)
import gin
import numpy as np
import tensorflow as tf

from megdet_tf.modeling.heads import rpn_head


def _features(channels=8, size=32):
  return {str(l): tf.random.stateless_normal(
      [2, size // 2**(l - 2), size // 2**(l - 2), channels], seed=[l, 0])
          for l in range(2, 7)}


def test_output_shapes():
  head = rpn_head.RPNHead(num_anchors_per_location=3, num_filters=16)
  scores, boxes = head(_features())
  assert sorted(scores) == sorted(boxes) == ["2", "3", "4", "5", "6"]
  for l in range(2, 7):
    side = 32 // 2**(l - 2)
    assert scores[str(l)].shape == (2, side, side, 3)
    assert boxes[str(l)].shape == (2, side, side, 12)
    assert scores[str(l)].dtype == boxes[str(l)].dtype == tf.float32


def test_weights_are_shared_across_levels():
  head = rpn_head.RPNHead(num_anchors_per_location=2, num_filters=4)
  features = _features(size=16)
  features["3"] = features["2"]
  scores, boxes = head(features)
  assert len(head.trainable_variables) == 6  # One conv + two 1x1 convs.
  np.testing.assert_array_equal(scores["3"], scores["2"])
  np.testing.assert_array_equal(boxes["3"], boxes["2"])


def test_norm_per_level():
  gin.bind_parameter("build_norm.norm", "bn")
  head = rpn_head.RPNHead(min_level=2, max_level=6, num_filters=4,
                          use_norm=True)
  head(_features(size=16))
  assert [n.name for n in head.norms] == [f"rpn_norm_{l}" for l in range(2, 7)]
  assert all(isinstance(n, tf.keras.layers.BatchNormalization)
             for n in head.norms)
  assert not head.conv.use_bias


def test_get_config_round_trip():
  head = rpn_head.RPNHead(min_level=3, max_level=5, num_anchors_per_location=9,
                          num_filters=8, use_norm=True, name="rpn")
  restored = tf.keras.layers.deserialize(tf.keras.layers.serialize(head))
  assert isinstance(restored, rpn_head.RPNHead)
  assert restored.get_config() == head.get_config()
  features = _features()
  del features["2"], features["6"]
  scores, _ = restored(features)
  assert scores["3"].shape[-1] == 9
