"""Validation images with boxes for TensorBoard's Images tab.

During an evaluation pass, `EvalImageSummaries` keeps the images with the
`num_images` lowest ids of the annotations file. These are the same images at
every evaluation whatever order the input pipeline delivers them in, so
TensorBoard's step slider shows one image's detections improving over
training. Each summary shows the image twice, side by side: the ground-truth
boxes on the left, the detections scoring at least `score_threshold` on the
right, both in the class colours of `visualization`.

The picture is the network's input: the evaluation pipeline's normalised,
resized and padded tensor, with the normalisation undone and the padding
cropped off, so no image file is read again. Ground truth comes from the
evaluator's annotations (the evaluation labels carry no boxes), mapped into
that input's pixels as the parser maps them.
"""
from typing import Dict, Mapping, Sequence

import gin
import numpy as np
from pycocotools import coco
import tensorflow as tf

from official.vision.ops import preprocess_ops

from megdet_tf.dataloaders.category_map import CategoryMap
from megdet_tf.evaluation import visualization

_GAP = 4  # White pixels between the two panels.


def network_input_image(image: np.ndarray, image_info: np.ndarray
                        ) -> np.ndarray:
  """The uint8 picture of one preprocessed image, without its padding.

  Args:
    image: [H_pad, W_pad, 3] normalised as `preprocess_ops.normalize_image`
      does (per channel (pixel - MEAN_RGB) / STDDEV_RGB), any float dtype.
    image_info: [4, 2]; row 1 is the scaled (unpadded) size.
  """
  height, width = (int(round(v)) for v in image_info[1])
  pixels = (np.asarray(image[:height, :width], np.float32) *
            preprocess_ops.STDDEV_RGB + preprocess_ops.MEAN_RGB)
  return np.clip(np.round(pixels), 0, 255).astype(np.uint8)


@gin.configurable(denylist=["ground_truth", "category_map", "num_images"])
class EvalImageSummaries:
  """Collects a few evaluation images and writes them as image summaries."""

  def __init__(self, ground_truth: coco.COCO, category_map: CategoryMap,
               num_images: int, score_threshold: float = 0.5):
    """Chooses the images.

    Args:
      ground_truth: the evaluator's annotations.
      category_map: the detector's.
      num_images: how many images to show (0: none).
      score_threshold: detections scoring less are not drawn.
    """
    self._ground_truth = ground_truth
    self._category_map = category_map
    self._score_threshold = score_threshold
    self._wanted = set(sorted(ground_truth.getImgIds())[:num_images])
    self._panels: Dict[int, np.ndarray] = {}

  def add(self, images: Sequence[tf.Tensor], source_ids: Sequence[tf.Tensor],
          predictions: Mapping[str, np.ndarray]):
    """Draws the chosen images of one evaluation batch.

    Args:
      images: this worker's per-replica image batches
        (`strategy.experimental_local_results`).
      source_ids: the matching per-replica `source_id` batches.
      predictions: the batch's detector outputs over all replicas, as the
        COCO evaluator takes them: `source_id`, `image_info`,
        `detection_boxes` (network-input pixels), `detection_classes`
        (class indices), `detection_scores`, `num_detections`.
    """
    local_ids = np.concatenate([np.asarray(s) for s in source_ids])
    if not self._wanted & set(local_ids.tolist()):
      return
    local_images = np.concatenate(
        [np.asarray(tf.cast(i, tf.float32)) for i in images])
    rows = {int(s): b for b, s in enumerate(predictions["source_id"])}
    for image, image_id in zip(local_images, local_ids.tolist()):
      if image_id in self._wanted:
        self._panels[image_id] = self._draw(image, predictions,
                                            rows[image_id])

  def _draw(self, image: np.ndarray, predictions: Mapping[str, np.ndarray],
            row: int) -> np.ndarray:
    image_info = predictions["image_info"][row]
    picture = network_input_image(image, image_info)
    annotations = self._ground_truth.imgToAnns[
        int(predictions["source_id"][row])]
    # COCO [x, y, width, height] in original pixels -> [ymin, xmin, ymax,
    # xmax], then the parser's mapping p * scale - offset into the input.
    boxes = np.array([[y, x, y + h, x + w] for x, y, w, h in
                      (a["bbox"] for a in annotations)],
                     np.float32).reshape([-1, 4])
    scale = np.tile(image_info[2], 2)
    offset = np.tile(image_info[3], 2)
    truth = visualization.draw_detections(
        picture, boxes * scale - offset,
        np.array([a["category_id"] for a in annotations], np.int64),
        self._category_map)

    count = int(predictions["num_detections"][row])
    scores = predictions["detection_scores"][row, :count].astype(np.float32)
    keep = scores >= self._score_threshold
    detected = visualization.draw_detections(
        picture, predictions["detection_boxes"][row, :count][keep],
        self._category_map.to_category_id(
            predictions["detection_classes"][row, :count][keep]),
        self._category_map, scores[keep])
    gap = np.full([picture.shape[0], _GAP, 3], 255, np.uint8)
    return np.concatenate([truth, gap, detected], axis=1)

  def write(self, name: str = "eval_images"):
    """Writes one summary per image under `name/<file name>`.

    Call inside `summary_writer.as_default(step=...)`.
    """
    description = ("Left: ground truth. Right: detections with score >= "
                   f"{self._score_threshold:g}.")
    for image_id, panel in sorted(self._panels.items()):
      file_name = self._ground_truth.imgs[image_id].get("file_name",
                                                        str(image_id))
      tf.summary.image(f"{name}/{file_name}", panel[np.newaxis],
                       description=description)
