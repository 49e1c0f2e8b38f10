"""Runs a trained detector on image files: detections in original pixels.

Two sources, one computation: an exported SavedModel
(`Predictor.from_saved_model`, category names from its label map) or the Gin
config and a checkpoint (`Predictor.from_checkpoint`, the export's
`DetectionModule` built in process, so no export is needed). Either way the
`serving_images` computation runs, with the evaluation preprocessing inside,
one image per call, so images of any size and aspect ratio need no batching.

Images are decoded as the export's `serving_default` signature decodes them
(`tf.io.decode_image`, 3 channels: grayscale and palette images become RGB,
the first frame of a GIF is taken, EXIF orientation is ignored), so boxes
refer to the pixels TF Serving clients would send.
"""
import dataclasses
from typing import Any, Callable, Dict, List, Mapping, Sequence, Tuple

import numpy as np
import tensorflow as tf

from official.vision.ops import box_ops

from megdet_tf.dataloaders.category_map import CategoryMap
from megdet_tf.serving import export_saved_model as export_lib


@dataclasses.dataclass(frozen=True)
class Detections:
  """The detections of one image, highest score first.

  Attributes:
    boxes: float32 [N, 4] [ymin, xmin, ymax, xmax] in the image's pixels.
    scores: float32 [N].
    category_ids: int64 [N], the dataset's category ids.
  """
  boxes: np.ndarray
  scores: np.ndarray
  category_ids: np.ndarray


def read_image(path: str) -> np.ndarray:
  """Decodes a JPEG/PNG/BMP/GIF file to uint8 RGB [H, W, 3].

  Raises:
    ValueError: naming the file, when it cannot be read or decoded.
  """
  try:
    with tf.io.gfile.GFile(path, "rb") as f:
      encoded = f.read()
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
  except (tf.errors.OpError, OSError) as e:
    message = e.message if isinstance(e, tf.errors.OpError) else str(e)
    raise ValueError(f"{path} is not a readable image: {message}") from None
  if 0 in image.shape[:2]:
    raise ValueError(f"{path} is not a readable image: it has no pixels")
  return image.numpy()


class Predictor:
  """Detects objects in uint8 RGB images of any size."""

  def __init__(self, detect: Callable[[tf.Tensor], Mapping[str, tf.Tensor]],
               category_map: CategoryMap):
    """Wraps a serving function.

    Args:
      detect: uint8 [1, H, W, 3] -> the export's outputs (`detection_boxes`
        as fractions of the image, `detection_scores`, `detection_classes`
        as category ids, `num_detections`).
      category_map: the detector's categories, with their names.
    """
    self._detect = detect
    self.category_map = category_map

  @classmethod
  def from_saved_model(cls, saved_model_dir: str) -> "Predictor":
    """Loads a SavedModel written by `export_saved_model`."""
    category_map = export_lib.load_label_map(saved_model_dir)
    loaded = tf.saved_model.load(saved_model_dir)

    def detect(images):  # Holds `loaded`: a signature holds no variables.
      return loaded.signatures[export_lib.SIGNATURE_IMAGES](images=images)

    return cls(detect, category_map)

  @classmethod
  def from_checkpoint(cls, checkpoint_path: str) -> "Predictor":
    """Builds the Gin-configured detector and restores a checkpoint.

    Args:
      checkpoint_path: a checkpoint prefix or a model_dir (its latest
        checkpoint); the Gin config it was trained with must be parsed.
    """
    parser = export_lib.build_parser()
    module = export_lib.DetectionModule(
        export_lib.load_detector(
            export_lib.resolve_checkpoint(checkpoint_path)), parser)

    def detect(images):  # Holds `module`: a tf.function holds no instance.
      return module.serve_images(images)

    return cls(detect, parser.category_map)

  def __call__(self, image: np.ndarray,
               score_threshold: float = 0.0) -> Detections:
    """Detections scoring at least `score_threshold` in `image`'s pixels."""
    outputs = self._detect(tf.constant(image[np.newaxis], tf.uint8))
    count = int(outputs["num_detections"][0])
    scores = outputs["detection_scores"][0, :count].numpy()
    keep = scores >= score_threshold
    height, width = image.shape[:2]
    boxes = (outputs["detection_boxes"][0, :count].numpy()[keep] *
             np.array([height, width, height, width], np.float32))
    return Detections(
        boxes=boxes, scores=scores[keep],
        category_ids=outputs["detection_classes"][0, :count].numpy()[keep]
        .round().astype(np.int64))


def coco_results(images: Sequence[Tuple[int, str, Detections]],
                 category_map: CategoryMap) -> List[Dict[str, Any]]:
  """Detections in COCO's results format, as pycocotools' `loadRes` reads it.

  Args:
    images: (image id, file name, detections) per image.
    category_map: for the category names.

  Returns:
    One dict per detection: `image_id`, `category_id`, `bbox` [x, y, width,
    height] in original pixels and `score` (what `loadRes` needs), plus
    `file_name` and `category_name` for people reading the file.
  """
  results = []
  for image_id, file_name, detections in images:
    for box, score, category_id in zip(
        box_ops.yxyx_to_xywh(detections.boxes.astype(np.float64)),
        detections.scores, detections.category_ids):
      results.append({
          "image_id": int(image_id),
          "file_name": file_name,
          "category_id": int(category_id),
          "category_name": category_map.name(category_id),
          "bbox": [float(v) for v in box],
          "score": float(score),
      })
  return results
