"""Faster R-CNN + FPN: our layers inside Model Garden's R-CNN model.

Model Garden's `MaskRCNNModel` with masks off already composes a backbone, a
decoder, an RPN head and a box head with its tested RoI machinery
(`MultilevelROIGenerator`, `ROISampler`, `MultilevelROIAligner`,
`DetectionGenerator`, box encoding with weights [10, 10, 5, 5]); it only calls
the layers it is given, so passing ours keeps every normalization under
`build_norm` while the two-stage logic stays Model Garden's. `FasterRCNN` adds
a real `get_config` (Model Garden's returns live layers) and the glue to our
input labels; `build_faster_rcnn` keeps box arithmetic in float32 under
`mixed_bfloat16`, which Model Garden's own factory does not.

Call it as Model Garden's model: `model(images, image_shape=...,
anchor_boxes=..., gt_boxes=..., gt_classes=..., training=True)` returns
`rpn_scores`/`rpn_boxes` (dicts by level), `class_outputs` [B, R, K+1],
`box_outputs` [B, R, 4(K+1)], `class_targets`, `box_targets` (the sampled RoIs'
targets), `backbone_features`, `decoder_features`; with `training=False` (no
ground truth needed) it returns `detection_boxes` [B, D, 4] (network-input
pixels, ymin/xmin/ymax/xmax), `detection_scores` [B, D], `detection_classes`
[B, D] (contiguous class indices 1..K) and `num_detections` [B].
"""
from typing import Any, Dict, Mapping, Optional

import gin
import tensorflow as tf

from official.vision.modeling import layers as mg_layers
from official.vision.modeling import maskrcnn_model

from megdet_tf.dataloaders.category_map import CategoryMap
from megdet_tf.modeling.backbones.resnet import ResNet
from megdet_tf.modeling.decoders.fpn import FPN
from megdet_tf.modeling.heads.box_head import BoxHead
from megdet_tf.modeling.heads.rpn_head import RPNHead
from megdet_tf.modeling.layers.roi_aligner import MultilevelROIAligner
from megdet_tf.modeling.layers.roi_generator import MultilevelROIGenerator
from megdet_tf.ops import detection_outputs
from megdet_tf.ops.anchor_spec import AnchorSpec

# Model Garden's RoI layers, configured from Gin by their class names (the
# RoI generator and aligner are our subclasses of Model Garden's, configurable
# in their files).
ROISampler = gin.external_configurable(mg_layers.ROISampler,
                                       module="official.vision")
DetectionGenerator = gin.external_configurable(
    mg_layers.DetectionGenerator, module="official.vision")

_LAYERS = ("backbone", "decoder", "rpn_head", "detection_head",
           "roi_generator", "roi_sampler", "roi_aligner",
           "detection_generator")


@tf.keras.utils.register_keras_serializable(package="megdet_tf")
class FasterRCNN(maskrcnn_model.MaskRCNNModel):
  """Faster R-CNN: Model Garden's R-CNN model without masks or cascades."""

  def __init__(self,
               backbone: tf.keras.Model,
               decoder: tf.keras.Model,
               rpn_head: tf.keras.layers.Layer,
               detection_head: tf.keras.layers.Layer,
               roi_generator: tf.keras.layers.Layer,
               roi_sampler: tf.keras.layers.Layer,
               roi_aligner: tf.keras.layers.Layer,
               detection_generator: tf.keras.layers.Layer,
               anchor_spec: AnchorSpec,
               **kwargs):
    super().__init__(
        backbone=backbone, decoder=decoder, rpn_head=rpn_head,
        detection_head=detection_head, roi_generator=roi_generator,
        roi_sampler=roi_sampler, roi_aligner=roi_aligner,
        detection_generator=detection_generator, **anchor_spec.anchor_args(),
        **kwargs)
    self.anchor_spec = anchor_spec

  def call_with_labels(self, images: tf.Tensor, labels: Mapping[str, Any],
                       training: bool) -> Dict[str, Any]:
    """Runs the model on a batch from `DetectionParser` (train or eval)."""
    kwargs = dict(image_shape=labels["image_info"][:, 1, :],
                  anchor_boxes=labels["anchor_boxes"], training=training)
    if training:
      kwargs.update(gt_boxes=labels["gt_boxes"],
                    gt_classes=labels["gt_classes"])
    return self(images, **kwargs)

  def detections(self, outputs: Mapping[str, tf.Tensor],
                 image_info: tf.Tensor,
                 category_map: CategoryMap) -> Dict[str, tf.Tensor]:
    """Inference outputs in original-image pixels and dataset category ids.

    What an exporter or predictor returns; the mapping is
    `megdet_tf.ops.detection_outputs.to_original_image`, which the COCO
    evaluator applies itself to the raw outputs and `image_info`.
    """
    boxes, category_ids = detection_outputs.to_original_image(
        outputs["detection_boxes"], outputs["detection_classes"], image_info,
        category_map)
    return {"detection_boxes": boxes,
            "detection_scores": outputs["detection_scores"],
            "detection_classes": category_ids,
            "num_detections": outputs["num_detections"]}

  def get_config(self) -> Dict[str, Any]:
    config = dict(self._config_dict)
    for key in _LAYERS:
      layer = config[key]
      layer = layer[0] if isinstance(layer, (list, tuple)) else layer
      config[key] = tf.keras.layers.serialize(layer)
      # Model Garden's layers leave their dtype policy out of their config.
      config[key]["config"].setdefault("dtype", layer.dtype_policy.name)
    return dict({key: config[key] for key in _LAYERS},
                anchor_spec=self.anchor_spec.to_config())

  @classmethod
  def from_config(cls, config, custom_objects=None):
    if "anchor_spec" not in config:
      raise ValueError(
          "FasterRCNN config without 'anchor_spec': a config written before "
          "AnchorSpec keeps min_level, max_level, num_scales, aspect_ratios "
          "and anchor_size at the top level; move them into "
          "config['anchor_spec']")
    config = dict(config)
    for key in _LAYERS:
      config[key] = tf.keras.layers.deserialize(
          config[key], custom_objects=custom_objects)
    config["anchor_spec"] = AnchorSpec.from_config(config["anchor_spec"])
    return cls(**config)


def build_variables(model: FasterRCNN, image_size: int = 128) -> None:
  """Creates every variable with one inference pass on a blank image.

  Subclassed Keras models create variables on their first call; do it here,
  under the strategy's scope, before loading weights, building the optimizer
  or tracing a replicated step.
  """
  image_shape = tf.constant([[image_size, image_size]], tf.float32)
  model(tf.zeros([1, image_size, image_size, 3]), image_shape=image_shape,
        training=False)


@gin.configurable
def build_faster_rcnn(num_classes: Optional[int] = None,
                      anchor_spec: Optional[AnchorSpec] = None) -> FasterRCNN:
  """Builds the detector from Gin-configured parts and creates its variables.

  Args:
    num_classes: classes including background; by default the Gin-configured
      `CategoryMap`'s.
    anchor_spec: the anchors (their levels are the FPN's and the RPN head's);
      Gin's `AnchorSpec` (the parser's and the loss's) if None.
  """
  num_classes = num_classes or CategoryMap().num_classes
  spec = anchor_spec or AnchorSpec()
  model = FasterRCNN(
      backbone=ResNet(),
      decoder=FPN(min_level=spec.min_level, max_level=spec.max_level),
      rpn_head=RPNHead(min_level=spec.min_level, max_level=spec.max_level,
                       num_anchors_per_location=spec.num_anchors_per_location),
      detection_head=BoxHead(num_classes=num_classes),
      # Boxes stay float32 under a mixed policy: Keras would cast these
      # layers' inputs to bfloat16, whose 8 significant bits put a 1000 px
      # coordinate on an 8 px grid.
      roi_generator=MultilevelROIGenerator(dtype="float32"),
      roi_sampler=ROISampler(dtype="float32"),
      roi_aligner=MultilevelROIAligner(),
      detection_generator=DetectionGenerator(dtype="float32"),
      anchor_spec=spec)
  build_variables(model, image_size=2 * 2**spec.max_level)
  return model
