"""Fast R-CNN box head: RoI features -> class logits and per-class deltas.

Detectron's FPN head: optional 3x3 convs, then `num_fcs` fully connected
layers (2 x 1024, "2fc") with relu, then a linear classifier over
`num_classes` (background = 0) and class-specific box deltas. The output
layout is Model Garden's `DetectionHead`'s, so its losses and detection
generator apply unchanged. Norms (after convs always, after fcs if
`fc_norm`) come from `build_norm`; Detectron's 2fc head has none.
"""
from typing import Any, Dict, Optional, Tuple

import gin
import tensorflow as tf

from megdet_tf.modeling.layers import conv2d
from megdet_tf.modeling.layers import initializers
from megdet_tf.modeling.layers import normalization


@tf.keras.utils.register_keras_serializable(package="megdet_tf")
@gin.configurable
class BoxHead(tf.keras.layers.Layer):
  """[B, N, S, S, C] RoI features -> ([B, N, K+1], [B, N, 4(K+1)])."""

  def __init__(self,
               num_classes: int = gin.REQUIRED,
               num_convs: int = 0,
               num_filters: int = 256,
               num_fcs: int = 2,
               fc_dims: int = 1024,
               fc_norm: bool = False,
               norm: Optional[Dict[str, Any]] = None,
               **kwargs):
    """Builds the layers.

    Args:
      num_classes: detector classes including background (K + 1).
      num_convs: 3x3 convs (each followed by a norm) before the fcs.
      num_filters: channels of those convs.
      num_fcs: fully connected layers.
      fc_dims: width of each fully connected layer.
      fc_norm: normalize after each fully connected layer.
      norm: norm spec (`normalization.norm_spec`); None = Gin's choice.
      **kwargs: `tf.keras.layers.Layer` arguments (e.g. `name`).
    """
    super().__init__(**kwargs)
    self._config = dict(num_classes=num_classes, num_convs=num_convs,
                        num_filters=num_filters, num_fcs=num_fcs,
                        fc_dims=fc_dims, fc_norm=fc_norm,
                        norm=normalization.norm_spec(norm))
    self.convs = [conv2d.Conv2D(
        num_filters, 3, padding="same", use_bias=False,
        kernel_initializer=tf.keras.initializers.HeNormal(),
        name=f"conv_{i}") for i in range(num_convs)]
    self.conv_norms = [normalization.build_norm(name=f"conv_{i}_norm",
                                                **self._config["norm"])
                       for i in range(num_convs)]
    self.fcs = [tf.keras.layers.Dense(
        fc_dims, use_bias=not fc_norm,
        kernel_initializer=initializers.xavier_fill(), name=f"fc_{i}")
                for i in range(num_fcs)]
    self.fc_norms = [normalization.build_norm(name=f"fc_{i}_norm",
                                              **self._config["norm"])
                     for i in range(num_fcs)] if fc_norm else []
    # Predictions in float32 under mixed precision (boxes are decoded in their
    # dtype; see rpn_head.py).
    self.classifier = tf.keras.layers.Dense(
        num_classes, kernel_initializer=tf.keras.initializers.RandomNormal(
            stddev=0.01), dtype="float32", name="class_logits")
    self.box_regressor = tf.keras.layers.Dense(
        4 * num_classes, kernel_initializer=tf.keras.initializers.RandomNormal(
            stddev=0.001), dtype="float32", name="box_deltas")

  def call(self, roi_features: tf.Tensor, training=None
           ) -> Tuple[tf.Tensor, tf.Tensor]:
    _, num_rois, height, width, channels = roi_features.shape
    x = tf.reshape(roi_features, [-1, height, width, channels])
    for conv, norm in zip(self.convs, self.conv_norms):
      x = tf.nn.relu(norm(conv(x), training=training))
    x = tf.reshape(x, [-1, num_rois, height * width * x.shape[-1]])
    for i, fc in enumerate(self.fcs):
      x = fc(x)
      if self.fc_norms:
        x = self.fc_norms[i](x, training=training)  # Over all RoIs.
      x = tf.nn.relu(x)
    return self.classifier(x), self.box_regressor(x)

  def get_config(self):
    return dict(self._config, **super().get_config())
