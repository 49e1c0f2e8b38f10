"""Region Proposal Network head, shared across FPN levels (Detectron's).

One 3x3 conv + relu, then 1x1 convs for one objectness logit and four box
deltas per anchor, the same weights on every level. Outputs are keyed like
Model Garden's RPN head so its ROI generator and losses consume them as they
are. Unlike Model Garden's head (a batch norm per level) it has no
normalization unless `use_norm`, which takes the project's norm, one per level
since levels have different statistics.
"""
from typing import Any, Dict, Mapping, Optional, Tuple

import gin
import tensorflow as tf

from megdet_tf.modeling.layers import conv2d
from megdet_tf.modeling.layers import normalization


def _normal(stddev: float) -> tf.keras.initializers.Initializer:
  return tf.keras.initializers.RandomNormal(stddev=stddev)


@tf.keras.utils.register_keras_serializable(package="megdet_tf")
@gin.configurable
class RPNHead(tf.keras.layers.Layer):
  """Features {level: [B,H,W,C]} -> (scores [B,H,W,A], boxes [B,H,W,4A])."""

  def __init__(self,
               min_level: int = 2,
               max_level: int = 6,
               num_anchors_per_location: int = 3,
               num_filters: int = 256,
               use_norm: bool = False,
               norm: Optional[Dict[str, Any]] = None,
               **kwargs):
    """Builds the layers.

    Args:
      min_level: finest input level.
      max_level: coarsest input level.
      num_anchors_per_location: anchors per position (scales x ratios).
      num_filters: channels of the shared 3x3 conv.
      use_norm: normalize after the 3x3 conv (with `build_norm`).
      norm: norm spec (`normalization.norm_spec`); None = Gin's choice.
      **kwargs: `tf.keras.layers.Layer` arguments (e.g. `name`).
    """
    super().__init__(**kwargs)
    self._config = dict(min_level=min_level, max_level=max_level,
                        num_anchors_per_location=num_anchors_per_location,
                        num_filters=num_filters, use_norm=use_norm,
                        norm=normalization.norm_spec(norm))
    self.conv = conv2d.Conv2D(
        num_filters, 3, padding="same", use_bias=not use_norm,
        kernel_initializer=_normal(0.01), name="rpn_conv")
    self.norms = [normalization.build_norm(name=f"rpn_norm_{l}",
                                           **self._config["norm"])
                  for l in range(min_level, max_level + 1)] if use_norm else []
    # Predictions in float32 under mixed precision: Model Garden decodes the
    # proposals in the dtype of these outputs, and bfloat16 (8 significant
    # bits) would put a 1000 px coordinate on an 8 px grid.
    self.classifier = conv2d.Conv2D(
        num_anchors_per_location, 1, kernel_initializer=_normal(0.01),
        dtype="float32", name="rpn_scores")
    self.box_regressor = conv2d.Conv2D(
        4 * num_anchors_per_location, 1, kernel_initializer=_normal(0.01),
        dtype="float32", name="rpn_boxes")

  def call(self, features: Mapping[str, tf.Tensor], training=None
           ) -> Tuple[Dict[str, tf.Tensor], Dict[str, tf.Tensor]]:
    scores, boxes = {}, {}
    for i, level in enumerate(range(self._config["min_level"],
                                    self._config["max_level"] + 1)):
      x = self.conv(features[str(level)])
      if self.norms:
        x = self.norms[i](x, training=training)
      x = tf.nn.relu(x)
      scores[str(level)] = self.classifier(x)
      boxes[str(level)] = self.box_regressor(x)
    return scores, boxes

  def get_config(self):
    return dict(self._config, **super().get_config())
