"""FasterRCNNLoss against a NumPy transcription of each term."""
import megdet_tf  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TF)
import numpy as np
import pytest
import tensorflow as tf

from megdet_tf.modeling import losses
from megdet_tf.ops.anchor_spec import AnchorSpec

B, H, W, A, R, K = 2, 4, 3, 3, 6, 4  # Batch, RPN map, anchors, RoIs, classes.


def _case(seed=0):
  rng = np.random.default_rng(seed)
  rpn_score_targets = rng.choice([-1, 0, 1], size=(B, H, W, A), p=[.5, .4, .1])
  positive = np.repeat(rpn_score_targets == 1, 4, axis=-1)
  rpn_box_targets = np.where(positive, rng.normal(0, 0.3, (B, H, W, 4 * A)),
                             0.0)
  class_targets = rng.choice(K, size=(B, R), p=[.5, .2, .2, .1])
  box_targets = np.where((class_targets > 0)[..., None],
                         rng.normal(0, 1, (B, R, 4)), 0.0)
  outputs = {
      "rpn_scores": {"2": rng.normal(0, 2, (B, H, W, A))},
      "rpn_boxes": {"2": rng.normal(0, 0.3, (B, H, W, 4 * A))},
      "class_outputs": rng.normal(0, 2, (B, R, K)),
      "box_outputs": rng.normal(0, 1, (B, R, 4 * K)),
      "class_targets": class_targets,
      "box_targets": box_targets,
  }
  labels = {"rpn_score_targets": {"2": rpn_score_targets},
            "rpn_box_targets": {"2": rpn_box_targets}}
  return outputs, labels


def _huber(x, delta):
  x = np.abs(x)
  return np.where(x <= delta, 0.5 * x**2, delta * (x - 0.5 * delta))


def _reference(outputs, labels, rpn_batch_size_per_im):
  score, target = outputs["rpn_scores"]["2"], labels["rpn_score_targets"]["2"]
  bce = np.maximum(score, 0) - score * (target == 1) + np.log1p(
      np.exp(-np.abs(score)))
  rpn_score = np.sum(bce * (target >= 0)) / (B * rpn_batch_size_per_im)
  box_target = labels["rpn_box_targets"]["2"]
  positive = np.repeat(target == 1, 4, axis=-1)
  rpn_box = np.sum(_huber(outputs["rpn_boxes"]["2"] - box_target, 1 / 9) *
                   positive) / (positive.sum() + 0.01)
  logits, classes = outputs["class_outputs"], outputs["class_targets"]
  log_softmax = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  frcnn_cls = -np.mean(np.take_along_axis(log_softmax, classes[..., None], -1))
  deltas = outputs["box_outputs"].reshape(B, R, K, 4)
  chosen = np.take_along_axis(deltas, classes[..., None, None], 2)[:, :, 0]
  foreground = np.repeat((classes > 0)[..., None], 4, axis=-1)
  frcnn_box = np.sum(_huber(chosen - outputs["box_targets"], 1.0) *
                     foreground) / (foreground.sum() + 0.01)
  return {"rpn_score_loss": rpn_score, "rpn_box_loss": rpn_box,
          "frcnn_cls_loss": frcnn_cls, "frcnn_box_loss": frcnn_box}


def _model():
  model = tf.keras.Sequential([
      tf.keras.layers.Conv2D(4, 3, input_shape=(8, 8, 3)),
      tf.keras.layers.BatchNormalization(),
      tf.keras.layers.Flatten(),
      tf.keras.layers.Dense(2)])
  for v in model.variables:
    v.assign(tf.random.stateless_normal(v.shape, seed=[len(v.name), 0]))
  return model


@pytest.mark.parametrize("rpn_batch_size_per_im", [256, 64])
def test_terms_match_reference(rpn_batch_size_per_im):
  outputs, labels = _case()
  model = _model()
  loss = losses.FasterRCNNLoss(anchor_spec=AnchorSpec(
      rpn_batch_size_per_im=rpn_batch_size_per_im))
  got = loss(outputs, labels, model.trainable_variables)
  expected = _reference(outputs, labels, rpn_batch_size_per_im)
  for name, value in expected.items():
    np.testing.assert_allclose(got[name], value, rtol=1e-5, err_msg=name)
  np.testing.assert_allclose(got["model_loss"], sum(expected.values()),
                             rtol=1e-5)
  assert tuple(got) == losses.FasterRCNNLoss.KEYS
  np.testing.assert_allclose(got["total_loss"],
                             got["model_loss"] + got["l2_loss"], rtol=1e-6)
  assert all(v.dtype == tf.float32 for v in got.values())


@pytest.mark.parametrize("weight_decay_on,decayed", [
    ("kernels", ("conv2d", "dense")),
    ("all", ("conv2d", "dense", "batch_normalization"))])
def test_weight_decay_variables(weight_decay_on, decayed):
  outputs, labels = _case()
  model = _model()
  names = {v.name for v in losses.decayed_variables(model.trainable_variables,
                                                     weight_decay_on)}
  expected = [v for v in model.trainable_variables
              if v.name.split("/")[0].rstrip("_0123456789") in decayed and (
                  weight_decay_on == "all" or "kernel" in v.name)]
  assert names == {v.name for v in expected}
  with tf.GradientTape() as tape:
    got = losses.FasterRCNNLoss(weight_decay=3e-4,
                                weight_decay_on=weight_decay_on)(
                                    outputs, labels, model.trainable_variables)
  l2 = 0.5 * 3e-4 * sum(np.sum(np.square(v.numpy())) for v in expected)
  np.testing.assert_allclose(got["l2_loss"], l2, rtol=1e-5)
  # Its gradient is lambda * w on decayed variables, nothing elsewhere.
  for v, grad in zip(model.trainable_variables, tape.gradient(
      got["l2_loss"], model.trainable_variables)):
    expected_grad = 3e-4 * v.numpy() if v.name in names else None
    if expected_grad is None:
      assert grad is None, v.name
    else:
      np.testing.assert_allclose(grad, expected_grad, rtol=1e-6)
  assert not any("moving" in n for n in names)


def test_bfloat16_outputs_give_float32_losses():
  outputs, labels = _case(1)
  cast = tf.nest.map_structure(lambda x: tf.cast(x, tf.bfloat16), outputs)
  got = losses.FasterRCNNLoss(weight_decay=0.0)(cast, labels, [])
  assert all(v.dtype == tf.float32 for v in got.values())
  assert float(got["l2_loss"]) == 0.0
  expected = _reference(outputs, labels, 256)
  for name, value in expected.items():
    np.testing.assert_allclose(got[name], value, rtol=5e-2, err_msg=name)


def test_unknown_weight_decay_choice():
  with pytest.raises(ValueError, match="weight_decay_on"):
    losses.FasterRCNNLoss(weight_decay_on="biases")
