"""Exports a trained detector as a SavedModel that TF Serving loads as it is.

Layout: `EXPORT_DIR/<version>/` with a numeric version, the checkpoint's step
by default, as TF Serving expects under a model's base path. A version is
never overwritten, and the SavedModel is written to `EXPORT_DIR/.tmp-...`
(a name TF Serving ignores) and renamed into place, so a crash never leaves a
half-written version that a model server would pick up.

Signatures (method `tensorflow/serving/predict`):
- `serving_default`: `encoded_images`, tf.string [None], JPEG/PNG/BMP/GIF bytes,
  what TF Serving's REST API sends as `{"b64": ...}`; images in one batch may
  differ in size;
- `serving_images`: `images`, uint8 [None, None, None, 3] (one size per batch).

Inside the graph each image gets exactly the evaluation preprocessing
(`DetectionParser.preprocess_image`: normalisation, resize to the configured
short/long side, padding to `padded_size`), and the outputs use the TF Object
Detection API's names and dtypes, for D = the detection generator's
`max_num_detections`:
- `detection_boxes`: float32 [B, D, 4], [ymin, xmin, ymax, xmax] as fractions
  of the input image's height and width (multiply by them for pixels);
- `detection_scores`: float32 [B, D], sorted high to low;
- `detection_classes`: float32 [B, D], the dataset's category ids (COCO ids
  for COCO, not contiguous indices), float as in the TF OD API;
- `num_detections`: float32 [B]; entries past it are zero padding.

The category names travel with the model: `<version>/assets/label_map.json`
holds COCO's `{"categories": [{"id": ..., "name": ...}, ...]}` for the ids in
`detection_classes` (`load_label_map` reads it back).

The model is built from Gin outside any distribution strategy, in float32
(also when it was trained in mixed precision), and called with
`training=False`, so every normalization layer (frozen, per-replica or
cross-replica BN) uses its moving statistics and the graph has no collective
op: it runs on one CPU with plain TensorFlow.
"""
import json
import os
import re
import shutil
import tempfile
from typing import Callable, Dict, Optional

from absl import logging
import gin
import tensorflow as tf

from official.vision.ops import box_ops

from megdet_tf.dataloaders.category_map import CategoryMap
from megdet_tf.dataloaders.detection_parser import DetectionParser
from megdet_tf.modeling import faster_rcnn

SIGNATURE_ENCODED = "serving_default"
SIGNATURE_IMAGES = "serving_images"
LABEL_MAP = "label_map.json"


class DetectionModule(tf.Module):
  """The serving graph: images in, detections in the input image's terms."""

  def __init__(self, model: faster_rcnn.FasterRCNN, parser: DetectionParser):
    super().__init__(name="detection_module")
    self.model = model
    self._parser = parser
    # A SavedModel asset: copied into `assets/` when the module is saved.
    self._label_map_dir = tempfile.TemporaryDirectory()
    label_map = os.path.join(self._label_map_dir.name, LABEL_MAP)
    with open(label_map, "w") as f:
      json.dump({"categories": [
          {"id": i, "name": parser.category_map.name(i)}
          for i in parser.category_map.category_ids]}, f, indent=1)
    self.label_map = tf.saved_model.Asset(label_map)

  @tf.function(input_signature=[
      tf.TensorSpec([None], tf.string, name="encoded_images")])
  def serve_encoded(self, encoded_images: tf.Tensor) -> Dict[str, tf.Tensor]:
    """Detections for a batch of encoded images (any sizes)."""
    return self._detect(encoded_images, lambda encoded: tf.io.decode_image(
        encoded, channels=3, expand_animations=False))

  @tf.function(input_signature=[
      tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")])
  def serve_images(self, images: tf.Tensor) -> Dict[str, tf.Tensor]:
    """Detections for a batch of uint8 RGB images of one size."""
    return self._detect(images, tf.identity)

  def serving_signatures(
      self) -> Dict[str, tf.types.experimental.ConcreteFunction]:
    """The signatures to save, by their SignatureDef keys."""
    return {SIGNATURE_ENCODED: self.serve_encoded.get_concrete_function(),
            SIGNATURE_IMAGES: self.serve_images.get_concrete_function()}

  def _detect(self, inputs: tf.Tensor,
              to_image: Callable[[tf.Tensor], tf.Tensor]
              ) -> Dict[str, tf.Tensor]:
    batch_size = tf.shape(inputs)[0]
    with tf.control_dependencies([tf.debugging.assert_positive(
        batch_size, message="The request holds no image; send at least one")]):
      inputs = tf.identity(inputs)

    def preprocess(x):
      image, image_info = self._parser.preprocess_image(to_image(x))
      return tf.cast(image, tf.float32), image_info

    # Each image is preprocessed on its own, so sizes may differ; all come
    # out padded to the same `padded_size`.
    height, width = self._parser.padded_size
    images, image_info = tf.map_fn(preprocess, inputs, fn_output_signature=(
        tf.TensorSpec([height, width, 3], tf.float32),
        tf.TensorSpec([4, 2], tf.float32)))
    anchor_boxes = {
        level: tf.tile(boxes[tf.newaxis], [batch_size, 1, 1, 1])
        for level, boxes in self._parser.anchor_boxes().items()}
    outputs = self.model.call_with_labels(
        images, {"image_info": image_info, "anchor_boxes": anchor_boxes},
        training=False)
    detections = self.model.detections(outputs, image_info,
                                       self._parser.category_map)
    return {
        "detection_boxes": box_ops.normalize_boxes(
            detections["detection_boxes"], image_info[:, 0:1, :]),
        "detection_scores": tf.cast(detections["detection_scores"],
                                    tf.float32),
        "detection_classes": tf.cast(detections["detection_classes"],
                                     tf.float32),
        "num_detections": tf.cast(detections["num_detections"], tf.float32),
    }


def load_label_map(saved_model_dir: str) -> CategoryMap:
  """The category ids and names of an exported model."""
  path = os.path.join(saved_model_dir, "assets", LABEL_MAP)
  if not tf.io.gfile.exists(path):
    raise FileNotFoundError(
        f"{path} is missing: {saved_model_dir} is not a SavedModel exported "
        "by tools/export_saved_model.py with its label map; re-export it")
  with tf.io.gfile.GFile(path) as f:
    categories = json.load(f)["categories"]
  return CategoryMap([c["id"] for c in categories],
                     [c["name"] for c in categories])


def resolve_checkpoint(checkpoint_path: str) -> str:
  """A checkpoint prefix, or the latest checkpoint of a model directory."""
  if tf.io.gfile.isdir(checkpoint_path):
    latest = tf.train.latest_checkpoint(checkpoint_path)
    if not latest:
      raise FileNotFoundError(f"No checkpoint in directory {checkpoint_path}")
    return latest
  if not tf.io.gfile.exists(checkpoint_path + ".index"):
    raise FileNotFoundError(
        f"No checkpoint {checkpoint_path} ({checkpoint_path}.index is "
        "missing); pass a prefix like runs/demo/ckpt-500 or a model_dir")
  return checkpoint_path


def checkpoint_step(checkpoint_path: str) -> int:
  """The training step of a `DetectorTrainer` checkpoint, `.../ckpt-<step>`."""
  match = re.fullmatch(r".*-(\d+)", checkpoint_path)
  if not match:
    raise ValueError(f"Cannot read a step from the checkpoint name "
                     f"{checkpoint_path}; pass the version explicitly")
  return int(match.group(1))


def load_detector(checkpoint_path: str) -> faster_rcnn.FasterRCNN:
  """Builds the Gin-configured detector on one device and restores it.

  Reads the weights of a `DetectorTrainer` checkpoint
  (`tf.train.Checkpoint(model=..., optimizer=...)`), whatever strategy
  trained it; the optimizer's slots are left out. A config that does not
  match the checkpoint fails here.
  """
  model = faster_rcnn.build_faster_rcnn()
  status = tf.train.Checkpoint(model=model).restore(checkpoint_path)
  status.expect_partial().assert_existing_objects_matched()
  return model


def build_parser() -> DetectionParser:
  """The evaluation parser, configured as `tools/train.py`'s eval reader's."""
  with gin.config_scope("eval"):
    return DetectionParser()


def check_new_version(export_dir: str, version: int) -> str:
  """Returns `export_dir/<version>`; an error if that version exists."""
  path = os.path.join(export_dir, str(version))
  if os.path.exists(path):
    raise FileExistsError(
        f"Version {version} already exists in {export_dir} and is never "
        "overwritten; pass another version (--version) or another export_dir")
  return path


def save_versioned(module: DetectionModule, export_dir: str,
                   version: int) -> str:
  """Saves `module` to `export_dir/<version>` atomically; returns that path."""
  if int(version) != version or version < 0:
    raise ValueError(f"The version must be an integer >= 0, got {version!r}")
  final_dir = check_new_version(export_dir, version)
  tmp_dir = os.path.join(export_dir, f".tmp-{version}-{os.getpid()}")
  shutil.rmtree(tmp_dir, ignore_errors=True)
  try:
    tf.saved_model.save(module, tmp_dir, signatures=module.serving_signatures())
    check_new_version(export_dir, version)
    os.rename(tmp_dir, final_dir)
  finally:
    shutil.rmtree(tmp_dir, ignore_errors=True)
  logging.info("Exported SavedModel version %d to %s", version, final_dir)
  return final_dir


def export_saved_model(checkpoint_path: str, export_dir: str,
                       version: Optional[int] = None) -> str:
  """Exports the checkpoint under the parsed Gin config; returns the path.

  Args:
    checkpoint_path: a checkpoint prefix (`.../ckpt-500`) or a model_dir,
      whose latest checkpoint is exported.
    export_dir: TF Serving's model base path; created if missing.
    version: the version directory; None = the checkpoint's step.
  """
  checkpoint_path = resolve_checkpoint(checkpoint_path)
  if version is None:
    version = checkpoint_step(checkpoint_path)
  check_new_version(export_dir, version)  # Fail before the heavy work.
  os.makedirs(export_dir, exist_ok=True)
  module = DetectionModule(load_detector(checkpoint_path), build_parser())
  return save_versioned(module, export_dir, version)
