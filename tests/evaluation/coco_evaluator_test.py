"""COCOEvaluator and tools/evaluate_detections.py against plain pycocotools."""
import json
import math
import os
import subprocess
import sys

import numpy as np
from pycocotools import coco
from pycocotools import cocoeval
import pytest

from megdet_tf.dataloaders.category_map import CategoryMap
from megdet_tf.evaluation import coco_evaluator

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
_CATEGORY_IDS = [2, 7, 40]  # Non-contiguous, as in COCO.
_HEIGHT, _WIDTH = 240, 320
# Per image: (scale, offset (y, x)) of the network input. Powers of two and
# integer offsets keep the round trip through network coordinates exact.
_RESIZE = {1: (2.0, (0, 0)), 2: (0.5, (0, 0)), 3: (1.0, (7, 3)),
           4: (2.0, (16, 32)), 5: (1.0, (0, 0)), 6: (0.5, (2, 1))}
_NO_DETECTIONS = 4  # Has objects, gets no detection: must lower recall.
_NO_OBJECTS = 5  # Has no objects.
_STATS_INDEX = [0, 1, 2, 3, 4, 5, 8]


@pytest.fixture(scope="module")
def ground_truth_file(tmp_path_factory):
  """Objects of every COCO size range, a crowd region, an empty image."""
  rng = np.random.default_rng(0)
  images, annotations = [], []
  for image_id in _RESIZE:
    images.append({"id": image_id, "file_name": f"{image_id}.jpg",
                   "height": _HEIGHT, "width": _WIDTH})
    if image_id == _NO_OBJECTS:
      continue
    for side in rng.choice([16., 24., 48., 80., 120.], size=5):
      w, h = side * rng.uniform(0.8, 1.25, size=2)
      x, y = rng.uniform(0, _WIDTH - w), rng.uniform(0, _HEIGHT - h)
      annotations.append({
          "id": len(annotations) + 1, "image_id": image_id,
          "category_id": int(rng.choice(_CATEGORY_IDS)),
          "bbox": [float(np.float32(v)) for v in (x, y, w, h)],
          "area": float(w * h), "iscrowd": 0})
  annotations.append({"id": len(annotations) + 1, "image_id": 1,
                      "category_id": 7, "bbox": [0., 0., 100., 60.],
                      "area": 6000., "iscrowd": 1})
  path = tmp_path_factory.mktemp("coco") / "instances_val.json"
  path.write_text(json.dumps({
      "images": images, "annotations": annotations,
      "categories": [{"id": i, "name": f"c{i}"} for i in _CATEGORY_IDS]}))
  return str(path)


def _xyxy(bbox):
  x, y, w, h = bbox
  return np.float32([x, y, x + w, y + h])


def _predictions(image_ids, detections, category_map):
  """Detector-style outputs for `detections` {image_id: [(xyxy, id, score)]}.

  Boxes go to network-input coordinates (p * scale - offset), ids to
  contiguous indices, padded to a common N.
  """
  n = max([len(detections.get(i, [])) for i in image_ids] + [1])
  out = {"source_id": np.array(image_ids),
         "image_info": np.zeros([len(image_ids), 4, 2], np.float32),
         "detection_boxes": np.zeros([len(image_ids), n, 4], np.float32),
         "detection_classes": np.zeros([len(image_ids), n], np.int32),
         "detection_scores": np.zeros([len(image_ids), n], np.float32),
         "num_detections": np.zeros([len(image_ids)], np.int32)}
  for b, image_id in enumerate(image_ids):
    scale, offset = _RESIZE[image_id]
    out["image_info"][b] = [[_HEIGHT, _WIDTH],
                            [_HEIGHT * scale, _WIDTH * scale],
                            [scale, scale], offset]
    dets = detections.get(image_id, [])
    out["num_detections"][b] = len(dets)
    for k, (xyxy, category_id, score) in enumerate(dets):
      x0, y0, x1, y1 = xyxy
      out["detection_boxes"][b, k] = (
          np.float32([y0, x0, y1, x1]) * np.float32(scale) -
          np.float32(offset * 2))
      out["detection_classes"][b, k] = category_map.to_index([category_id])[0]
      out["detection_scores"][b, k] = score
  return out


def _results(detections):
  """The same detections as COCO results, straight from original pixels."""
  return [{"image_id": image_id, "category_id": category_id,
           "bbox": [float(x0), float(y0), float(x1) - float(x0),
                    float(y1) - float(y0)], "score": float(np.float32(score))}
          for image_id, dets in detections.items()
          for (x0, y0, x1, y1), category_id, score in dets]


def _pycocotools(ground_truth_file, results, image_ids):
  gt = coco.COCO(ground_truth_file)
  evaluation = cocoeval.COCOeval(gt, gt.loadRes(results), iouType="bbox")
  evaluation.params.imgIds = sorted(image_ids)
  evaluation.evaluate()
  evaluation.accumulate()
  evaluation.summarize()
  return evaluation.stats[_STATS_INDEX]


def _perturbed(ground_truth_file):
  """Jittered, partly dropped, partly misclassified detections + clutter."""
  rng = np.random.default_rng(1)
  with open(ground_truth_file) as f:
    annotations = json.load(f)["annotations"]
  detections = {}
  for ann in annotations:
    if ann["iscrowd"] or ann["image_id"] == _NO_DETECTIONS:
      continue
    if rng.uniform() < 0.2:
      continue
    x, y, w, h = ann["bbox"]
    jitter = rng.normal(0, 0.08, 4) * [w, h, w, h]
    xyxy = np.clip(np.float32([x, y, x + w, y + h]) + jitter,
                   0, [_WIDTH, _HEIGHT, _WIDTH, _HEIGHT]).astype(np.float32)
    category_id = ann["category_id"]
    if rng.uniform() < 0.15:
      category_id = int(rng.choice([c for c in _CATEGORY_IDS
                                    if c != category_id]))
    detections.setdefault(ann["image_id"], []).append(
        (xyxy, category_id, rng.uniform(0.3, 1.0)))
  for image_id in (2, _NO_OBJECTS):  # False positives.
    detections.setdefault(image_id, []).append(
        (np.float32([10, 20, 60, 90]), 40, 0.9))
  return detections


def test_ground_truth_as_detections_gives_perfect_scores(ground_truth_file):
  category_map = CategoryMap(_CATEGORY_IDS)
  evaluator = coco_evaluator.COCOEvaluator(ground_truth_file, category_map)
  with open(ground_truth_file) as f:
    annotations = json.load(f)["annotations"]
  detections = {}
  for ann in annotations:
    if not ann["iscrowd"]:
      detections.setdefault(ann["image_id"], []).append(
          (_xyxy(ann["bbox"]), ann["category_id"], 1.0))
  evaluator.update(_predictions(list(_RESIZE), detections, category_map))
  metrics = evaluator.evaluate()
  assert metrics == {name: 1.0 for name in coco_evaluator.METRICS}


def test_perturbed_detections_match_pycocotools(ground_truth_file, tmp_path):
  category_map = CategoryMap(_CATEGORY_IDS)
  evaluator = coco_evaluator.COCOEvaluator(ground_truth_file, category_map)
  detections = _perturbed(ground_truth_file)
  # Two batches; the second as per-replica parts, as a strategy returns them.
  evaluator.update(_predictions([1, 2, 3], detections, category_map))
  replicas = [_predictions(ids, detections, category_map)
              for ids in ([4, 5], [6])]
  n = max(r["detection_boxes"].shape[1] for r in replicas)
  for r in replicas:  # Replicas agree on N.
    for key in ("detection_boxes", "detection_classes", "detection_scores"):
      pad = [(0, 0), (0, n - r[key].shape[1])] + [(0, 0)] * (r[key].ndim - 2)
      r[key] = np.pad(r[key], pad)
  evaluator.update({k: tuple(r[k] for r in replicas) for k in replicas[0]})

  path = str(tmp_path / "out" / "detections.json")
  evaluator.write_detections(path)
  metrics = evaluator.evaluate()

  results = _results(detections)
  with open(path) as f:
    written = json.load(f)
  key = lambda d: (d["image_id"], d["score"], d["bbox"])
  assert sorted(written, key=key) == sorted(results, key=key)
  want = _pycocotools(ground_truth_file, results, list(_RESIZE))
  assert list(metrics) == list(coco_evaluator.METRICS)
  assert list(metrics.values()) == list(want)
  assert all(0 < v < 1 for v in metrics.values())
  # The image without detections counts: leaving it out scores higher.
  without = _pycocotools(ground_truth_file, results, list(detections))
  assert without[-1] > metrics["AR100"]
  # evaluate() reset the state.
  with pytest.raises(ValueError, match="no image was added"):
    evaluator.evaluate()


def test_category_ids_must_match_the_file(ground_truth_file):
  with pytest.raises(ValueError, match=r"only in the file \[40\], only in "
                     r"the map \[41\]"):
    coco_evaluator.COCOEvaluator(ground_truth_file, CategoryMap([2, 7, 41]))
  with pytest.raises(FileNotFoundError, match="missing.json"):
    coco_evaluator.COCOEvaluator(ground_truth_file + ".missing.json",
                                 CategoryMap(_CATEGORY_IDS))


def _pop(key):
  return lambda anns: anns[3].pop(key)


@pytest.mark.parametrize("change, message", [
    (_pop("area"), "annotation 4 has no 'area' field"),
    (_pop("iscrowd"), "annotation 4 has no 'iscrowd' field"),
    (_pop("id"), "annotation #3 has no 'id' field"),
    (lambda anns: anns[3].update(id=2),
     r"annotation id 2 appears twice in 'annotations' \(#1 and #3\)"),
], ids=["no_area", "no_iscrowd", "no_id", "duplicate_id"])
def test_annotations_that_would_break_or_change_ap_are_named(
    ground_truth_file, tmp_path, change, message):
  with open(ground_truth_file) as f:
    data = json.load(f)
  change(data["annotations"])
  path = tmp_path / "instances_val.json"
  path.write_text(json.dumps(data))
  with pytest.raises(ValueError, match=f"{path}: {message}"):
    coco_evaluator.COCOEvaluator(str(path), CategoryMap(_CATEGORY_IDS))


def test_bad_updates_and_results(ground_truth_file):
  category_map = CategoryMap(_CATEGORY_IDS)
  evaluator = coco_evaluator.COCOEvaluator(ground_truth_file, category_map)
  evaluator.update(_predictions([1], {}, category_map))
  with pytest.raises(ValueError, match="image 1 was already added"):
    evaluator.update(_predictions([1], {}, category_map))
  predictions = _predictions([2], {}, category_map)
  predictions["source_id"] = np.array([99])
  with pytest.raises(ValueError, match="image id 99 is not in"):
    evaluator.update(predictions)
  del predictions["image_info"]
  with pytest.raises(ValueError, match="lack.*image_info"):
    evaluator.update(predictions)
  # Contiguous indices written where category ids belong.
  with pytest.raises(ValueError, match=r"category ids \[1\]"):
    coco_evaluator.coco_box_metrics(
        coco_evaluator.load_ground_truth(ground_truth_file),
        [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5],
          "score": 0.5}])


def test_cli_prints_metrics_json_last(ground_truth_file, tmp_path):
  results = _results(_perturbed(ground_truth_file))
  path = tmp_path / "detections.json"
  path.write_text(json.dumps(results))
  output = subprocess.run(
      [sys.executable, os.path.join(_REPO, "tools", "evaluate_detections.py"),
       f"--annotations_file={ground_truth_file}",
       f"--detections_file={path}"],
      capture_output=True, text=True, check=True).stdout
  assert "Average Precision  (AP) @[ IoU=0.50:0.95" in output
  metrics = json.loads(output.strip().splitlines()[-1])
  assert list(metrics) == ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR100"]
  # The CLI evaluates every image of the annotations file.
  want = _pycocotools(ground_truth_file, results, list(_RESIZE))
  assert list(metrics.values()) == list(want)
  assert all(0 <= v <= 1 for v in metrics.values())


def test_undefined_metrics_are_nan_and_null(ground_truth_file):
  ground_truth = coco_evaluator.load_ground_truth(ground_truth_file)
  # Only image 5, which has no objects: nothing to measure.
  metrics = coco_evaluator.coco_box_metrics(ground_truth, [], [_NO_OBJECTS])
  assert all(math.isnan(v) for v in metrics.values())
  assert json.loads(coco_evaluator.metrics_to_json(metrics)) == {
      name: None for name in coco_evaluator.METRICS}
