"""COCO json -> TFRecord conversion, read back with Model Garden's decoder."""
import glob
import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from megdet_tf.dataloaders import coco_tfrecord
import tensorflow as tf

from official.vision.dataloaders import tf_example_decoder

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))

# Non-contiguous ids, as in COCO.
_CATEGORIES = [{"id": 1, "name": "person"}, {"id": 5, "name": "airplane"},
               {"id": 90, "name": "toothbrush"}]

# file name, id, (height, width), PIL mode, format; annotations as
# (bbox, category, iscrowd) and the boxes expected back, clipped, in pixels
# (x0, y0, x1, y1, category, iscrowd).
_IMAGES = [
    ("rgb.jpg", 11, (30, 40), "RGB", "JPEG",
     [([2, 3, 10, 8], 5, 0),
      ([35, 25, 10, 10], 90, 0),   # crosses right and bottom: clipped
      ([0, 0, 20, 20], 1, 1),      # crowd
      ([45, 5, 5, 5], 5, 0),       # outside the image: dropped
      ([-3, -2, 8, 6], 1, 0)],     # crosses left and top: clipped
     [(2, 3, 12, 11, 5, 0), (35, 25, 40, 30, 90, 0), (0, 0, 20, 20, 1, 1),
      (0, 0, 5, 4, 1, 0)]),
    ("gray.jpg", 7, (25, 20), "L", "JPEG",
     [([5, 5, 0, 4], 5, 0),        # zero width: dropped
      ([1.5, 1, 5.25, 5], 5, 0)],
     [(1.5, 1, 6.75, 6, 5, 0)]),
    ("rgba.png", 3, (12, 16), "RGBA", "PNG",
     [([0, 0, 16, 12], 90, 0)],    # exactly the image: kept unclipped
     [(0, 0, 16, 12, 90, 0)]),
    ("empty.jpg", 20, (10, 10), "RGB", "JPEG", [], []),
    ("photo.tiff", 21, (9, 13), "RGB", "TIFF",  # re-encoded as PNG
     [([1, 2, 3, 4], 1, 0)],
     [(1, 2, 4, 6, 1, 0)]),
]
_MISSING = ("missing.jpg", 30, (10, 10))


def _write_coco(root, images=_IMAGES, missing=_MISSING):
  """Writes images and an instances json; returns (image_dir, json path)."""
  image_dir = os.path.join(root, "images")
  os.makedirs(image_dir, exist_ok=True)
  rng = np.random.default_rng(0)
  coco = {"images": [], "annotations": [], "categories": _CATEGORIES}
  for name, image_id, (h, w), mode, fmt, anns, _ in images:
    pixels = rng.integers(0, 256, (h, w, 3), np.uint8)
    Image.fromarray(pixels).convert(mode).save(
        os.path.join(image_dir, name), format=fmt)
    coco["images"].append(
        {"id": image_id, "file_name": name, "height": h, "width": w})
    for bbox, category, crowd in anns:
      coco["annotations"].append({
          "id": len(coco["annotations"]) + 100, "image_id": image_id,
          "bbox": bbox, "category_id": category, "iscrowd": crowd,
          "area": 0.5 * bbox[2] * bbox[3]})
  if missing:
    name, image_id, (h, w) = missing
    coco["images"].append(
        {"id": image_id, "file_name": name, "height": h, "width": w})
  path = os.path.join(root, "instances.json")
  with open(path, "w") as f:
    json.dump(coco, f)
  return image_dir, path


def _read_shards(prefix):
  decoder = tf_example_decoder.TfExampleDecoder()
  files = sorted(glob.glob(prefix + "-*.tfrecord"))
  return {path: [decoder.decode(record)
                 for record in tf.data.TFRecordDataset(path)]
          for path in files}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("coco"))
  image_dir, annotations = _write_coco(root)
  prefix = os.path.join(root, "records", "train")
  summary = coco_tfrecord.convert_coco(image_dir, annotations, prefix,
                                       num_shards=3)
  return image_dir, summary, _read_shards(prefix)


def test_summary_counts(converted):
  _, summary, shards = converted
  assert summary.images == len(_IMAGES)
  assert summary.boxes == sum(len(image[-1]) for image in _IMAGES) == 7
  assert summary.crowd_boxes == 1
  assert summary.clipped_boxes == 2
  assert summary.dropped_zero_area_boxes == 2
  assert summary.reencoded_images == 1
  assert summary.skipped_images == (_MISSING[0],)
  assert [os.path.basename(p) for p in summary.output_files] == [
      f"train-{i:05d}-of-00003.tfrecord" for i in range(3)]
  assert sorted(shards) == list(summary.output_files)
  assert [len(examples) for examples in shards.values()] == [2, 2, 1]


def test_every_image_once_with_its_boxes(converted):
  image_dir, _, shards = converted
  decoded = {}
  for examples in shards.values():
    for example in examples:
      source_id = int(example["source_id"].numpy())
      assert source_id not in decoded
      decoded[source_id] = example
  assert sorted(decoded) == sorted(image[1] for image in _IMAGES)
  for name, image_id, (h, w), _, fmt, _, expected in _IMAGES:
    example = decoded[image_id]
    assert (int(example["height"]), int(example["width"])) == (h, w)
    want = np.array([[y0 / h, x0 / w, y1 / h, x1 / w]
                     for x0, y0, x1, y1, *_ in expected], np.float32)
    np.testing.assert_array_equal(
        example["groundtruth_boxes"].numpy(), want.reshape(-1, 4))
    np.testing.assert_array_equal(example["groundtruth_classes"].numpy(),
                                  [e[4] for e in expected])
    np.testing.assert_array_equal(example["groundtruth_is_crowd"].numpy(),
                                  [bool(e[5]) for e in expected])
    # The decoder gives 3 channels whatever the stored format. JPEGs are
    # stored as they are (TF and Pillow round differently: compare with TF's
    # decoding of the file); other formats match Pillow's RGB exactly.
    image = example["image"].numpy()
    assert image.shape == (h, w, 3)
    path = os.path.join(image_dir, name)
    if fmt == "JPEG":
      with open(path, "rb") as f:
        reference = tf.io.decode_jpeg(f.read(), channels=3).numpy()
    else:
      reference = np.asarray(Image.open(path).convert("RGB"))
    np.testing.assert_array_equal(image, reference, err_msg=name)


def test_grayscale_decodes_to_equal_channels(converted):
  _, _, shards = converted
  (gray,) = [e for examples in shards.values() for e in examples
             if int(e["source_id"].numpy()) == 7]
  image = gray["image"].numpy()
  np.testing.assert_array_equal(image[..., 0], image[..., 1])
  np.testing.assert_array_equal(image[..., 0], image[..., 2])


def test_missing_annotations_file(tmp_path):
  path = str(tmp_path / "nope.json")
  with pytest.raises(FileNotFoundError, match="nope.json"):
    coco_tfrecord.convert_coco(str(tmp_path), path, str(tmp_path / "o"), 1)


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    (json.dumps({"categories": [], "annotations": []}), "'images'"),
    (json.dumps({"images": [{"id": 1, "file_name": "a.jpg", "height": 2}],
                 "categories": []}), "image 1 has no 'width'"),
])
def test_invalid_annotations_file(tmp_path, content, message):
  path = tmp_path / "bad.json"
  path.write_text(content)
  with pytest.raises(ValueError, match=message) as error:
    coco_tfrecord.convert_coco(str(tmp_path), str(path), str(tmp_path / "o"))
  assert "bad.json" in str(error.value)


@pytest.mark.parametrize("field, value, message", [
    ("category_id", 2, "annotation 100 has category_id 2,"),
    ("image_id", 99, "annotation 100 refers to image id 99"),
    ("category_id", "cat", "annotation 100 has category_id 'cat'; expected "
     "an integer id"),
    ("image_id", None, "annotation 100 has image_id None; expected"),
    ("bbox", [0, 0, "4", 4], r"annotation 100 has bbox \[0, 0, '4', 4\]"),
])
def test_bad_fields_in_annotations(tmp_path, field, value, message):
  image_dir, path = _write_coco(str(tmp_path), _IMAGES[:1], None)
  with open(path) as f:
    coco = json.load(f)
  coco["annotations"][0][field] = value
  with open(path, "w") as f:
    json.dump(coco, f)
  with pytest.raises(ValueError, match=message):
    coco_tfrecord.convert_coco(image_dir, path, str(tmp_path / "o"))


@pytest.mark.parametrize("key", ["images", "categories", "annotations"])
def test_entry_that_is_not_an_object(tmp_path, key):
  image_dir, path = _write_coco(str(tmp_path), _IMAGES[:1], None)
  with open(path) as f:
    coco = json.load(f)
  coco[key].append([1, 2])
  with open(path, "w") as f:
    json.dump(coco, f)
  index = len(coco[key]) - 1
  message = rf"{path}: {key}\[{index}\] is \[1, 2\], not an object"
  with pytest.raises(ValueError, match=message):
    coco_tfrecord.convert_coco(image_dir, path, str(tmp_path / "o"))


def test_wrong_image_dir_size_or_content(tmp_path):
  image_dir, path = _write_coco(str(tmp_path), _IMAGES[:2], None)
  with pytest.raises(FileNotFoundError, match="image_dir"):
    coco_tfrecord.convert_coco(str(tmp_path), path, str(tmp_path / "o"))
  with open(path) as f:
    coco = json.load(f)
  coco["images"][1]["width"] += 1
  with open(path, "w") as f:
    json.dump(coco, f)
  with pytest.raises(ValueError, match="gray.jpg is 20x25 pixels"):
    coco_tfrecord.convert_coco(image_dir, path, str(tmp_path / "o"))
  with open(os.path.join(image_dir, "gray.jpg"), "wb") as f:
    f.write(b"not an image")
  with pytest.raises(ValueError, match="gray.jpg is not a readable image"):
    coco_tfrecord.convert_coco(image_dir, path, str(tmp_path / "o"),
                               strict=True)


def test_truncated_image_is_skipped_and_listed_or_fails_strict(tmp_path):
  image_dir, path = _write_coco(str(tmp_path), _IMAGES[:3], None)
  with open(os.path.join(image_dir, "rgb.jpg"), "rb") as f:
    encoded = f.read()
  with open(os.path.join(image_dir, "rgb.jpg"), "wb") as f:
    f.write(encoded[:len(encoded) // 2])  # The header reads, the pixels don't.
  prefix = str(tmp_path / "o" / "train")
  summary = coco_tfrecord.convert_coco(image_dir, path, prefix, 2)
  assert summary.corrupt_images == ("rgb.jpg",)
  assert summary.images == 2
  assert "rgb.jpg" in str(summary)
  assert sorted(int(e["source_id"].numpy())
                for examples in _read_shards(prefix).values()
                for e in examples) == [3, 7]
  with pytest.raises(ValueError, match="rgb.jpg does not decode"):
    coco_tfrecord.convert_coco(image_dir, path, prefix, 2, strict=True)


def test_interrupted_conversion_leaves_no_final_shard(tmp_path):
  image_dir, path = _write_coco(str(tmp_path), _IMAGES[:3], None)
  with open(path) as f:
    coco = json.load(f)
  coco["images"][2]["width"] += 1  # Fails after two images are written.
  with open(path, "w") as f:
    json.dump(coco, f)
  output_dir = tmp_path / "o"
  with pytest.raises(ValueError, match="rgba.png is 16x12 pixels"):
    coco_tfrecord.convert_coco(image_dir, path, str(output_dir / "train"), 2)
  assert os.listdir(output_dir) == []
  coco["images"][2]["width"] -= 1
  with open(path, "w") as f:
    json.dump(coco, f)
  coco_tfrecord.convert_coco(image_dir, path, str(output_dir / "train"), 2)
  assert sorted(os.listdir(output_dir)) == [
      "train-00000-of-00002.tfrecord", "train-00001-of-00002.tfrecord"]


def test_cli_prints_summary(tmp_path):
  image_dir, path = _write_coco(str(tmp_path))
  prefix = str(tmp_path / "out" / "val")
  result = subprocess.run(
      [sys.executable, os.path.join(_REPO, "tools", "create_coco_tfrecord.py"),
       f"--image_dir={image_dir}", f"--annotations_file={path}",
       f"--output_prefix={prefix}", "--num_shards=2"],
      capture_output=True, text=True, check=True)
  assert "images written:          5" in result.stdout
  assert "missing.jpg" in result.stdout
  assert os.path.exists(prefix + "-00001-of-00002.tfrecord")
  result = subprocess.run(
      [sys.executable, os.path.join(_REPO, "tools", "create_coco_tfrecord.py"),
       f"--image_dir={image_dir}", f"--annotations_file={path}.missing",
       f"--output_prefix={prefix}"], capture_output=True, text=True)
  assert result.returncode != 0
  assert "instances.json.missing does not exist" in result.stderr
  with open(os.path.join(image_dir, "rgb.jpg"), "r+b") as f:
    f.truncate(os.path.getsize(f.name) // 2)
  result = subprocess.run(
      [sys.executable, os.path.join(_REPO, "tools", "create_coco_tfrecord.py"),
       f"--image_dir={image_dir}", f"--annotations_file={path}",
       f"--output_prefix={prefix}", "--strict"],
      capture_output=True, text=True, check=False)
  assert result.returncode != 0
  assert "rgb.jpg does not decode" in result.stderr


@pytest.mark.parametrize("split", ["train", "val"])
def test_shapes_dataset_round_trip(shapes_dataset_dir, tmp_path, split):
  annotations = os.path.join(shapes_dataset_dir, "annotations",
                             f"instances_{split}.json")
  prefix = str(tmp_path / split)
  summary = coco_tfrecord.convert_coco(
      os.path.join(shapes_dataset_dir, split), annotations, prefix, 4)
  with open(annotations) as f:
    coco = json.load(f)
  assert summary.images == len(coco["images"])
  assert summary.boxes == len(coco["annotations"])
  assert summary.skipped_images == ()
  sizes = {image["id"]: (image["width"], image["height"])
           for image in coco["images"]}
  want = {image_id: [] for image_id in sizes}
  for ann in coco["annotations"]:
    x, y, w, h = ann["bbox"]
    width, height = sizes[ann["image_id"]]
    want[ann["image_id"]].append(
        (y / height, x / width, (y + h) / height, (x + w) / width,
         ann["category_id"]))
  got = {}
  for examples in _read_shards(prefix).values():
    for example in examples:
      got[int(example["source_id"].numpy())] = example
  assert sorted(got) == sorted(want)
  for image_id, boxes in want.items():
    example = got[image_id]
    np.testing.assert_array_equal(
        example["groundtruth_boxes"].numpy(),
        np.array([b[:4] for b in boxes], np.float32).reshape(-1, 4))
    np.testing.assert_array_equal(example["groundtruth_classes"].numpy(),
                                  [b[4] for b in boxes])
