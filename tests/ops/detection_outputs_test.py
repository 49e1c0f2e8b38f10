"""Detector outputs back to original pixels and category ids."""
import numpy as np

from megdet_tf.dataloaders.category_map import CategoryMap
from megdet_tf.ops import detection_outputs
import tensorflow as tf

from official.vision.ops import preprocess_ops


def test_inverts_model_gardens_resize_and_crop():
  """Boxes through Model Garden's forward mapping come back unchanged."""
  category_map = CategoryMap([3, 17, 90])
  original = tf.constant([[10., 20., 50., 70.], [0., 0., 100., 150.],
                          [33.5, 41.25, 60., 99.]])  # [ymin, xmin, ymax, xmax]
  image = tf.zeros([100, 150, 3])
  batch_boxes, batch_info = [], []
  # Evaluation (no offset) and training-style scale jitter (random crop).
  for scale_max, seed in ((1.0, 1), (2.0, 3)):
    _, info = preprocess_ops.resize_and_crop_image(
        image, [128, 128], [128, 128], aug_scale_min=scale_max,
        aug_scale_max=scale_max, seed=seed)
    boxes = original * tf.tile(info[2:3], [1, 2]) - tf.tile(info[3:4], [1, 2])
    batch_boxes.append(boxes)
    batch_info.append(info)
  assert np.any(batch_info[1][3].numpy() > 0), "want a non-zero offset"

  boxes, ids = detection_outputs.to_original_image(
      tf.stack(batch_boxes), tf.constant([[1, 2, 3], [3, 0, 2]]),
      tf.stack(batch_info), category_map)
  np.testing.assert_allclose(boxes.numpy(), tf.stack([original] * 2).numpy(),
                             rtol=1e-6, atol=1e-4)
  np.testing.assert_array_equal(ids.numpy(), [[3, 17, 90], [90, 0, 17]])
  assert boxes.dtype == tf.float32 and ids.dtype == tf.int64


def test_clips_to_original_image():
  """A box reaching into the padding ends at the original image's border."""
  # 50x80 image scaled by 1.6 to 80x128, padded to 128x128, no offset.
  info = tf.constant([[[50., 80.], [80., 128.], [1.6, 1.6], [0., 0.]]])
  network_boxes = tf.constant([[[-8., 16., 120., 130.], [8., 16., 40., 64.]]])
  boxes, _ = detection_outputs.to_original_image(
      network_boxes, tf.constant([[1, 1]]), info, CategoryMap([1]))
  np.testing.assert_allclose(boxes.numpy(),
                             [[[0., 10., 50., 80.], [5., 10., 25., 40.]]],
                             rtol=1e-6)


def test_accepts_numpy_and_bfloat16():
  info = np.array([[[10, 10], [20, 20], [2, 2], [0, 0]]], np.float32)
  boxes, ids = detection_outputs.to_original_image(
      tf.constant([[[2., 4., 6., 8.]]], tf.bfloat16), np.array([[2]]), info,
      CategoryMap([4, 8]))
  np.testing.assert_array_equal(boxes.numpy(), [[[1., 2., 3., 4.]]])
  np.testing.assert_array_equal(ids.numpy(), [[8]])
