"""COCO instances json + image directory -> sharded TFRecords.

Writes Model Garden's detection tf.Example format, the one
`official.vision.dataloaders.tf_example_decoder.TfExampleDecoder` reads, with
the feature helpers of `official.vision.data.tfrecord_lib`; shards are named
as `tfrecord_lib.write_tf_record_dataset` names them
(`PREFIX-00000-of-00004.tfrecord`). Per image: `image/encoded`,
`image/source_id` (the COCO image id as a string), `image/height`,
`image/width`, and per object `image/object/bbox/{xmin,xmax,ymin,ymax}`
normalised to [0, 1], `image/object/class/label` (the raw category id; the
input parser maps ids to contiguous indices with `CategoryMap`),
`image/object/class/text`, `image/object/is_crowd`, `image/object/area`.

What real COCO needs and Model Garden's `create_coco_tf_record` gets wrong:
- a box crossing the image border is clipped to the image and kept (Model
  Garden silently drops every box with x + w > width);
- a box with no area left after clipping is dropped and counted;
- crowd boxes are kept with is_crowd = 1 (the parser decides what to do);
- images without annotations are kept (evaluation needs every image).
`create_coco_tf_record` is not imported: importing it defines absl flags
(--image_dir, --num_shards, ...) that collide with any CLI's, and its writer
(`pool.starmap`) keeps every encoded example in memory until the end.

Images: JPEG and PNG bytes are stored unchanged, because the decoder's
`tf.io.decode_image(..., channels=3)` already turns grayscale, palette,
RGBA (alpha dropped), 16-bit and CMYK JPEG/PNG into 3-channel RGB. Other
formats (GIF and WebP decode to 4-D, TIFF not at all) are re-encoded as RGB
PNG, lossless.

Bad input:
- missing or unparsable annotations file, or a missing field: ValueError /
  FileNotFoundError naming the file and the field;
- an annotation whose image id or category id is not declared in the file:
  ValueError naming the annotation (a sign of a corrupt or merged file);
- an image whose size differs from its json entry: ValueError naming the
  file (boxes would be normalised wrongly);
- an image file that does not decode in full (truncated or corrupt): every
  image is decoded once here, because training would otherwise stop on it
  mid-run; it is skipped, listed in `ConversionSummary.corrupt_images` and
  logged, or with `strict` a ValueError naming the file;
- a missing image file: skipped, listed in `ConversionSummary.skipped_images`
  and logged, so one lost file does not stop a day-long conversion; if no
  image at all is found, `image_dir` is wrong and it is an error.

Shards are written as `NAME.partial` and renamed to their final names only
once all are complete, so a conversion that fails or is killed leaves no
final-named shard that training could take for a whole one (one that fails
with an error also removes its partial files).
"""
import collections
import dataclasses
import io
import json
import os
from typing import Any, Dict, List, Mapping, Sequence, Tuple

from absl import logging
from PIL import Image
import tensorflow as tf

from official.vision.data import tfrecord_lib

_PASS_THROUGH_FORMATS = ("JPEG", "PNG")
PARTIAL_SUFFIX = ".partial"  # Of shards still being written.


class CorruptImageError(ValueError):
  """An image file that does not decode in full."""


@dataclasses.dataclass(frozen=True)
class ConversionSummary:
  """What `convert_coco` wrote and what it had to change or leave out."""
  images: int  # examples written, images without boxes included
  boxes: int  # boxes written, crowd boxes included
  crowd_boxes: int
  clipped_boxes: int  # crossed the image border, clipped and kept
  dropped_zero_area_boxes: int  # no area left after clipping
  reencoded_images: int  # formats the decoder can't read, stored as PNG
  skipped_images: Tuple[str, ...]  # file names missing from image_dir
  corrupt_images: Tuple[str, ...]  # file names that do not decode, skipped
  output_files: Tuple[str, ...]

  def __str__(self):
    lines = [f"images written:          {self.images}",
             f"boxes written:           {self.boxes}",
             f"  crowd boxes:           {self.crowd_boxes}",
             f"  clipped to the image:  {self.clipped_boxes}",
             f"zero-area boxes dropped: {self.dropped_zero_area_boxes}",
             f"images re-encoded (PNG): {self.reencoded_images}",
             f"images skipped (missing): {len(self.skipped_images)}"]
    lines += [f"  {name}" for name in self.skipped_images]
    lines.append(f"images skipped (corrupt): {len(self.corrupt_images)}")
    lines += [f"  {name}" for name in self.corrupt_images]
    lines.append(f"output: {len(self.output_files)} shards, "
                 f"{self.output_files[0]} ...")
    return "\n".join(lines)


def required_field(record: Mapping[str, Any], key: str, what: str,
                   path: str):
  """`record[key]`, or a ValueError naming the file, `what` and the key."""
  try:
    return record[key]
  except (KeyError, TypeError):
    raise ValueError(
        f"COCO annotations file {path}: {what} has no '{key}' field") from None


def load_annotations(path: str) -> Dict[str, Any]:
  """Reads a COCO instances json and checks its top-level structure.

  `annotations` may be absent (image-info files such as test-dev's).
  """
  if not tf.io.gfile.exists(path):
    raise FileNotFoundError(f"COCO annotations file {path} does not exist")
  with tf.io.gfile.GFile(path, "r") as f:
    try:
      data = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(
          f"COCO annotations file {path} is not valid JSON: {e}") from None
  if not isinstance(data, dict):
    raise ValueError(f"COCO annotations file {path}: expected a JSON object "
                     "with 'images', 'categories' and 'annotations'")
  data.setdefault("annotations", [])
  for key in ("images", "categories", "annotations"):
    if not isinstance(data.get(key), list):
      raise ValueError(
          f"COCO annotations file {path}: field '{key}' is missing or not a "
          "list; expected the COCO instances format")
  return data


def _objects(data: Dict[str, Any], key: str, path: str):
  """(index, entry) of `data[key]`, each checked to be a JSON object."""
  for i, entry in enumerate(data[key]):
    if not isinstance(entry, dict):
      raise ValueError(
          f"COCO annotations file {path}: {key}[{i}] is {entry!r}, not an "
          "object; expected the COCO instances format")
    yield i, entry


def _id_field(record: Mapping[str, Any], key: str, what: str,
              path: str) -> int:
  """`record[key]` as an integer id, or a ValueError naming file and field."""
  value = required_field(record, key, what, path)
  if isinstance(value, bool) or not isinstance(value, (int, str)) or (
      isinstance(value, str) and not value.strip().isdigit()):
    raise ValueError(f"COCO annotations file {path}: {what} has {key} "
                     f"{value!r}; expected an integer id")
  return int(value)


def index_annotations(data: Dict[str, Any], path: str):
  """Groups annotations by image; rejects ids the file does not declare.

  Returns the images, {image id: its annotations} and {category id: name}.
  """
  category_names = {}
  for _, category in _objects(data, "categories", path):
    category_id = _id_field(category, "id", "a category", path)
    category_names[category_id] = str(category.get("name", ""))
  images = {}
  for _, image in _objects(data, "images", path):
    image_id = _id_field(image, "id", "an image", path)
    what = f"image {image_id}"
    for key in ("file_name", "height", "width"):
      required_field(image, key, what, path)
    if image_id in images:
      raise ValueError(f"COCO annotations file {path}: image id {image_id} "
                       "appears twice in 'images'")
    images[image_id] = image
  by_image = collections.defaultdict(list)
  for i, ann in _objects(data, "annotations", path):
    what = f"annotation {ann.get('id', f'#{i}')}"
    image_id = _id_field(ann, "image_id", what, path)
    category_id = _id_field(ann, "category_id", what, path)
    bbox = required_field(ann, "bbox", what, path)
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool)
        for v in bbox):
      raise ValueError(f"COCO annotations file {path}: {what} has bbox "
                       f"{bbox!r}; expected [x, y, width, height]")
    if image_id not in images:
      raise ValueError(f"COCO annotations file {path}: {what} refers to "
                       f"image id {image_id}, which is not in 'images'")
    if category_id not in category_names:
      raise ValueError(f"COCO annotations file {path}: {what} has "
                       f"category_id {category_id}, which is not in "
                       "'categories'")
    by_image[image_id].append(ann)
  return list(images.values()), by_image, category_names


def _clip_boxes(annotations: Sequence[Mapping[str, Any]], height: int,
                width: int, counts: collections.Counter) -> List[Tuple]:
  """[x, y, w, h] pixel boxes -> clipped (x0, y0, x1, y1, ann) tuples."""
  kept = []
  for ann in annotations:
    x, y, w, h = (float(v) for v in ann["bbox"])
    x0, y0 = max(x, 0.0), max(y, 0.0)
    x1, y1 = min(x + w, float(width)), min(y + h, float(height))
    if x1 <= x0 or y1 <= y0:
      counts["dropped_zero_area_boxes"] += 1
      continue
    if (x0, y0, x1, y1) != (x, y, x + w, y + h):
      counts["clipped_boxes"] += 1
    kept.append((x0, y0, x1, y1, ann))
  return kept


def _read_image(full_path: str, image: Mapping[str, Any],
                counts: collections.Counter) -> Tuple[bytes, str]:
  """Returns bytes the 3-channel decoder reads, and their format.

  Decodes every pixel (Pillow; TensorFlow's decoder can't run here, before
  a strategy configures the devices), so a truncated file fails here and not
  when training reaches it. Raises `CorruptImageError` if it does not decode.
  """
  with tf.io.gfile.GFile(full_path, "rb") as f:
    encoded = f.read()
  try:
    pil = Image.open(io.BytesIO(encoded))
  except OSError as e:
    raise CorruptImageError(
        f"{full_path} is not a readable image: {e}") from None
  with pil:
    if pil.size != (image["width"], image["height"]):
      raise ValueError(
          f"{full_path} is {pil.size[0]}x{pil.size[1]} pixels but its "
          f"annotations entry (image {image['id']}) says "
          f"{image['width']}x{image['height']}")
    try:
      pil.load()
    except (OSError, SyntaxError) as e:
      raise CorruptImageError(f"{full_path} does not decode: {e}") from None
    if pil.format in _PASS_THROUGH_FORMATS:
      return encoded, pil.format.lower()
    out = io.BytesIO()
    pil.convert("RGB").save(out, format="PNG")
  counts["reencoded_images"] += 1
  return out.getvalue(), "png"


def _tf_example(image: Mapping[str, Any], encoded: bytes, image_format: str,
                boxes: Sequence[Tuple], category_names: Mapping[int, str],
                counts: collections.Counter) -> tf.train.Example:
  height, width = int(image["height"]), int(image["width"])
  features = tfrecord_lib.image_info_to_feature_dict(
      height, width, image["file_name"], image["id"], encoded, image_format)
  crowd = [int(ann.get("iscrowd", 0)) for *_, ann in boxes]
  objects = {
      "image/object/bbox/xmin": [b[0] / width for b in boxes],
      "image/object/bbox/ymin": [b[1] / height for b in boxes],
      "image/object/bbox/xmax": [b[2] / width for b in boxes],
      "image/object/bbox/ymax": [b[3] / height for b in boxes],
      # COCO's area is the segment's; without one, the clipped box's.
      "image/object/area": [
          float(ann.get("area", (x1 - x0) * (y1 - y0)))
          for x0, y0, x1, y1, ann in boxes],
  }
  for key, values in objects.items():
    features[key] = tfrecord_lib.convert_to_feature(values, "float_list")
  labels = [int(ann["category_id"]) for *_, ann in boxes]
  features["image/object/class/label"] = tfrecord_lib.convert_to_feature(
      labels, "int64_list")
  features["image/object/class/text"] = tfrecord_lib.convert_to_feature(
      [category_names[i].encode("utf8") for i in labels], "bytes_list")
  features["image/object/is_crowd"] = tfrecord_lib.convert_to_feature(
      crowd, "int64_list")
  counts["images"] += 1
  counts["boxes"] += len(boxes)
  counts["crowd_boxes"] += sum(crowd)
  return tf.train.Example(features=tf.train.Features(feature=features))


def convert_coco(image_dir: str,
                 annotations_file: str,
                 output_prefix: str,
                 num_shards: int = 32,
                 strict: bool = False) -> ConversionSummary:
  """Converts one COCO split to `num_shards` TFRecord files.

  Examples go to the shards round-robin in the json's image order, so shards
  differ in size by at most one example. Runs sequentially: decoding every
  image once to find corrupt files is most of the time, and a process pool
  like Model Garden's would pickle each encoded example back to the writer.

  Args:
    image_dir: directory holding the images' `file_name`s.
    annotations_file: COCO instances json (e.g. instances_val2017.json).
    output_prefix: shards go to `{output_prefix}-%05d-of-%05d.tfrecord`.
    num_shards: number of output files.
    strict: raise on the first image that does not decode, instead of
      skipping it and listing it in the summary.

  Returns:
    The `ConversionSummary`.
  """
  if num_shards < 1:
    raise ValueError(f"num_shards must be positive, got {num_shards}")
  data = load_annotations(annotations_file)
  images, by_image, category_names = index_annotations(data,
                                                       annotations_file)
  del data
  output_dir = os.path.dirname(output_prefix)
  if output_dir:
    tfrecord_lib.check_and_make_dir(output_dir)
  output_files = tuple(f"{output_prefix}-{i:05d}-of-{num_shards:05d}.tfrecord"
                       for i in range(num_shards))
  counts = collections.Counter()
  skipped, corrupt = [], []
  # About ten progress lines whatever the split's size.
  log_every = max(1000, len(images) // 10)
  partial_files = [path + PARTIAL_SUFFIX for path in output_files]
  writers = [tf.io.TFRecordWriter(path) for path in partial_files]
  completed = False
  try:
    for image in images:
      full_path = os.path.join(image_dir, image["file_name"])
      if not tf.io.gfile.exists(full_path):
        logging.warning("Skipping image %s: %s does not exist", image["id"],
                        full_path)
        skipped.append(image["file_name"])
        continue
      try:
        encoded, image_format = _read_image(full_path, image, counts)
      except CorruptImageError as e:
        if strict:
          raise
        logging.warning("Skipping image %s: %s", image["id"], e)
        corrupt.append(image["file_name"])
        continue
      boxes = _clip_boxes(by_image.get(int(image["id"]), ()),
                          image["height"], image["width"], counts)
      example = _tf_example(image, encoded, image_format, boxes,
                            category_names, counts)
      writers[(counts["images"] - 1) % num_shards].write(
          example.SerializeToString())
      if counts["images"] % log_every == 0:
        logging.info("Wrote %d of %d images", counts["images"], len(images))
    if images and len(skipped) == len(images):
      raise FileNotFoundError(
          f"None of the {len(images)} images of {annotations_file} is in "
          f"image_dir {image_dir} (first: {images[0]['file_name']}); is "
          "image_dir the split's image folder?")
    if images and not counts["images"]:
      raise ValueError(
          f"None of the images of {annotations_file} in {image_dir} decodes "
          f"({len(corrupt)} corrupt, first: {corrupt[0]})")
    completed = True
  finally:
    for writer in writers:
      writer.close()
    for partial, path in zip(partial_files, output_files):
      if completed:
        tf.io.gfile.rename(partial, path, overwrite=True)
      else:
        tf.io.gfile.remove(partial)
  return ConversionSummary(
      images=counts["images"], boxes=counts["boxes"],
      crowd_boxes=counts["crowd_boxes"], clipped_boxes=counts["clipped_boxes"],
      dropped_zero_area_boxes=counts["dropped_zero_area_boxes"],
      reencoded_images=counts["reencoded_images"],
      skipped_images=tuple(skipped), corrupt_images=tuple(corrupt),
      output_files=output_files)
