"""Tests for the generated shapes detection dataset."""
import io
import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image
from pycocotools import coco as coco_lib
from pycocotools import cocoeval
import pytest

from megdet_tf.dataloaders import shapes_dataset

_CLI = os.path.join(os.path.dirname(__file__), "..", "..", "tools",
                    "make_shapes_dataset.py")
_SIZE = 256


@pytest.fixture(scope="module")
def examples():
  """200 in-memory images at the default 256 px."""
  return [shapes_dataset.render_example(0, "train", i, _SIZE)
          for i in range(200)]


def _files(root):
  """{relative path: bytes} of every file under root."""
  out = {}
  for directory, _, names in os.walk(root):
    for name in names:
      path = os.path.join(directory, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, root)] = f.read()
  return out


def _load(root, split):
  with open(os.path.join(root, "annotations", f"instances_{split}.json")) as f:
    return json.load(f)


def test_category_ids_have_gaps_and_are_written(shapes_dataset_dir):
  ids = [c["id"] for c in shapes_dataset.CATEGORIES]
  names = [c["name"] for c in shapes_dataset.CATEGORIES]
  assert len(ids) >= 5 and len(set(ids)) == len(ids) == len(set(names))
  assert min(ids) >= 1
  assert sorted(ids) != list(range(min(ids), min(ids) + len(ids)))
  for split in ("train", "val"):
    data = _load(shapes_dataset_dir, split)
    assert data["categories"] == shapes_dataset.CATEGORIES
    assert {a["category_id"] for a in data["annotations"]} <= set(ids)


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
  args = dict(num_train=4, num_val=2, image_size=64)
  for name, seed in (("a", 3), ("b", 3), ("c", 4)):
    shapes_dataset.write_shapes_dataset(str(tmp_path / name), seed=seed,
                                        **args)
  a, b, c = (_files(tmp_path / name) for name in "abc")
  assert len(a) == 4 + 2 + 2
  assert a == b
  assert a.keys() == c.keys()
  assert all(a[path] != c[path] for path in a)


def test_images_do_not_depend_on_split_size(tmp_path, shapes_dataset_dir):
  shapes_dataset.write_shapes_dataset(str(tmp_path / "small"), num_train=2,
                                      num_val=1, image_size=128, seed=0)
  small, big = _files(tmp_path / "small"), _files(shapes_dataset_dir)
  jpegs = [p for p in small if p.endswith(".jpg")]
  assert len(jpegs) == 3
  for path in jpegs:
    assert small[path] == big[path]
  # Splits are independent streams.
  assert big[os.path.join("train", "000001.jpg")] != big[
      os.path.join("val", "000001.jpg")]
  # The written JPEG is the rendered image, up to the pixel noise that JPEG
  # smooths away (compared as 4x4 block means).
  rendered = shapes_dataset.render_example(0, "train", 1, 128).image
  decoded = np.asarray(Image.open(
      io.BytesIO(big[os.path.join("train", "000002.jpg")])))
  assert decoded.shape == rendered.shape
  blocks = lambda x: x.reshape(32, 4, 32, 4, 3).mean(axis=(1, 3))
  assert np.abs(blocks(decoded) - blocks(rendered)).mean() < 3


def test_annotations_are_valid_coco_boxes(shapes_dataset_dir):
  for split, count in (("train", 24), ("val", 8)):
    data = _load(shapes_dataset_dir, split)
    images = {image["id"]: image for image in data["images"]}
    assert len(images) == count
    assert [a["id"] for a in data["annotations"]] == list(
        range(1, len(data["annotations"]) + 1))
    assert data["annotations"]
    for annotation in data["annotations"]:
      image = images[annotation["image_id"]]
      x, y, w, h = annotation["bbox"]
      assert all(isinstance(v, float) for v in annotation["bbox"])
      assert w > 0 and h > 0 and x >= 0 and y >= 0
      assert x + w <= image["width"] and y + h <= image["height"]
      assert 0 < annotation["area"] <= w * h
      assert annotation["iscrowd"] == 0


def test_object_counts_sizes_and_empty_images(examples):
  counts = [len(e.annotations) for e in examples]
  assert 1 <= counts.count(0) <= 0.15 * len(examples)
  assert max(counts) >= 5
  areas = np.array([a["area"] for e in examples for a in e.annotations])
  small, large = areas < 32**2, areas > 96**2
  for share in (small.mean(), (~small & ~large).mean(), large.mean()):
    assert share > 0.05
  used = {a["category_id"] for e in examples for a in e.annotations}
  assert used == {c["id"] for c in shapes_dataset.CATEGORIES}
  for e in examples:
    for x, y, w, h in (a["bbox"] for a in e.annotations):
      assert 0 <= x < x + w <= _SIZE and 0 <= y < y + h <= _SIZE


def test_boxes_enclose_the_drawn_shapes(examples):
  occluded, separated = [], []
  for e in examples:
    distance = np.linalg.norm(e.image.astype(np.float32)[None] -
                              e.colors[:, None, None], axis=-1)
    for annotation, mask, visible, dist in zip(e.annotations, e.masks,
                                               e.visible_masks, distance):
      # The box is the tight box of the full shape, its area the pixel count.
      rows, cols = np.nonzero(mask)
      assert annotation["bbox"] == [cols.min(), rows.min(),
                                    cols.max() + 1 - cols.min(),
                                    rows.max() + 1 - rows.min()]
      assert annotation["area"] == mask.sum()
      # Later objects hide part of it, never more than 60%.
      assert not np.any(visible & ~mask)
      shown = visible.sum() / mask.sum()
      assert shown >= shapes_dataset.MIN_VISIBLE
      occluded.append(shown < 1)
      if visible.sum() < 50:
        continue
      # The image shows the shape's colour where it is visible ...
      assert np.median(dist[visible]) < 40
      # ... and that colour is far more common inside the box than outside.
      x, y, w, h = map(int, annotation["bbox"])
      inside = np.zeros(mask.shape, bool)
      inside[y:y + h, x:x + w] = True
      close = dist < 45
      separated.append(close[inside].mean() > 3 * close[~inside].mean())
  assert 0.02 < np.mean(occluded) < 0.5
  assert np.mean(separated) > 0.95


def test_coco_api_loads_and_scores_ground_truth_perfectly(shapes_dataset_dir):
  for split in ("train", "val"):
    gt = coco_lib.COCO(os.path.join(shapes_dataset_dir, "annotations",
                                    f"instances_{split}.json"))
    assert gt.getCatIds() == sorted(
        c["id"] for c in shapes_dataset.CATEGORIES)
    for image in gt.loadImgs(gt.getImgIds()):
      with Image.open(os.path.join(shapes_dataset_dir, split,
                                   image["file_name"])) as f:
        assert f.size == (image["width"], image["height"]) == (128, 128)
    detections = [{"image_id": a["image_id"], "category_id": a["category_id"],
                   "bbox": a["bbox"], "score": 1.0}
                  for a in gt.loadAnns(gt.getAnnIds())]
    evaluator = cocoeval.COCOeval(gt, gt.loadRes(detections), "bbox")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    assert evaluator.stats[0] == pytest.approx(1.0)


def test_cli_writes_the_same_dataset_as_the_library(tmp_path):
  out = tmp_path / "cli"
  run = subprocess.run(
      [sys.executable, _CLI, f"--output_dir={out}", "--num_train=3",
       "--num_val=2", "--image_size=64", "--seed=1"],
      capture_output=True, text=True, timeout=120, check=False)
  assert run.returncode == 0, run.stderr
  assert "train 3 images" in run.stdout and "val 2 images" in run.stdout
  assert "images/min" in run.stdout
  shapes_dataset.write_shapes_dataset(str(tmp_path / "lib"), num_train=3,
                                      num_val=2, image_size=64, seed=1)
  assert _files(out) == _files(tmp_path / "lib")


def test_cli_requires_output_dir():
  run = subprocess.run([sys.executable, _CLI], capture_output=True, text=True,
                       timeout=120, check=False)
  assert run.returncode != 0
  assert "output_dir" in run.stderr


@pytest.mark.parametrize("kwargs, field", [
    (dict(num_train=-1), "num_train"),
    (dict(image_size=8), "image_size"),
    (dict(seed=-2), "seed"),
    (dict(scale_range=(0.5, 0.2)), "scale_range"),
])
def test_bad_arguments_name_the_field(tmp_path, kwargs, field):
  with pytest.raises(ValueError, match=field):
    shapes_dataset.write_shapes_dataset(str(tmp_path), **kwargs)
