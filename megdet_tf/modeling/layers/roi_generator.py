"""Model Garden's RoI generator, with its pre-NMS top-k also under batched NMS.

Model Garden's `MultilevelROIGenerator` proposes RoIs level by level: the top
`pre_nms_top_k` anchors by RPN score, greedy NMS, at most `num_proposals`
kept. By default its NMS is `sorted_non_max_suppression_padded`, a loop of
small ops written for TPUs, which takes about a fifth of an R50-FPN training
step on a CPU. Its `use_batched_nms=True` calls TensorFlow's native
`CombinedNonMaxSuppression` kernel instead, but over *every* anchor of a
level, keeping the first `pre_nms_top_k` boxes that survive: it refills what
NMS removed with lower-ranked anchors, so it proposes other boxes than the
padded path (and sorts 200k anchors a level at 800x1333).

This subclass keeps the top-k: with `use_batched_nms` it gathers each level's
`pre_nms_top_k` best anchors (by logit, as sigmoid is monotonic) and hands
only those to Model Garden's layer, whose batched NMS then proposes the same
RoIs as its padded path. `CombinedNonMaxSuppression` has a CPU kernel only in
TensorFlow 2.20, so on GPUs the padded path (the default) avoids host copies.
"""
from typing import Mapping, Optional

import gin
import tensorflow as tf

from official.vision.modeling import layers as mg_layers


@gin.configurable
@tf.keras.utils.register_keras_serializable(package="megdet_tf")
class MultilevelROIGenerator(mg_layers.MultilevelROIGenerator):
  """`official.vision` `MultilevelROIGenerator`; batched NMS after top-k."""

  def __init__(self, **kwargs):
    super().__init__(**kwargs)
    config = self._config_dict
    if config["use_batched_nms"] and (
        config["pre_nms_min_size_threshold"] or
        config["test_pre_nms_min_size_threshold"]):
      raise ValueError(
          "MultilevelROIGenerator: the pre-NMS minimum box size filter runs "
          "after the top-k selection here; set pre_nms_min_size_threshold and "
          "test_pre_nms_min_size_threshold to 0 or use_batched_nms=False.")

  def call(self,
           raw_boxes: Mapping[str, tf.Tensor],
           raw_scores: Mapping[str, tf.Tensor],
           anchor_boxes: Mapping[str, tf.Tensor],
           image_shape: tf.Tensor,
           training: Optional[bool] = None):
    if not self._config_dict["use_batched_nms"]:
      return super().call(raw_boxes, raw_scores, anchor_boxes, image_shape,
                          training=training)
    mode = "" if training else "test_"
    top_k = self._config_dict[mode + "pre_nms_top_k"]
    num_proposals = self._config_dict[mode + "num_proposals"]
    # As many rows as the padded path returns (zero rows where NMS left none).
    num_rows = min(num_proposals, sum(
        min(num_proposals, level_scores.shape[1:].num_elements())
        for level_scores in raw_scores.values()))
    candidates = {
        level: _top_k_candidates(raw_boxes[level], raw_scores[level],
                                 anchor_boxes[level], top_k)
        for level in raw_scores}
    boxes, scores, anchors = (
        {level: parts[i] for level, parts in candidates.items()}
        for i in range(3))
    rois, roi_scores = super().call(boxes, scores, anchors, image_shape,
                                    training=training)
    padding = num_rows - rois.shape[1]
    return (tf.pad(rois, [[0, 0], [0, padding], [0, 0]]),
            tf.pad(roi_scores, [[0, 0], [0, padding]]))


def _top_k_candidates(boxes, scores, anchors, k):
  """The `k` best-scoring anchors of one level, in the layer's input layout.

  boxes [B, H, W, A*4], scores [B, H, W, A] and anchors (leading batch
  dimension, 4 coordinates last) become [B, 1, k, 4], [B, 1, k, 1] and
  [B, k, 4], with k at most H*W*A.
  """
  batch = tf.shape(scores)[0]
  num_anchors = scores.shape[1:].num_elements()
  k = min(k, num_anchors)
  scores = tf.reshape(scores, [batch, num_anchors])
  top_scores, indices = tf.math.top_k(scores, k=k, sorted=True)
  boxes = tf.gather(tf.reshape(boxes, [batch, num_anchors, 4]), indices,
                    batch_dims=1)
  anchors = tf.broadcast_to(
      tf.reshape(anchors, [-1, num_anchors, 4]), [batch, num_anchors, 4])
  anchors = tf.gather(anchors, indices, batch_dims=1)
  return (tf.reshape(boxes, [batch, 1, k, 4]),
          tf.reshape(top_scores, [batch, 1, k, 1]), anchors)
