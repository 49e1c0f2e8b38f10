"""Feature Pyramid Network (Lin et al. 2017) as Detectron builds it.

P_l = conv3x3(lateral_l + upsample2x(top-down_{l+1})) for the backbone's
levels, lateral_l = conv1x1(C_l); levels above the backbone's come from
stride-2 subsampling of the one below (P6 = max_pool1x1/2(P5)), which is what
the Faster R-CNN FPN uses for its largest anchors. Convs have a bias and no
normalization by default; `use_norm` adds the project's norm after each conv.
"""
from typing import Any, Dict, Mapping, Optional

import gin
import tensorflow as tf

from megdet_tf.modeling.layers import conv2d
from megdet_tf.modeling.layers import initializers
from megdet_tf.modeling.layers import normalization


@tf.keras.utils.register_keras_serializable(package="megdet_tf")
@gin.configurable
class FPN(tf.keras.Model):
  """Maps {'2': C2, ..., '5': C5} to {'2': P2, ..., str(max_level): P_max}."""

  def __init__(self,
               min_level: int = 2,
               max_level: int = 6,
               backbone_max_level: int = 5,
               num_filters: int = 256,
               use_norm: bool = False,
               norm: Optional[Dict[str, Any]] = None,
               **kwargs):
    """Builds the layers.

    Args:
      min_level: finest output level (needs C_min_level from the backbone).
      max_level: coarsest output level.
      backbone_max_level: coarsest backbone level; outputs above it are
        subsampled.
      num_filters: channels of every output level.
      use_norm: normalize after each conv (with `build_norm`); the convs then
        have no bias.
      norm: norm spec (`normalization.norm_spec`); None = Gin's choice.
      **kwargs: `tf.keras.Model` arguments (e.g. `name`).
    """
    super().__init__(**kwargs)
    if not min_level <= backbone_max_level <= max_level:
      raise ValueError(
          f"FPN needs min_level <= backbone_max_level <= max_level, got "
          f"{min_level}, {backbone_max_level}, {max_level}")
    self._config = dict(min_level=min_level, max_level=max_level,
                        backbone_max_level=backbone_max_level,
                        num_filters=num_filters, use_norm=use_norm,
                        norm=normalization.norm_spec(norm))
    conv = lambda kernel, name: conv2d.Conv2D(
        num_filters, kernel, padding="same", use_bias=not use_norm,
        kernel_initializer=initializers.xavier_fill(), name=name)
    norm = lambda name: (
        normalization.build_norm(name=name, **self._config["norm"])
        if use_norm else tf.keras.layers.Identity(name=name))
    levels = range(min_level, backbone_max_level + 1)
    self.lateral_convs = [conv(1, f"lateral_{l}") for l in levels]
    self.lateral_norms = [norm(f"lateral_{l}_norm") for l in levels]
    self.output_convs = [conv(3, f"output_{l}") for l in levels]
    self.output_norms = [norm(f"output_{l}_norm") for l in levels]

  def call(self, inputs: Mapping[str, tf.Tensor],
           training=None) -> Dict[str, tf.Tensor]:
    cfg = self._config
    levels = list(range(cfg["min_level"], cfg["backbone_max_level"] + 1))
    laterals = [n(c(inputs[str(l)]), training=training) for l, c, n in zip(
        levels, self.lateral_convs, self.lateral_norms)]
    for i in range(len(levels) - 2, -1, -1):
      size = tf.shape(laterals[i])[1:3]
      laterals[i] += tf.image.resize(laterals[i + 1], size, method="nearest")
    outputs = {
        str(l): n(c(x), training=training) for l, x, c, n in zip(
            levels, laterals, self.output_convs, self.output_norms)}
    for l in range(cfg["backbone_max_level"] + 1, cfg["max_level"] + 1):
      outputs[str(l)] = tf.nn.max_pool2d(outputs[str(l - 1)], 1, 2, "VALID")
    return outputs

  def get_config(self):
    return dict(self._config, name=self.name)

  @classmethod
  def from_config(cls, config, custom_objects=None):
    return cls(**config)
