r"""Writes the shapes demo detection dataset (COCO format) to --output_dir.

  python tools/make_shapes_dataset.py --output_dir /tmp/shapes \
      [--num_train 2000 --num_val 200 --image_size 256 --seed 0]

Prints one line: images and objects per split, seconds and images/min.
"""
import time

from absl import app
from absl import flags

from megdet_tf.dataloaders import shapes_dataset

flags.DEFINE_string("output_dir", None, "Directory to write the dataset to.")
flags.DEFINE_integer("num_train", 2000, "Training images.")
flags.DEFINE_integer("num_val", 200, "Validation images.")
flags.DEFINE_integer("image_size", 256, "Side of the square images in pixels.")
flags.DEFINE_integer("seed", 0, "Dataset seed.")
flags.mark_flag_as_required("output_dir")
FLAGS = flags.FLAGS


def main(argv):
  del argv  # Unused.
  start = time.perf_counter()
  result = shapes_dataset.write_shapes_dataset(
      FLAGS.output_dir, num_train=FLAGS.num_train, num_val=FLAGS.num_val,
      image_size=FLAGS.image_size, seed=FLAGS.seed)
  seconds = time.perf_counter() - start
  images = sum(split["num_images"] for split in result.values())
  splits = ", ".join(
      f"{name} {split['num_images']} images / {split['num_objects']} objects"
      for name, split in result.items())
  print(f"shapes dataset in {FLAGS.output_dir}: {splits}; {seconds:.1f} s "
        f"({images / max(seconds, 1e-9) * 60:.0f} images/min)")


if __name__ == "__main__":
  app.run(main)
