"""Detector outputs -> detections in the dataset's terms.

The one definition of the mapping, shared by the COCO evaluator, the
SavedModel export and the predict tool. The detector sees each image resized
and padded by `preprocess_ops.resize_and_crop_image(_v2)`, whose `image_info`
rows are [original size, scaled size, scale (y, x), offset (y, x)] and which
maps an original pixel p to `p * scale - offset` (the offset is a random crop
in training, zero in evaluation). Its classes are contiguous indices 1..K.
"""
from typing import Tuple

import tensorflow as tf

from official.vision.ops import box_ops

from megdet_tf.dataloaders.category_map import CategoryMap


def to_original_image(detection_boxes, detection_classes, image_info,
                      category_map: CategoryMap
                      ) -> Tuple[tf.Tensor, tf.Tensor]:
  """Maps boxes to original-image pixels and classes to category ids.

  Args:
    detection_boxes: [B, N, 4] boxes [ymin, xmin, ymax, xmax] in the
      network-input image's pixels.
    detection_classes: [B, N] contiguous class indices (0 = background).
    image_info: [B, 4, 2] as produced by the input parser.
    category_map: the dataset's `CategoryMap`.

  Returns:
    float32 boxes [B, N, 4] in original-image pixels, clipped to the image
    (padding can hold boxes outside it), and int64 category ids [B, N]
    (background stays 0).
  """
  boxes = tf.cast(detection_boxes, tf.float32)
  image_info = tf.cast(image_info, tf.float32)
  offset = tf.tile(image_info[:, 3:4, :], [1, 1, 2])
  scale = tf.tile(image_info[:, 2:3, :], [1, 1, 2])
  boxes = box_ops.clip_boxes((boxes + offset) / scale, image_info[:, 0:1, :])
  return boxes, category_map.to_category_id(
      tf.convert_to_tensor(detection_classes))
