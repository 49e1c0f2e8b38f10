r"""Converts a COCO split (instances json + images) to sharded TFRecords.

  python tools/create_coco_tfrecord.py \
    --image_dir=data/coco/val2017 \
    --annotations_file=data/coco/annotations/instances_val2017.json \
    --output_prefix=data/coco/tfrecords/val --num_shards=8

writes data/coco/tfrecords/val-0000{0..7}-of-00008.tfrecord in Model Garden's
TF Example format and prints a summary. Boxes crossing the image border are
clipped and kept, boxes with no area left are dropped, crowd boxes are kept
and flagged, images without boxes are kept. A missing image file is skipped
and listed in the summary; if none of the images exists it is an error.
Every image is decoded: one that does not (truncated or corrupt) is skipped
and listed too, or with --strict stops the conversion. Shards get their
final names only when the conversion completes.
See megdet_tf/dataloaders/coco_tfrecord.py.
"""
import sys

import megdet_tf  # noqa: F401  (before TensorFlow)

from absl import app
from absl import flags

from megdet_tf.dataloaders import coco_tfrecord

flags.DEFINE_string(
    "image_dir", None,
    "Directory with the split's images (e.g. val2017/). Images of the json "
    "missing here are skipped and listed in the summary.")
flags.DEFINE_string(
    "annotations_file", None,
    "COCO instances json of the split (e.g. instances_val2017.json).")
flags.DEFINE_string(
    "output_prefix", None,
    "Shards are written to PREFIX-00000-of-0000K.tfrecord; directories are "
    "created.")
flags.DEFINE_integer(
    "num_shards", 32,
    "Number of output files. Use at least as many as input workers.")
flags.DEFINE_bool(
    "strict", False,
    "Stop at the first image that does not decode, instead of skipping it "
    "and listing it in the summary.")
flags.mark_flags_as_required(["image_dir", "annotations_file",
                              "output_prefix"])
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  try:
    summary = coco_tfrecord.convert_coco(
        FLAGS.image_dir, FLAGS.annotations_file, FLAGS.output_prefix,
        FLAGS.num_shards, FLAGS.strict)
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f"create_coco_tfrecord: {e}")
  print(summary)


if __name__ == "__main__":
  app.run(main)
