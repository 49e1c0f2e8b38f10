"""Tests of the RoI generator: batched NMS proposes what the padded path does."""
import megdet_tf  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TF)
import numpy as np
import pytest
import tensorflow as tf

from official.vision.modeling import layers as mg_layers
from official.vision.ops import anchor

from megdet_tf.modeling.layers import MultilevelROIGenerator

_SETTINGS = dict(pre_nms_top_k=300, num_proposals=200, test_pre_nms_top_k=120,
                 test_num_proposals=80, nms_iou_threshold=0.6,
                 test_nms_iou_threshold=0.5)


def _rpn_outputs(batch=2, image_size=128):
  """Random RPN scores and box deltas on the anchors of P2-P5, 3 per place."""
  anchors = anchor.Anchor(min_level=2, max_level=5, num_scales=1,
                          aspect_ratios=[0.5, 1.0, 2.0], anchor_size=4.0,
                          image_size=(image_size, image_size)).multilevel_boxes
  rng = np.random.default_rng(0)
  raw_scores, raw_boxes, anchor_boxes = {}, {}, {}
  for level, boxes in anchors.items():
    height, width = boxes.shape[:2]
    raw_scores[level] = tf.constant(
        rng.normal(size=(batch, height, width, 3)), tf.float32)
    raw_boxes[level] = tf.constant(
        0.3 * rng.normal(size=(batch, height, width, 12)), tf.float32)
    anchor_boxes[level] = tf.tile(boxes[tf.newaxis], [batch, 1, 1, 1])
  image_shape = tf.constant([[image_size, image_size]] * batch, tf.float32)
  return raw_boxes, raw_scores, anchor_boxes, image_shape


@pytest.mark.parametrize("training", [True, False])
def test_batched_nms_proposes_what_the_padded_path_does(training):
  inputs = _rpn_outputs()
  padded = mg_layers.MultilevelROIGenerator(**_SETTINGS)(*inputs,
                                                          training=training)
  batched = MultilevelROIGenerator(use_batched_nms=True, **_SETTINGS)(
      *inputs, training=training)
  expected_count = 200 if training else 80
  for padded_part, batched_part in zip(padded, batched):
    assert batched_part.shape[:2] == (2, expected_count)
    np.testing.assert_allclose(batched_part, padded_part, rtol=1e-5,
                               atol=1e-4)
  # NMS really removed boxes: the proposals are not the plain top scores.
  without_nms, _ = mg_layers.MultilevelROIGenerator(**{
      **_SETTINGS, "nms_iou_threshold": 0.0, "test_nms_iou_threshold": 0.0})(
          *inputs, training=training)
  assert not np.allclose(batched[0], without_nms, atol=1e-4)

def test_model_gardens_batched_nms_skips_the_pre_nms_top_k():
  """Why the subclass exists: Model Garden's batched path proposes others.

  With 20 candidates a level, the padded path keeps those of the 20 best
  anchors that survive NMS; Model Garden's batched NMS runs over every anchor
  and keeps the first 20 survivors, refilling what NMS removed.
  """
  settings = {**_SETTINGS, "pre_nms_top_k": 20, "num_proposals": 100}
  inputs = _rpn_outputs()
  padded, _ = mg_layers.MultilevelROIGenerator(**settings)(*inputs,
                                                            training=True)
  ours, _ = MultilevelROIGenerator(use_batched_nms=True, **settings)(
      *inputs, training=True)
  mg_batched, _ = mg_layers.MultilevelROIGenerator(
      use_batched_nms=True, **settings)(*inputs, training=True)
  np.testing.assert_allclose(ours, padded, rtol=1e-5, atol=1e-4)
  real_boxes = lambda rois: int(tf.math.count_nonzero(  # pylint: disable=g-long-lambda
      tf.reduce_any(rois != 0, axis=-1)))
  assert real_boxes(padded) < real_boxes(mg_batched) == 2 * 4 * 20

def test_config_round_trip_and_min_size_filter_refused():
  layer = MultilevelROIGenerator(use_batched_nms=True, **_SETTINGS)
  restored = tf.keras.layers.deserialize(tf.keras.layers.serialize(layer))
  assert isinstance(restored, MultilevelROIGenerator)
  assert restored.get_config() == layer.get_config()
  with pytest.raises(ValueError, match="pre_nms_min_size_threshold"):
    MultilevelROIGenerator(use_batched_nms=True, pre_nms_min_size_threshold=2.)
