r"""Writes the shapes demo detection dataset (COCO format) to --output_dir.

  python tools/make_shapes_dataset.py --output_dir /tmp/shapes \
      [--num_train 2000 --num_val 200 --image_size 256 --seed 0]

Prints one line: images and objects per split, seconds and images/min.
"""
import time

from absl import app
from absl import flags

from megdet_tf.dataloaders import shapes_dataset

_OUTPUT_DIR = flags.DEFINE_string("output_dir", None,
                                  "Directory to write the dataset to.")
_NUM_TRAIN = flags.DEFINE_integer("num_train", 2000, "Training images.")
_NUM_VAL = flags.DEFINE_integer("num_val", 200, "Validation images.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 256,
                                   "Side of the square images in pixels.")
_SEED = flags.DEFINE_integer("seed", 0, "Dataset seed.")


def main(argv):
  del argv  # Unused.
  start = time.perf_counter()
  result = shapes_dataset.write_shapes_dataset(
      _OUTPUT_DIR.value, num_train=_NUM_TRAIN.value, num_val=_NUM_VAL.value,
      image_size=_IMAGE_SIZE.value, seed=_SEED.value)
  seconds = time.perf_counter() - start
  images = sum(split["num_images"] for split in result.values())
  splits = ", ".join(
      f"{name} {split['num_images']} images / {split['num_objects']} objects"
      for name, split in result.items())
  print(f"shapes dataset in {_OUTPUT_DIR.value}: {splits}; {seconds:.1f} s "
        f"({images / max(seconds, 1e-9) * 60:.0f} images/min)")


if __name__ == "__main__":
  flags.mark_flag_as_required("output_dir")
  app.run(main)
