r"""Runs a trained detector on image files; writes COCO results and pictures.

  python tools/predict.py --saved_model=exported/demo/476 \
      --images='data/shapes/val/*.jpg' --output_dir=predictions
  python tools/predict.py --gin_file=gin/demo.gin --checkpoint_path=runs/demo \
      --images=data/shapes/val --output_dir=predictions --score_threshold=0.3

The detector is an exported SavedModel (`--saved_model`, category names from
its `assets/label_map.json`) or the Gin files and bindings it was trained with
plus a checkpoint (`--gin_file`, `--gin_param`, `--checkpoint_path`: a prefix
or a model_dir). `--images` (repeatable) is a file, a directory (its
JPEG/PNG/BMP/GIF files) or a glob; images may have any size, grayscale too.

Writes to `--output_dir`:
- `detections.json`: COCO results, one entry per detection scoring at least
  `--score_threshold`: `image_id`, `category_id`, `bbox` [x, y, width, height]
  in the original image's pixels and `score`, which pycocotools'
  `COCO.loadRes` reads, plus `file_name` (relative to the inputs' common
  directory) and `category_name`. `image_id` is the image's 1-based position
  in the sorted list of input files (skipped files keep their numbers); join
  on `file_name` to match an annotations file's ids.
- one annotated PNG per image at the same relative path (`a/b.jpg` ->
  `a/b.png`): boxes, class names and scores in class colours.

A file that cannot be decoded is reported by name and skipped; the run fails
only when no image could be read.
"""
import json
import os
import sys
from typing import Dict, List, Sequence

from absl import app
from absl import flags
from absl import logging
from PIL import Image
import tqdm

import megdet_tf  # noqa: F401  pylint: disable=unused-import  (before TF)
import tensorflow as tf  # pylint: disable=g-bad-import-order
from megdet_tf.evaluation import visualization
from megdet_tf.serving import predictor as predictor_lib
from megdet_tf.training import experiment

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")

experiment.define_gin_flags()
flags.DEFINE_string("saved_model", None, "An exported SavedModel version "
                    "directory (EXPORT_DIR/<version>).")
flags.DEFINE_string("checkpoint_path", None, "With --gin_file: a checkpoint "
                    "prefix (runs/demo/ckpt-476) or a model_dir (its latest).")
flags.DEFINE_multi_string("images", None, "Image file, directory or glob "
                          "(repeatable).")
flags.DEFINE_string("output_dir", None, "Where detections.json and the "
                    "annotated images go.")
flags.DEFINE_float("score_threshold", 0.5, "Detections scoring less are "
                   "dropped.", lower_bound=0.0, upper_bound=1.0)
flags.mark_flags_as_required(["images", "output_dir"])
FLAGS = flags.FLAGS


def list_images(specs: Sequence[str]) -> List[str]:
  """The sorted files named by paths, directories and globs."""
  paths = set()
  for spec in specs:
    if tf.io.gfile.isdir(spec):
      paths.update(os.path.join(spec, name)
                   for name in tf.io.gfile.listdir(spec)
                   if name.lower().endswith(IMAGE_EXTENSIONS))
    else:
      matched = tf.io.gfile.glob(spec)
      if not matched:
        raise FileNotFoundError(f"--images={spec} matches no file")
      paths.update(path for path in matched if not tf.io.gfile.isdir(path))
  if not paths:
    raise FileNotFoundError(f"No image file in --images={list(specs)}")
  return sorted(paths)


def output_names(paths: Sequence[str]) -> Dict[str, str]:
  """Input path -> its name relative to the inputs' common directory."""
  root = os.path.commonpath([os.path.dirname(os.path.abspath(p))
                             for p in paths])
  names = {p: os.path.relpath(os.path.abspath(p), root) for p in paths}
  pictures = {}
  for path, name in names.items():
    picture = os.path.splitext(name)[0] + ".png"
    if picture in pictures:
      raise ValueError(f"{pictures[picture]} and {path} would both be "
                       f"annotated as {picture}; rename one or run them apart")
    pictures[picture] = path
  return names


def build_predictor() -> predictor_lib.Predictor:
  if bool(FLAGS.saved_model) == bool(FLAGS.checkpoint_path):
    raise app.UsageError("Pass either --saved_model, or --gin_file with "
                         "--checkpoint_path")
  if FLAGS.saved_model:
    return predictor_lib.Predictor.from_saved_model(FLAGS.saved_model)
  if not FLAGS.gin_file:
    raise app.UsageError("--checkpoint_path needs the --gin_file (and "
                         "--gin_param) the model was trained with")
  experiment.parse_gin_flags()
  return predictor_lib.Predictor.from_checkpoint(FLAGS.checkpoint_path)


def main(argv):
  del argv
  try:
    paths = list_images(FLAGS.images)
    names = output_names(paths)
    predictor = build_predictor()
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f"ERROR: {e}")
  os.makedirs(FLAGS.output_dir, exist_ok=True)

  images, skipped = [], []
  for image_id, path in enumerate(tqdm.tqdm(paths, unit="image"), start=1):
    try:
      pixels = predictor_lib.read_image(path)
    except ValueError as e:
      logging.warning("Skipped: %s", e)
      skipped.append(path)
      continue
    detections = predictor(pixels, FLAGS.score_threshold)
    images.append((image_id, names[path], detections))
    picture = os.path.join(FLAGS.output_dir,
                           os.path.splitext(names[path])[0] + ".png")
    os.makedirs(os.path.dirname(picture), exist_ok=True)
    Image.fromarray(visualization.draw_detections(
        pixels, detections.boxes, detections.category_ids,
        predictor.category_map, detections.scores)).save(picture)

  results = predictor_lib.coco_results(images, predictor.category_map)
  output = os.path.join(FLAGS.output_dir, "detections.json")
  with open(output, "w") as f:
    json.dump(results, f, indent=1)
  logging.info("%d detections in %d images -> %s", len(results), len(images),
               output)
  if skipped:
    logging.warning("Skipped %d unreadable file(s): %s", len(skipped),
                    ", ".join(skipped))
  if not images:
    sys.exit("ERROR: no image could be read")


if __name__ == "__main__":
  app.run(main)
