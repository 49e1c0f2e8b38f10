r"""Scores a COCO results file against COCO annotations with pycocotools.

  python tools/evaluate_detections.py \
    --annotations_file=data/coco/annotations/instances_val2017.json \
    --detections_file=runs/demo/detections.json

Prints pycocotools' summary table, then one JSON object on the last line:
{"AP": ..., "AP50": ..., "AP75": ..., "APs": ..., "APm": ..., "APl": ...,
"AR100": ...} with values in [0, 1] (null where the annotations hold nothing
to measure, e.g. APs without small objects). Every image of the annotations
file is evaluated, as in the official protocol: a results file cannot say
which images were run, so an image missing from it counts as having no
detections. Detections are COCO results (image_id, category_id, bbox
[x, y, width, height] in original pixels, score), e.g. as written by
`COCOEvaluator.write_detections` or tools/predict.py.
"""
import json
import sys

import megdet_tf  # noqa: F401  (before TensorFlow)

from absl import app
from absl import flags

from megdet_tf.evaluation import coco_evaluator

flags.DEFINE_string("annotations_file", None,
                    "COCO instances json (the ground truth).")
flags.DEFINE_string("detections_file", None,
                    "COCO results json: a list of detections.")
flags.mark_flags_as_required(["annotations_file", "detections_file"])
FLAGS = flags.FLAGS


def _load_detections(path: str):
  try:
    with open(path) as f:
      detections = json.load(f)
  except FileNotFoundError:
    raise FileNotFoundError(f"detections file {path} does not exist") from None
  except json.JSONDecodeError as e:
    raise ValueError(f"detections file {path} is not valid JSON: {e}") from None
  if not isinstance(detections, list):
    raise ValueError(f"detections file {path} must hold a JSON list of "
                     "COCO results")
  return detections


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  try:
    ground_truth = coco_evaluator.load_ground_truth(FLAGS.annotations_file)
    detections = _load_detections(FLAGS.detections_file)
    metrics = coco_evaluator.coco_box_metrics(ground_truth, detections)
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f"evaluate_detections: {e}")
  print(coco_evaluator.metrics_to_json(metrics))


if __name__ == "__main__":
  app.run(main)
