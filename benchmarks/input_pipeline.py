r"""Images/s of the training input pipeline (decode, augment, RPN targets).

  python benchmarks/input_pipeline.py [--num_images 400] [--batches 50]

Generates shapes datasets in a temporary directory (256 px for the demo
setting, 640 px like COCO's typical image for the paper's 800x1333 setting),
converts them to TFRecords and times `InputReader` batches after a warm-up.
Prints one JSON line per setting.
"""
import json
import os
import tempfile
import time

from absl import app
from absl import flags

import megdet_tf  # noqa: F401  pylint: disable=unused-import
from megdet_tf.dataloaders import prepare_shapes
from megdet_tf.dataloaders.category_map import CategoryMap
from megdet_tf.dataloaders.detection_parser import DetectionParser
from megdet_tf.dataloaders.input_reader import InputReader
from megdet_tf.dataloaders.shapes_dataset import CATEGORIES

flags.DEFINE_integer("num_images", 400, "Training images per dataset.")
flags.DEFINE_integer("batches", 30, "Timed batches per setting.")
flags.DEFINE_integer("batch_size", 8, "Images per batch.")
FLAGS = flags.FLAGS

# name, generated image size, short side, long side.
SETTINGS = (("demo_256", 256, 256, 256), ("coco_800x1333", 640, 800, 1333))


def measure(data_dir, short_side, long_side):
  parser = DetectionParser(
      category_map=CategoryMap([c["id"] for c in CATEGORIES]),
      short_side=short_side, long_side=long_side)
  reader = InputReader(
      file_pattern=os.path.join(data_dir, "tfrecord", "train-*"),
      global_batch_size=FLAGS.batch_size, parser=parser)
  iterator = iter(reader())
  for _ in range(5):
    next(iterator)
  start = time.perf_counter()
  for _ in range(FLAGS.batches):
    next(iterator)
  return FLAGS.batches * FLAGS.batch_size / (time.perf_counter() - start)


def main(argv):
  del argv
  with tempfile.TemporaryDirectory() as tmp:
    for name, image_size, short_side, long_side in SETTINGS:
      data_dir = prepare_shapes.prepare_shapes_dataset(
          os.path.join(tmp, name), num_train=FLAGS.num_images, num_val=8,
          image_size=image_size)
      print(json.dumps({
          "benchmark": "input_pipeline", "setting": name,
          "image_size": image_size, "short_side": short_side,
          "long_side": long_side, "batch_size": FLAGS.batch_size,
          "cpu_cores": os.cpu_count(),
          "images_per_second": round(measure(data_dir, short_side,
                                             long_side), 1)}), flush=True)


if __name__ == "__main__":
  app.run(main)
