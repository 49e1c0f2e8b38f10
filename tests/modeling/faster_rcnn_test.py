"""The detector end to end: outputs, norm kinds, config, Gin model files.

Inputs come from the real `DetectionParser`. Training it on several replicas
(CGBN, recomputation) is tested in tests/training/train_test.py, and its
learning on the session's trained demo (COCO AP > 0.9 on four images).
"""
import json
import os

import megdet_tf  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TF)
import gin
import numpy as np
import pytest
import tensorflow as tf

from official.vision.ops import anchor

from megdet_tf.dataloaders.category_map import CategoryMap
from megdet_tf.dataloaders.detection_parser import DetectionParser
from megdet_tf.modeling import faster_rcnn
from megdet_tf.modeling import losses
from megdet_tf.modeling.layers import normalization
from megdet_tf.ops import detection_outputs

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
CATEGORY_MAP = CategoryMap([2, 5, 9])
SIZE = 128
# Over conftest's tiny detector: few proposals and RoIs, so shapes are small.
PROPOSALS = """
MultilevelROIGenerator.pre_nms_top_k = 100
MultilevelROIGenerator.num_proposals = 50
ROISampler.num_sampled_rois = 16
"""


def _decoded_example(seed):
  """A decoded TF Example (as TfExampleDecoder gives) with 1-3 boxes."""
  rng = np.random.default_rng(seed)
  n = int(rng.integers(1, 4))
  corners = np.sort(rng.uniform(0, 1, (n, 2, 2)), axis=1)
  boxes = corners.transpose(0, 2, 1).reshape(n, 4)[:, [0, 2, 1, 3]]
  boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 0.2).clip(max=1.0)
  return {
      "image": tf.constant(rng.integers(0, 256, (96, 120, 3), np.uint8)),
      "source_id": tf.constant(str(seed + 1)),
      "groundtruth_boxes": tf.constant(boxes, tf.float32),
      "groundtruth_classes": tf.constant(
          rng.choice(CATEGORY_MAP.category_ids, n), tf.int64),
      "groundtruth_is_crowd": tf.zeros([n], tf.bool),
  }


def make_batch(batch_size=2, training=True, first_seed=0):
  parser = DetectionParser(category_map=CATEGORY_MAP, short_side=SIZE,
                           long_side=SIZE, aug_rand_hflip=False)
  parse = parser.parse_fn(is_training=training)
  pairs = [parse(_decoded_example(first_seed + i)) for i in range(batch_size)]
  images = tf.stack([p[0] for p in pairs])
  labels = tf.nest.map_structure(lambda *x: tf.stack(x), *[p[1] for p in pairs])
  return images, labels


@pytest.fixture
def build_tiny(tiny_detector_gin):
  """Builds conftest's tiny detector with `norm` and `extra` bindings."""

  def build(norm="frozen", extra=""):
    gin.parse_config(tiny_detector_gin + PROPOSALS +
                     f"build_norm.norm = '{norm}'\n" + extra)
    return faster_rcnn.build_faster_rcnn(num_classes=CATEGORY_MAP.num_classes)

  return build


def train_step(model, images, labels, optimizer):
  with tf.GradientTape() as tape:
    outputs = model.call_with_labels(images, labels, training=True)
    terms = losses.FasterRCNNLoss()(outputs, labels, model.trainable_variables)
  grads = tape.gradient(terms["total_loss"], model.trainable_variables)
  optimizer.apply_gradients(zip(grads, model.trainable_variables))
  return terms


def test_training_outputs(build_tiny):
  model = build_tiny()
  images, labels = make_batch()
  outputs = model.call_with_labels(images, labels, training=True)
  k = CATEGORY_MAP.num_classes
  for level in range(2, 7):
    side = SIZE // 2**level
    assert outputs["rpn_scores"][str(level)].shape == (2, side, side, 3)
    assert outputs["rpn_boxes"][str(level)].shape == (2, side, side, 12)
    assert outputs["decoder_features"][str(level)].shape == (2, side, side, 16)
  assert outputs["class_outputs"].shape == (2, 16, k)
  assert outputs["box_outputs"].shape == (2, 16, 4 * k)
  assert outputs["class_targets"].shape == (2, 16)
  assert outputs["box_targets"].shape == (2, 16, 4)
  assert outputs["class_outputs"].dtype == tf.float32
  targets = outputs["class_targets"].numpy()
  assert targets.min() >= 0 and targets.max() < k
  assert (targets > 0).any()  # Ground truth is mixed into the RoIs.
  assert "detection_boxes" not in outputs


def test_inference_outputs_and_detections(build_tiny):
  model = build_tiny()
  images, labels = make_batch(training=False)
  outputs = model.call_with_labels(images, labels, training=False)
  assert outputs["detection_boxes"].shape == (2, 10, 4)
  assert outputs["detection_scores"].shape == (2, 10)
  assert outputs["detection_classes"].shape == (2, 10)
  assert outputs["num_detections"].shape == (2,)
  assert outputs["detection_boxes"].dtype == tf.float32
  assert outputs["detection_classes"].dtype == tf.int32
  n = outputs["num_detections"].numpy()
  assert (n >= 0).all() and (n <= 10).all() and n.sum() > 0
  for b in range(2):
    valid = slice(0, n[b])
    classes = outputs["detection_classes"][b, valid].numpy()
    assert ((classes >= 1) & (classes < CATEGORY_MAP.num_classes)).all()
    scores = outputs["detection_scores"][b, valid].numpy()
    assert (np.diff(scores) <= 0).all() and (scores > 0.05).all()
    boxes = outputs["detection_boxes"][b, valid].numpy()
    assert (boxes >= 0).all() and (boxes <= SIZE).all()
  detections = model.detections(outputs, labels["image_info"], CATEGORY_MAP)
  boxes, ids = detection_outputs.to_original_image(
      outputs["detection_boxes"], outputs["detection_classes"],
      labels["image_info"], CATEGORY_MAP)
  np.testing.assert_array_equal(detections["detection_boxes"], boxes)
  np.testing.assert_array_equal(detections["detection_classes"], ids)
  assert set(ids.numpy()[0, :n[0]]) <= set(CATEGORY_MAP.category_ids)
  np.testing.assert_array_equal(detections["num_detections"], n)


def _norm_layers(model):
  return [l for l in model._flatten_layers()
          if isinstance(l, tf.keras.layers.BatchNormalization)]


@pytest.mark.parametrize("norm", normalization.NORMS)
def test_norm_kinds_in_a_training_step(norm, build_tiny):
  model = build_tiny(norm, "BoxHead.num_convs = 1\nFPN.use_norm = True\n")
  norms = _norm_layers(model)
  assert len(norms) == 20 + 8 + 1  # Backbone, FPN, box head conv.
  expected_type = type(normalization.build_norm(norm))
  assert all(type(n) is expected_type for n in norms)
  moving = [v for n in norms for v in (n.moving_mean, n.moving_variance)]
  before = [v.numpy() for v in moving]
  weights_before = [v.numpy() for v in model.trainable_variables]
  images, labels = make_batch()
  terms = train_step(model, images, labels, tf.keras.optimizers.SGD(0.01))
  assert np.isfinite(float(terms["total_loss"]))
  moved = [not np.array_equal(b, v.numpy()) for b, v in zip(before, moving)]
  changed = [not np.array_equal(b, v.numpy()) for b, v in zip(
      weights_before, model.trainable_variables)]
  norm_trainables = [v for n in norms for v in n.trainable_variables]
  if norm == "frozen":
    assert not norm_trainables and not any(moved)
  else:
    assert len(norm_trainables) == 2 * len(norms) and all(moved)
  assert sum(changed) >= 0.9 * len(changed)


def test_get_config_round_trip(build_tiny):
  model = build_tiny(extra="AnchorSpec.anchor_size = 4.0\n")
  config = model.get_config()
  json.dumps(config)  # Plain data, not live layers.
  gin.clear_config()  # The clone must not rely on Gin.
  clone = faster_rcnn.FasterRCNN.from_config(config)
  assert clone.get_config() == config
  assert clone.anchor_spec == model.anchor_spec
  assert clone.anchor_spec.anchor_size == 4.0
  faster_rcnn.build_variables(clone)
  assert ([v.shape for v in clone.variables] ==
          [v.shape for v in model.variables])
  clone.set_weights(model.get_weights())
  images, labels = make_batch(training=False)
  expected = model.call_with_labels(images, labels, training=False)
  got = clone.call_with_labels(images, labels, training=False)
  for key in ("detection_boxes", "detection_scores", "num_detections"):
    np.testing.assert_allclose(got[key], expected[key], rtol=1e-5, atol=1e-4)


def test_the_config_carries_the_norm_without_gin(build_tiny):
  """from_config rebuilds CGBN with its group size and epsilon everywhere,
  the FPN and heads included, after Gin is cleared."""
  model = build_tiny("cgbn", "build_norm.group_size = 2\n"
                     "build_norm.epsilon = 1e-3\n"
                     "FPN.use_norm = True\nRPNHead.use_norm = True\n"
                     "BoxHead.fc_norm = True\n")
  config = model.get_config()
  gin.clear_config()
  clone = faster_rcnn.FasterRCNN.from_config(config)
  faster_rcnn.build_variables(clone)
  norms = [l for l in clone.submodules
           if isinstance(l, tf.keras.layers.BatchNormalization)]
  assert len(norms) == len([l for l in model.submodules if isinstance(
      l, tf.keras.layers.BatchNormalization)])
  for part in (clone.backbone, clone.decoder, clone.rpn_head,
               clone.detection_head[0]):
    assert any(n in part.submodules for n in norms), part.name
  for norm in norms:
    assert type(norm).__name__ == "CrossReplicaBatchNormalization", norm.name
    assert (norm.group_size, norm.epsilon) == (2, 1e-3), norm.name


def test_mixed_bfloat16_keeps_boxes_float32(build_tiny):
  tf.keras.mixed_precision.set_global_policy("mixed_bfloat16")
  try:
    model = build_tiny()
    images, labels = make_batch()
    outputs = model.call_with_labels(tf.cast(images, tf.bfloat16), labels,
                                     training=True)
    assert outputs["decoder_features"]["2"].dtype == tf.bfloat16
    for key in ("class_outputs", "box_outputs", "box_targets"):
      assert outputs[key].dtype == tf.float32, key
    assert outputs["rpn_boxes"]["2"].dtype == tf.float32
    clone = faster_rcnn.FasterRCNN.from_config(model.get_config())
    assert clone.roi_sampler[0].dtype_policy.name == "float32"
    assert clone.backbone.dtype_policy.name == "mixed_bfloat16"
  finally:
    tf.keras.mixed_precision.set_global_policy("float32")


def test_a_config_from_before_anchor_spec_is_refused(build_tiny):
  config = build_tiny().get_config()
  config.update(config.pop("anchor_spec"))
  with pytest.raises(ValueError, match="without 'anchor_spec'"):
    faster_rcnn.FasterRCNN.from_config(config)


@pytest.mark.parametrize("gin_file,depth,fc_dims,num_rois,anchor_size", [
    ("r50_fpn.gin", 50, 1024, 512, 8.0), ("demo.gin", 18, 256, 128, 4.0)])
def test_gin_model_files(gin_file, depth, fc_dims, num_rois, anchor_size):
  gin.add_config_file_search_path(_REPO)
  gin.parse_config_files_and_bindings(
      [os.path.join(_REPO, "gin", "model", gin_file)], [])
  model = faster_rcnn.build_faster_rcnn(num_classes=CATEGORY_MAP.num_classes)
  config = model.get_config()
  assert config["backbone"]["config"]["depth"] == depth
  assert config["detection_head"]["config"]["fc_dims"] == fc_dims
  assert config["roi_sampler"]["config"]["num_sampled_rois"] == num_rois
  assert config["roi_aligner"]["config"]["crop_size"] == 7
  assert config["anchor_spec"]["aspect_ratios"] == [0.5, 1.0, 2.0]
  assert config["anchor_spec"]["anchor_size"] == anchor_size
  # The parser labels the anchors the model decodes.
  parser = DetectionParser(category_map=CATEGORY_MAP, short_side=SIZE,
                           long_side=SIZE)
  _, labels = parser.parse_fn(is_training=False)(_decoded_example(0))
  expected = anchor.Anchor(**model.anchor_spec.anchor_args(),
                           image_size=(SIZE, SIZE))
  assert sorted(labels["anchor_boxes"]) == sorted(expected.multilevel_boxes)
  for level, boxes in expected.multilevel_boxes.items():
    np.testing.assert_allclose(labels["anchor_boxes"][level], boxes)
