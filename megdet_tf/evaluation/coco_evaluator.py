"""COCO box AP of the detector's outputs, computed by pycocotools.

`COCOEvaluator` collects the detector's batched outputs, maps them to the
dataset's terms with `ops.detection_outputs.to_original_image` (original
pixels, category ids), and scores them with pycocotools' `COCOeval` against
the annotations file. Model Garden's evaluator is not reused: it keeps
contiguous indices as category ids, ignores `num_detections` and the crop
offset, and evaluates only the images that received a detection (an image
whose objects were all missed would not lower recall). Here every image
passed to `update` counts.

Metrics are COCOeval's stats as floats in [0, 1]: AP (IoU 0.50:0.95), AP50,
AP75, APs/APm/APl (small < 32^2 px, medium, large > 96^2 px), AR100 (recall
with at most 100 detections per image). A metric with no ground truth to
measure (COCOeval's -1, e.g. APs on a set without small objects) is NaN, and
null in JSON.
"""
import contextlib
import io
import json
import math
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence

from absl import logging
import gin
import numpy as np
from pycocotools import coco
from pycocotools import cocoeval
import tensorflow as tf

from official.vision.ops import box_ops

from megdet_tf.dataloaders import coco_tfrecord
from megdet_tf.dataloaders.category_map import CategoryMap
from megdet_tf.ops import detection_outputs

# Name -> index in COCOeval.stats (summarize() with default parameters).
METRICS = {"AP": 0, "AP50": 1, "AP75": 2, "APs": 3, "APm": 4, "APl": 5,
           "AR100": 8}
PREDICTION_KEYS = ("source_id", "image_info", "detection_boxes",
                   "detection_classes", "detection_scores", "num_detections")


def _quiet():
  """Hides pycocotools' progress prints ("creating index...", "DONE")."""
  return contextlib.redirect_stdout(io.StringIO())


def load_ground_truth(annotations_file: str) -> coco.COCO:
  """Loads a COCO instances json as pycocotools ground truth, clear errors.

  Checks what the converter checks (declared image and category ids,
  [x, y, w, h] boxes) and what COCOeval needs on top, naming the file, the
  annotation and the field: an `area` and an `iscrowd` (else a KeyError deep
  in COCOeval), and an `id` found once (pycocotools would keep one of the
  annotations sharing it, which silently changes AP).
  """
  data = coco_tfrecord.load_annotations(annotations_file)
  coco_tfrecord.index_annotations(data, annotations_file)
  first_index = {}
  for i, ann in enumerate(data["annotations"]):
    ann_id = coco_tfrecord.required_field(ann, "id", f"annotation #{i}",
                                          annotations_file)
    for key in ("area", "iscrowd"):
      coco_tfrecord.required_field(ann, key, f"annotation {ann_id}",
                                   annotations_file)
    if ann_id in first_index:
      raise ValueError(
          f"COCO annotations file {annotations_file}: annotation id {ann_id} "
          f"appears twice in 'annotations' (#{first_index[ann_id]} and #{i}); "
          "COCO evaluation needs distinct ids")
    first_index[ann_id] = i
  ground_truth = coco.COCO()
  ground_truth.dataset = data
  with _quiet():
    ground_truth.createIndex()
  return ground_truth


def _check_detections(ground_truth: coco.COCO, detections: Sequence[Mapping]):
  for i, det in enumerate(detections):
    if not all(k in det for k in ("image_id", "category_id", "bbox", "score")
               ) or len(det["bbox"]) != 4:
      raise ValueError(
          f"detection #{i} {det} is not a COCO box result "
          "{image_id, category_id, bbox: [x, y, width, height], score}")
  unknown_images = {d["image_id"] for d in detections} - set(ground_truth.imgs)
  if unknown_images:
    raise ValueError(
        f"detections refer to {len(unknown_images)} image ids not in the "
        f"annotations file, e.g. {sorted(unknown_images)[:5]}")
  unknown_categories = ({d["category_id"] for d in detections} -
                        set(ground_truth.cats))
  if unknown_categories:
    raise ValueError(
        f"detections use category ids {sorted(unknown_categories)} that the "
        "annotations file does not define (contiguous class indices instead "
        "of category ids?)")


def coco_box_metrics(ground_truth: coco.COCO,
                     detections: Sequence[Mapping[str, Any]],
                     image_ids: Optional[Sequence[int]] = None
                     ) -> Dict[str, float]:
  """Runs COCOeval (bbox), prints its summary table, returns `METRICS`.

  Args:
    ground_truth: from `load_ground_truth`.
    detections: COCO results, dicts with image_id, category_id, bbox
      [x, y, width, height] in original pixels, and score.
    image_ids: the images evaluated; all images of the ground truth if None.

  Returns:
    {name: value} for the names in `METRICS`.
  """
  _check_detections(ground_truth, detections)
  with _quiet():
    if detections:
      results = ground_truth.loadRes([dict(d) for d in detections])
    else:  # loadRes cannot take an empty list.
      results = coco.COCO()
      results.dataset = {"images": ground_truth.dataset["images"],
                         "categories": ground_truth.dataset["categories"],
                         "annotations": []}
      results.createIndex()
    evaluation = cocoeval.COCOeval(ground_truth, results, iouType="bbox")
    if image_ids is not None:
      evaluation.params.imgIds = sorted(image_ids)
    evaluation.evaluate()
    evaluation.accumulate()
  evaluation.summarize()
  return {name: float(evaluation.stats[i]) if evaluation.stats[i] >= 0
          else math.nan for name, i in METRICS.items()}


def metrics_to_json(metrics: Mapping[str, float]) -> str:
  """One-line JSON of the metrics; NaN (undefined) becomes null."""
  return json.dumps({name: None if math.isnan(value) else value
                     for name, value in metrics.items()})


def _to_numpy(value) -> np.ndarray:
  """An array, or the concatenation of per-replica arrays."""
  if isinstance(value, (tuple, list)):
    return np.concatenate([np.asarray(v) for v in value])
  return np.asarray(value)


@gin.configurable
class COCOEvaluator:
  """Accumulates detections over an evaluation pass and scores them."""

  def __init__(self, annotations_file: str = gin.REQUIRED,
               category_map: CategoryMap = gin.REQUIRED):
    """Loads the ground truth and checks it against the category map.

    Args:
      annotations_file: COCO instances json of the evaluated split.
      category_map: the map the detector was trained with; its ids must be
        exactly the file's category ids.
    """
    self.annotations_file = annotations_file
    self.ground_truth = load_ground_truth(annotations_file)
    self.category_map = category_map
    file_ids = set(self.ground_truth.cats)
    map_ids = set(category_map.category_ids)
    if file_ids != map_ids:
      raise ValueError(
          f"Category ids of {annotations_file} and CategoryMap.category_ids "
          f"differ: only in the file {sorted(file_ids - map_ids)}, only in "
          f"the map {sorted(map_ids - file_ids)}. Bind CategoryMap to the "
          "dataset's ids (gin/data/*.gin).")
    self.reset()

  def reset(self):
    self._image_ids = set()
    self._rows = []  # [n, 7] arrays: image_id, x, y, w, h, score, category.

  def update(self, predictions: Mapping[str, Any]):
    """Adds one batch of detector outputs.

    Args:
      predictions: numpy arrays (or tuples of per-replica arrays, or eager
        tensors): `source_id` [B] (the COCO image ids), `image_info` [B, 4, 2],
        `detection_boxes` [B, N, 4] [ymin, xmin, ymax, xmax] in network-input
        pixels, `detection_classes` [B, N] contiguous indices,
        `detection_scores` [B, N], `num_detections` [B]. Images with zero
        detections count in the evaluation.
    """
    missing = [k for k in PREDICTION_KEYS if k not in predictions]
    if missing:
      raise ValueError(f"COCOEvaluator.update: predictions lack {missing}; "
                       f"expected {list(PREDICTION_KEYS)}")
    p = {k: _to_numpy(predictions[k]) for k in PREDICTION_KEYS}
    boxes, category_ids = detection_outputs.to_original_image(
        p["detection_boxes"], p["detection_classes"], p["image_info"],
        self.category_map)
    boxes = box_ops.yxyx_to_xywh(boxes.numpy().astype(np.float64))
    category_ids = category_ids.numpy()
    scores = p["detection_scores"].astype(np.float64)
    for b, source_id in enumerate(p["source_id"]):
      image_id = int(source_id)
      if image_id not in self.ground_truth.imgs:
        raise ValueError(f"COCOEvaluator.update: image id {image_id} is not "
                         f"in {self.annotations_file}")
      if image_id in self._image_ids:
        raise ValueError(f"COCOEvaluator.update: image {image_id} was "
                         "already added in this pass; is the evaluation "
                         "dataset repeated?")
      self._image_ids.add(image_id)
      n = int(p["num_detections"][b])
      self._rows.append(np.concatenate(
          [np.full([n, 1], image_id), boxes[b, :n], scores[b, :n, None],
           category_ids[b, :n, None]], axis=1))

  @property
  def num_images(self) -> int:
    """Images added since the last reset."""
    return len(self._image_ids)

  def detections(self) -> List[Dict[str, Any]]:
    """The accumulated detections in COCO results format."""
    return [{"image_id": int(row[0]), "category_id": int(row[6]),
             "bbox": row[1:5].tolist(), "score": float(row[5])}
            for rows in self._rows for row in rows]

  def write_detections(self, path: str):
    """Writes the COCO results JSON (loadable by pycocotools' loadRes)."""
    directory = os.path.dirname(path)
    if directory:
      tf.io.gfile.makedirs(directory)
    with tf.io.gfile.GFile(path, "w") as f:
      json.dump(self.detections(), f)

  def evaluate(self) -> Dict[str, float]:
    """Scores the images added since the last reset, then resets."""
    if not self._image_ids:
      raise ValueError("COCOEvaluator.evaluate: no image was added by update")
    logging.info("COCO evaluation of %d images against %s",
                 len(self._image_ids), self.annotations_file)
    metrics = coco_box_metrics(self.ground_truth, self.detections(),
                               self._image_ids)
    self.reset()
    return metrics
