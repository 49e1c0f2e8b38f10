"""Turns decoded COCO TF Examples into Faster R-CNN inputs and labels.

Composes Model Garden's ops (`preprocess_ops`, `box_ops`, `anchor`) the way
its Mask R-CNN parser does, with what MegDet training needs on top:

- Detectron-style resizing: the short side goes to `short_side` unless the
  long side would exceed `long_side` (800/1333 for COCO), then the image is
  padded to a fixed `padded_size` so every replica sees static shapes;
- category ids are remapped to contiguous class indices (`CategoryMap`);
- boxes that annotate ids outside the map are an error, not silently dropped.

Training labels are exactly those of Model Garden's Mask R-CNN parser with
masks off (anchor boxes, RPN targets, image_info, padded gt boxes/classes).
Evaluation labels keep what maps detections back to the original image:
`source_id` and `image_info`. `preprocess_image` and `anchor_boxes` are the
evaluation preprocessing of a bare image, which the SavedModel export runs
inside its serving graph.
"""
from typing import Dict, Optional, Sequence, Tuple

import gin
import tensorflow as tf

from official.vision.dataloaders import parser
from official.vision.dataloaders import utils as dataloader_utils
from official.vision.ops import anchor
from official.vision.ops import box_ops
from official.vision.ops import preprocess_ops

from megdet_tf.dataloaders.category_map import CategoryMap
from megdet_tf.ops.anchor_spec import AnchorSpec


@gin.configurable
class DetectionParser(parser.Parser):
  """Parser for Faster R-CNN + FPN training and evaluation."""

  def __init__(self,
               category_map: Optional[CategoryMap] = None,
               short_side: int = 800,
               long_side: int = 1333,
               padded_size: Optional[Sequence[int]] = None,
               anchor_spec: Optional[AnchorSpec] = None,
               aug_rand_hflip: bool = True,
               aug_scale_min: float = 1.0,
               aug_scale_max: float = 1.0,
               max_num_instances: int = 100,
               seed: Optional[int] = None,
               dtype: str = "float32"):
    """Initializes the parser.

    Args:
      category_map: dataset ids -> class indices; Gin's `CategoryMap` if None.
      short_side: target short side of the resized image.
      long_side: the long side never exceeds this.
      padded_size: [height, width] every image is padded to; by default a
        square of `long_side` rounded up to the coarsest feature stride, which
        holds landscape and portrait images alike.
      anchor_spec: the anchors to label and how the RPN samples them;
        Gin's `AnchorSpec` (the model's and the loss's) if None.
      aug_rand_hflip: random horizontal flip in training.
      aug_scale_min: minimum random scale jitter in training.
      aug_scale_max: maximum random scale jitter in training.
      max_num_instances: ground-truth boxes are padded/clipped to this.
      seed: op seed of the random augmentation (for deterministic input).
      dtype: dtype of the output image (`float32`, `bfloat16`, `float16`).
    """
    self.category_map = category_map or CategoryMap()
    self.anchor_spec = anchor_spec or AnchorSpec()
    spec = self.anchor_spec
    stride = 2**spec.max_level
    self.padded_size = tuple(padded_size or preprocess_ops.compute_padded_size(
        [long_side, long_side], stride))
    if any(side % stride for side in self.padded_size):
      raise ValueError(
          f"DetectionParser.padded_size {self.padded_size} must be divisible "
          f"by the coarsest stride 2**AnchorSpec.max_level = {stride}")
    self._short_side = short_side
    self._long_side = long_side
    self._anchor_generator = anchor.build_anchor_generator(
        **spec.anchor_args())
    self._anchor_labeler = anchor.RpnAnchorLabeler(
        spec.rpn_match_threshold, spec.rpn_unmatched_threshold,
        spec.rpn_batch_size_per_im, spec.rpn_fg_fraction)
    self._aug_rand_hflip = aug_rand_hflip
    self._aug_scale_min = aug_scale_min
    self._aug_scale_max = aug_scale_max
    self._max_num_instances = max_num_instances
    self._seed = seed
    self._dtype = dtype

  def has_boxes(self, data) -> tf.Tensor:
    """True if a decoded example has a non-crowd box (for filtering)."""
    return tf.reduce_any(tf.logical_not(data["groundtruth_is_crowd"]))

  def _contiguous_classes(self, category_ids: tf.Tensor) -> tf.Tensor:
    classes = self.category_map.to_index(category_ids)
    tf.debugging.assert_non_negative(
        classes, message=(
            "a box has a category id missing from CategoryMap.category_ids; "
            "bind the dataset's ids in its gin/data/*.gin file"))
    return classes

  def _resize(self, image, aug_scale_min=1.0, aug_scale_max=1.0):
    image = preprocess_ops.normalize_image(image)
    return preprocess_ops.resize_and_crop_image_v2(
        image, self._short_side, self._long_side, self.padded_size,
        aug_scale_min=aug_scale_min, aug_scale_max=aug_scale_max,
        seed=self._seed)

  def preprocess_image(self, image: tf.Tensor) -> Tuple[tf.Tensor, tf.Tensor]:
    """Evaluation preprocessing of one decoded [H, W, 3] uint8 image.

    Returns the normalised image resized and padded to `padded_size` (in the
    parser's dtype) and its `image_info` [4, 2] (original size, scaled size,
    scale, offset).
    """
    image, image_info = self._resize(image)
    return tf.cast(image, self._dtype), image_info

  def anchor_boxes(self) -> Dict[str, tf.Tensor]:
    """Anchors of the padded image: {level: [H_l, W_l, 4 * anchors]}."""
    return self._anchor_generator(image_size=self.padded_size)

  def _parse_train_data(self, data):
    keep = tf.where(tf.logical_not(data["groundtruth_is_crowd"]))[:, 0]
    classes = self._contiguous_classes(tf.gather(data["groundtruth_classes"],
                                                 keep))
    boxes = tf.gather(data["groundtruth_boxes"], keep)
    image = data["image"]
    original_size = tf.shape(image)[0:2]

    if self._aug_rand_hflip:
      image, boxes, _ = preprocess_ops.random_horizontal_flip(
          image, boxes, seed=self._seed)
    boxes = box_ops.denormalize_boxes(boxes, original_size)
    image, image_info = self._resize(image, self._aug_scale_min,
                                     self._aug_scale_max)
    boxes = preprocess_ops.resize_and_crop_boxes(
        boxes, image_info[2, :], image_info[1, :], image_info[3, :])
    non_empty = box_ops.get_non_empty_box_indices(boxes)
    boxes = tf.gather(boxes, non_empty)
    classes = tf.gather(classes, non_empty)

    anchor_boxes = self.anchor_boxes()
    rpn_score_targets, rpn_box_targets = self._anchor_labeler.label_anchors(
        anchor_boxes, boxes,
        tf.cast(tf.expand_dims(classes, axis=-1), tf.float32))
    labels = {
        "anchor_boxes": anchor_boxes,
        "image_info": image_info,
        "rpn_score_targets": rpn_score_targets,
        "rpn_box_targets": rpn_box_targets,
        "gt_boxes": preprocess_ops.clip_or_pad_to_fixed_size(
            boxes, self._max_num_instances, -1),
        "gt_classes": preprocess_ops.clip_or_pad_to_fixed_size(
            classes, self._max_num_instances, -1),
    }
    return tf.cast(image, self._dtype), labels

  def _parse_eval_data(self, data):
    image, image_info = self.preprocess_image(data["image"])
    labels = {
        "source_id": dataloader_utils.process_source_id(data["source_id"]),
        "image_info": image_info,
        "anchor_boxes": self.anchor_boxes(),
    }
    return image, labels
