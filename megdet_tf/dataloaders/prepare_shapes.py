"""Makes the demo's shapes dataset ready: generated, converted, in place.

Used by `tools/train.py` (`build_trainer.prepare_data` in `gin/demo.gin`) so that the
demo runs on a fresh machine. Everything is written to `DIR.partial` and
renamed to `DIR` at the end, so an interrupted run never leaves a
half-written dataset that a later run would take for complete.
"""
import os
import shutil

from absl import logging
import gin

from megdet_tf.dataloaders import coco_tfrecord
from megdet_tf.dataloaders import shapes_dataset

SPLITS = ("train", "val")


@gin.configurable
def prepare_shapes_dataset(data_dir: str = "data/shapes",
                           num_train: int = 2000,
                           num_val: int = 200,
                           image_size: int = 256,
                           seed: int = 0,
                           num_shards: int = 4) -> str:
  """Generates and converts the shapes dataset unless `data_dir` has it.

  Layout: `annotations/instances_{train,val}.json`, `{train,val}/*.jpg` and
  `tfrecord/{train,val}-0000i-of-0000n.tfrecord`. Returns `data_dir`.
  """
  if os.path.isdir(os.path.join(data_dir, "tfrecord")):
    return data_dir
  partial = data_dir.rstrip("/") + ".partial"
  shutil.rmtree(partial, ignore_errors=True)
  logging.info("Generating the shapes dataset in %s", data_dir)
  shapes_dataset.write_shapes_dataset(partial, num_train=num_train,
                                      num_val=num_val, image_size=image_size,
                                      seed=seed)
  for split in SPLITS:
    coco_tfrecord.convert_coco(
        image_dir=os.path.join(partial, split),
        annotations_file=os.path.join(partial, "annotations",
                                      f"instances_{split}.json"),
        output_prefix=os.path.join(partial, "tfrecord", split),
        num_shards=num_shards)
  os.makedirs(os.path.dirname(os.path.abspath(data_dir)), exist_ok=True)
  os.rename(partial, data_dir)
  return data_dir
