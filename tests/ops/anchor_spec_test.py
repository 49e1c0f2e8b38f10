"""AnchorSpec: one Gin binding that the model, the parser and the loss follow;
its validation; its config without Gin."""
import json

import megdet_tf  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TF)
import gin
import numpy as np
import pytest
import tensorflow as tf

from megdet_tf.dataloaders.category_map import CategoryMap
from megdet_tf.dataloaders.detection_parser import DetectionParser
from megdet_tf.modeling import faster_rcnn
from megdet_tf.modeling import losses
from megdet_tf.ops.anchor_spec import AnchorSpec

# Two anchors per place, 8 px at P2 ... 128 px at P6, 32 sampled per image.
SPEC_GIN = """
AnchorSpec.aspect_ratios = [1.0, 2.0]
AnchorSpec.anchor_size = 2.0
AnchorSpec.rpn_batch_size_per_im = 32
"""
SIZE = 64


@pytest.fixture(autouse=True)
def clear_gin():
  yield
  gin.clear_config()


def _example():
  rng = np.random.default_rng(0)
  return {
      "image": tf.constant(rng.integers(0, 256, (SIZE, SIZE, 3), np.uint8)),
      "source_id": tf.constant("1"),
      "groundtruth_boxes": tf.constant([[0.2, 0.3, 0.6, 0.7]], tf.float32),
      "groundtruth_classes": tf.constant([1], tf.int64),
      "groundtruth_is_crowd": tf.constant([False]),
  }


def _flat(per_level):
  return np.concatenate([np.reshape(per_level[level], -1)
                         for level in sorted(per_level)])


def test_one_binding_reaches_the_model_the_parser_and_the_loss(
    tiny_detector_gin):
  gin.parse_config(tiny_detector_gin + SPEC_GIN + """
      MultilevelROIGenerator.pre_nms_top_k = 100
      MultilevelROIGenerator.num_proposals = 50
      ROISampler.num_sampled_rois = 16
  """)
  categories = CategoryMap([1])
  model = faster_rcnn.build_faster_rcnn(categories.num_classes)
  parser = DetectionParser(category_map=categories, short_side=SIZE,
                           long_side=SIZE, aug_rand_hflip=False)
  loss = losses.FasterRCNNLoss(weight_decay=0.0)
  assert model.anchor_spec == parser.anchor_spec == AnchorSpec(
      aspect_ratios=(1.0, 2.0), anchor_size=2.0, rpn_batch_size_per_im=32)

  image, labels = parser.parse_fn(is_training=True)(_example())
  images = image[tf.newaxis]
  labels = tf.nest.map_structure(lambda x: x[tf.newaxis], labels)
  targets = _flat(labels["rpn_score_targets"])
  assert (targets >= 0).sum() == 32 and (targets == 1).any()

  # The loss divides by the number of anchors the parser sampled.
  outputs = model.call_with_labels(images, labels, training=True)
  assert outputs["rpn_scores"]["2"].shape == (1, 16, 16, 2)
  scores = _flat({k: v.numpy() for k, v in outputs["rpn_scores"].items()})
  sampled = targets >= 0
  cross_entropy = tf.nn.sigmoid_cross_entropy_with_logits(
      labels=(targets[sampled] == 1).astype(np.float32),
      logits=scores[sampled])
  np.testing.assert_allclose(
      loss(outputs, labels, [])["rpn_score_loss"],
      np.sum(cross_entropy) / sampled.sum(), rtol=1e-5)

  # The model's own anchors (none given) are the parser's: same detections.
  image_shape = labels["image_info"][:, 1, :]
  given = model(images, image_shape=image_shape,
                anchor_boxes=labels["anchor_boxes"], training=False)
  own = model(images, image_shape=image_shape, training=False)
  assert int(own["num_detections"][0]) > 0
  for key in ("detection_boxes", "detection_scores"):
    np.testing.assert_allclose(own[key], given[key], rtol=1e-6, err_msg=key)


@pytest.mark.parametrize("field,value", [
    ("min_level", 0), ("max_level", 1), ("num_scales", 1.5),
    ("aspect_ratios", []), ("aspect_ratios", [1.0, -2.0]),
    ("anchor_size", 0.0), ("rpn_match_threshold", 1.5),
    ("rpn_unmatched_threshold", 0.8), ("rpn_batch_size_per_im", 0),
    ("rpn_fg_fraction", 0.0)])
def test_an_invalid_field_is_named(field, value):
  with pytest.raises(ValueError, match=f"AnchorSpec.{field} must be"):
    AnchorSpec(**{field: value})


def test_an_invalid_binding_fails_where_the_spec_is_read():
  gin.parse_config("AnchorSpec.rpn_unmatched_threshold = 0.8")
  with pytest.raises(ValueError, match="AnchorSpec.rpn_unmatched_threshold"):
    losses.FasterRCNNLoss()


def test_config_round_trip_without_gin():
  gin.parse_config(SPEC_GIN)
  spec = AnchorSpec()
  config = json.loads(json.dumps(spec.to_config()))
  gin.clear_config()
  assert AnchorSpec.from_config(config) == spec != AnchorSpec()
  assert AnchorSpec.from_config(config).aspect_ratios == (1.0, 2.0)
