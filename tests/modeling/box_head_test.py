"""Box head: output layout (Model Garden's), conv/fc options, norms, config."""
import megdet_tf  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TF)
import gin
import numpy as np
import tensorflow as tf

from megdet_tf.modeling.heads import box_head


def _rois(batch=2, num_rois=5, size=7, channels=8):
  return tf.random.stateless_normal([batch, num_rois, size, size, channels],
                                    seed=[1, 2])


def test_2fc_head_shapes():
  head = box_head.BoxHead(num_classes=4, fc_dims=32)
  classes, boxes = head(_rois())
  assert classes.shape == (2, 5, 4) and boxes.shape == (2, 5, 16)
  assert classes.dtype == boxes.dtype == tf.float32
  assert [v.shape for v in head.trainable_variables] == [
      (7 * 7 * 8, 32), (32,), (32, 32), (32,), (32, 4), (4,), (32, 16), (16,)]


def test_rois_are_independent():
  head = box_head.BoxHead(num_classes=3, fc_dims=16)
  rois = _rois()
  classes, boxes = head(rois)
  classes_0, boxes_0 = head(rois[:, :1])
  np.testing.assert_allclose(classes[:, :1], classes_0, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(boxes[:, :1], boxes_0, rtol=1e-5, atol=1e-6)


def test_conv_head_and_fc_norm_use_build_norm():
  gin.bind_parameter("build_norm.norm", "bn")
  head = box_head.BoxHead(num_classes=3, num_convs=2, num_filters=8,
                          num_fcs=1, fc_dims=16, fc_norm=True)
  with tf.GradientTape() as tape:
    classes, boxes = head(_rois(), training=True)
    loss = tf.reduce_sum(classes) + tf.reduce_sum(boxes)
  norms = head.conv_norms + head.fc_norms
  assert len(norms) == 3
  assert all(isinstance(n, tf.keras.layers.BatchNormalization) for n in norms)
  grads = tape.gradient(loss, head.trainable_variables)
  assert all(g is not None for g in grads)
  assert not head.fcs[0].use_bias and not head.convs[0].use_bias


def test_get_config_round_trip():
  head = box_head.BoxHead(num_classes=5, num_convs=1, num_filters=4,
                          num_fcs=3, fc_dims=8, fc_norm=True, name="head")
  restored = tf.keras.layers.deserialize(tf.keras.layers.serialize(head))
  assert isinstance(restored, box_head.BoxHead)
  assert restored.get_config() == head.get_config()
  classes, boxes = restored(_rois())
  assert classes.shape == (2, 5, 5) and boxes.shape == (2, 5, 20)
