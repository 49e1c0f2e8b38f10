r"""Time of a COCO evaluation the size of val2017: 5000 images x 100 detections.

  python benchmarks/coco_evaluation.py [--images 5000] [--detections 100]

Writes a synthetic COCO-format ground truth (80 categories with COCO's ids,
1-90 with gaps; 640x480 images with 1-15 objects each), then feeds
`COCOEvaluator` detector-shaped batches (boxes in network-input pixels of an
800x1333 resize, contiguous class indices, `--detections` per image: every
object found with a jittered box, the rest random) and times `update` (the
mapping back to original pixels and category ids) and `evaluate`
(pycocotools). One JSON line.
"""
import json
import os
import tempfile
import time

from absl import app
from absl import flags
import numpy as np

import megdet_tf  # noqa: F401  pylint: disable=unused-import
from megdet_tf.dataloaders.category_map import CategoryMap
from megdet_tf.evaluation.coco_evaluator import COCOEvaluator

flags.DEFINE_integer("images", 5000, "Images in the evaluated split.")
flags.DEFINE_integer("detections", 100, "Detections per image.")
flags.DEFINE_integer("batch", 16, "Images per `update` call.")
FLAGS = flags.FLAGS

# COCO's 80 category ids: 1..90 without the 10 unused ones.
COCO_IDS = [i for i in range(1, 91)
            if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]
HEIGHT, WIDTH = 480, 640
SCALE = 800 / HEIGHT  # Short side 800; the long side 1067 fits 1333.


def ground_truth(rng):
  """A COCO instances dict; boxes are [x, y, w, h] in original pixels."""
  images, annotations = [], []
  for image_id in range(1, FLAGS.images + 1):
    images.append({"id": image_id, "height": HEIGHT, "width": WIDTH,
                   "file_name": f"{image_id:012d}.jpg"})
    for _ in range(rng.integers(1, 16)):
      w, h = rng.uniform(8, 300, size=2)
      x, y = rng.uniform(0, WIDTH - w), rng.uniform(0, HEIGHT - h)
      annotations.append({
          "id": len(annotations) + 1, "image_id": image_id,
          "category_id": int(rng.choice(COCO_IDS)), "bbox": [x, y, w, h],
          "area": w * h, "iscrowd": 0})
  return {"images": images, "annotations": annotations,
          "categories": [{"id": i, "name": str(i)} for i in COCO_IDS]}


def batches(coco, category_map, rng):
  """Detector outputs for `FLAGS.batch` images at a time."""
  by_image = {}
  for a in coco["annotations"]:
    by_image.setdefault(a["image_id"], []).append(a)
  n = FLAGS.detections
  image_info = np.array([[HEIGHT, WIDTH], [HEIGHT * SCALE, WIDTH * SCALE],
                         [SCALE, SCALE], [0, 0]], np.float32)
  for start in range(1, FLAGS.images + 1, FLAGS.batch):
    ids = list(range(start, min(start + FLAGS.batch, FLAGS.images + 1)))
    boxes = np.zeros([len(ids), n, 4], np.float32)
    classes = np.zeros([len(ids), n], np.int32)
    for b, image_id in enumerate(ids):
      objects = by_image.get(image_id, [])[:n]
      xywh = rng.uniform(0, 200, size=(n, 4)) + [0, 0, 8, 8]
      xywh[:len(objects)] = [a["bbox"] for a in objects]
      xywh[:len(objects)] += rng.normal(0, 3, size=(len(objects), 4))
      x, y, w, h = np.abs(xywh).T
      boxes[b] = np.stack([y, x, y + h, x + w], axis=1) * SCALE
      classes[b] = rng.integers(1, category_map.num_classes, size=n)
      classes[b, :len(objects)] = [category_map.category_ids.index(
          a["category_id"]) + 1 for a in objects]
    yield {"source_id": np.array(ids), "image_info": np.stack(
        [image_info] * len(ids)), "detection_boxes": boxes,
           "detection_classes": classes,
           "detection_scores": rng.uniform(size=(len(ids), n)).astype(
               np.float32),
           "num_detections": np.full([len(ids)], n, np.int32)}


def main(argv):
  del argv
  rng = np.random.default_rng(0)
  coco = ground_truth(rng)
  category_map = CategoryMap(COCO_IDS)
  with tempfile.TemporaryDirectory() as tmp:
    annotations_file = os.path.join(tmp, "instances_val.json")
    with open(annotations_file, "w") as f:
      json.dump(coco, f)
    evaluator = COCOEvaluator(annotations_file, category_map)
  outputs = list(batches(coco, category_map, rng))
  start = time.perf_counter()
  for predictions in outputs:
    evaluator.update(predictions)
  update_seconds = time.perf_counter() - start
  start = time.perf_counter()
  metrics = evaluator.evaluate()
  evaluate_seconds = time.perf_counter() - start
  print(json.dumps({
      "benchmark": "coco_evaluation", "images": FLAGS.images,
      "detections_per_image": FLAGS.detections,
      "ground_truth_boxes": len(coco["annotations"]),
      "update_seconds": round(update_seconds, 1),
      "evaluate_seconds": round(evaluate_seconds, 1),
      "AP": round(metrics["AP"], 3)}), flush=True)


if __name__ == "__main__":
  app.run(main)
