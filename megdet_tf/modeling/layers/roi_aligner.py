"""Model Garden's RoIAlign, optionally by TensorFlow's `crop_and_resize` kernel.

Model Garden's `MultilevelROIAligner` samples each RoI's `crop_size` x
`crop_size` bin centres bilinearly: it gathers the four neighbours of every
sample from all pyramid levels stacked into one matrix, weights them with
elementwise ops and average-pools. Its backward pass scatters through an
`UnsortedSegmentSum` of that matrix, in the features' dtype. Together that
is about a tenth of an R50-FPN training step on a CPU.

With `use_crop_and_resize`, this subclass takes the same samples with
`tf.image.crop_and_resize`, whose native kernels (CPU and GPU, forward and
backward) interpolate in float32: RoIs are grouped by the level Model Garden assigns them, each level's RoIs
are cropped from that level alone, and the crops are put back in RoI order.
The result equals Model Garden's (tests/modeling/layers/roi_aligner_test.py)
for RoIs inside the feature maps, as proposals and ground-truth boxes are:
samples between the last row (column) and the map's edge repeat it, as
Model Garden's clamping does, through one row and column of edge padding.
Unlike Model Garden's, that backward pass is not bitwise reproducible on a
CPU (the kernel's threads add into the feature gradient in varying order),
and a run's RoI sampling amplifies such differences within a few steps: off
by default, as in Model Garden; gin/model/r50_fpn.gin turns it on.
"""
from typing import Mapping, Optional

import gin
import tensorflow as tf

from official.vision.modeling import layers as mg_layers

_CANONICAL_SIZE = 224.0  # RoIs of this side go to level 4 (FPN paper, eq. 1).
_CANONICAL_LEVEL = 4.0


@gin.configurable
@tf.keras.utils.register_keras_serializable(package="megdet_tf")
class MultilevelROIAligner(mg_layers.MultilevelROIAligner):
  """`official.vision` RoIAlign, optionally by `crop_and_resize`."""

  def __init__(self, use_crop_and_resize: bool = False, **kwargs):
    """Model Garden's arguments; `use_crop_and_resize`: see the module."""
    super().__init__(**kwargs)
    self._config_dict["use_crop_and_resize"] = use_crop_and_resize

  def call(self,
           features: Mapping[str, tf.Tensor],
           boxes: tf.Tensor,
           training: Optional[bool] = None) -> tf.Tensor:
    """[B, N, crop, crop, C] features of `boxes` ([B, N, 4] y1x1y2x2 px)."""
    if not self._config_dict["use_crop_and_resize"]:
      return super().call(features, boxes, training=training)
    crop_size = self._config_dict["crop_size"]
    offset = self._config_dict["sample_offset"]
    levels = sorted(int(level) for level in features)
    finest = features[str(levels[0])]
    batch, num_boxes = tf.shape(boxes)[0], tf.shape(boxes)[1]
    boxes = tf.reshape(tf.cast(boxes, tf.float32), [-1, 4])
    image_ids = tf.repeat(tf.range(batch), num_boxes)
    box_ids = tf.dynamic_partition(
        tf.range(batch * num_boxes),
        _assigned_levels(boxes, levels[0], levels[-1]) - levels[0],
        len(levels))
    # The first and last samples of a box, as fractions of its size.
    first_last = tf.constant([offset, offset, crop_size - 1 + offset,
                              crop_size - 1 + offset]) / crop_size
    crops = []
    for level, ids in zip(levels, box_ids):
      level_features = tf.cast(features[str(level)], tf.float32)
      size = tf.cast(tf.shape(level_features)[1:3], tf.float32)
      level_boxes = tf.gather(boxes, ids) / 2.0**level
      start = tf.tile(level_boxes[:, :2], [1, 2])
      extent = tf.tile(level_boxes[:, 2:] - level_boxes[:, :2], [1, 2])
      # Padded by one row and column, the map spans [0, size] in the
      # kernel's coordinates, normalized by size.
      crops.append(tf.image.crop_and_resize(
          tf.pad(level_features, [[0, 0], [0, 1], [0, 1], [0, 0]],
                 mode="SYMMETRIC"),
          (start + first_last * extent) / tf.tile(size, [2]),
          tf.gather(image_ids, ids), [crop_size, crop_size]))
    crops = tf.reshape(tf.dynamic_stitch(box_ids, crops),
                       [batch, num_boxes, crop_size, crop_size,
                        finest.shape[-1]])
    return tf.cast(crops, finest.dtype)


def _assigned_levels(boxes: tf.Tensor, min_level: int,
                     max_level: int) -> tf.Tensor:
  """Each box's pyramid level, computed as Model Garden's aligner does."""
  side = tf.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
  levels = tf.math.floordiv(
      tf.math.log(tf.math.divide_no_nan(side, _CANONICAL_SIZE)),
      tf.math.log(2.0)) + _CANONICAL_LEVEL
  return tf.clip_by_value(tf.cast(levels, tf.int32), min_level, max_level)
