"""Tests of the predictor on a tiny random detector: pixels, sources, files.

A random detector scores low but gives boxes, which is all the mapping to
original pixels, the agreement of the checkpoint and SavedModel routes and
the results format need. Detection quality is tested with a trained model in
tests/tools/predict_test.py.
"""
import io
import os
import types

import megdet_tf  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TF)
import gin
import numpy as np
from PIL import Image
from pycocotools import coco
import pytest
import tensorflow as tf

from tensorflow.core.protobuf import saved_model_pb2

from megdet_tf.modeling import faster_rcnn
from megdet_tf.serving import export_saved_model as export_lib
from megdet_tf.serving import predictor as predictor_lib

# The dataset side of the tiny detector; its model is `tiny_detector_gin`.
TINY_DATA_GIN = """
    CategoryMap.category_ids = [9, 2, 5]
    CategoryMap.category_names = ['nine', 'two', 'five']
    DetectionParser.short_side = 64
    DetectionParser.long_side = 64
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_detector_gin):
  """A random detector in process, as a checkpoint and as a SavedModel."""
  root = tmp_path_factory.mktemp("predictor")
  gin.parse_config(TINY_DATA_GIN + tiny_detector_gin)
  try:
    tf.keras.utils.set_random_seed(0)
    module = export_lib.DetectionModule(faster_rcnn.build_faster_rcnn(),
                                        export_lib.build_parser())
    tf.train.Checkpoint(model=module.model).save(str(root / "ckpt"))
    from_checkpoint = predictor_lib.Predictor.from_checkpoint(str(root))
  finally:
    gin.clear_config()
  saved_model = export_lib.save_versioned(module, str(root / "export"), 1)
  return types.SimpleNamespace(
      module=module, from_checkpoint=from_checkpoint, saved_model=saved_model,
      from_saved_model=predictor_lib.Predictor.from_saved_model(saved_model))


def random_pixels(height, width, seed):
  return np.random.default_rng(seed).integers(0, 256, (height, width, 3),
                                              np.uint8)


def test_boxes_are_in_the_images_pixels(tiny):
  predictor = predictor_lib.Predictor(tiny.module.serve_images,
                                      tiny.from_saved_model.category_map)
  for height, width in ((64, 64), (30, 90), (120, 50)):
    pixels = random_pixels(height, width, height)
    served = tiny.module.serve_images(tf.constant(pixels[None]))
    count = int(served["num_detections"][0])
    detections = predictor(pixels)
    assert 0 < len(detections.scores) == count
    np.testing.assert_allclose(
        detections.boxes,
        served["detection_boxes"][0, :count].numpy() *
        [height, width, height, width],
        rtol=1e-6)
    assert np.all(detections.boxes[:, 2:] <= [height, width])
    assert np.all(detections.boxes >= 0)
    assert detections.category_ids.dtype == np.int64
    assert set(detections.category_ids) <= {2, 5, 9}
    assert np.all(np.diff(detections.scores) <= 0)  # Highest first.
    # The threshold keeps exactly the detections scoring at least it.
    threshold = float(np.median(detections.scores))
    kept = predictor(pixels, score_threshold=threshold)
    np.testing.assert_array_equal(
        kept.scores, detections.scores[detections.scores >= threshold])
    np.testing.assert_array_equal(
        kept.boxes, detections.boxes[detections.scores >= threshold])


def test_checkpoint_and_saved_model_routes_agree(tiny):
  for predictor in (tiny.from_checkpoint, tiny.from_saved_model):
    assert predictor.category_map.category_ids == (2, 5, 9)
    assert [predictor.category_map.name(i) for i in (2, 5, 9)] == [
        "two", "five", "nine"]
  pixels = random_pixels(48, 72, 7)
  a = tiny.from_checkpoint(pixels)
  b = tiny.from_saved_model(pixels)
  assert len(a.scores) > 0
  np.testing.assert_allclose(a.boxes, b.boxes, atol=1e-3)
  np.testing.assert_allclose(a.scores, b.scores, atol=1e-5)
  np.testing.assert_array_equal(a.category_ids, b.category_ids)


def test_label_map_is_an_asset_of_the_saved_model(tiny, tmp_path):
  saved_model = saved_model_pb2.SavedModel()
  with open(os.path.join(tiny.saved_model, "saved_model.pb"), "rb") as f:
    saved_model.ParseFromString(f.read())
  assert [a.filename for a in saved_model.meta_graphs[0].asset_file_def] == [
      export_lib.LABEL_MAP]
  assert os.path.exists(os.path.join(tiny.saved_model, "assets",
                                     export_lib.LABEL_MAP))
  with pytest.raises(FileNotFoundError, match="label_map.json is missing"):
    export_lib.load_label_map(str(tmp_path))


def encode(pixels, image_format, mode=None):
  out = io.BytesIO()
  Image.fromarray(pixels, mode=mode).save(out, format=image_format)
  return out.getvalue()


def test_read_image_decodes_any_format_to_rgb(tmp_path):
  rgb = random_pixels(20, 30, 1)
  grey = rgb[..., 0]
  files = {"rgb.png": encode(rgb, "PNG"), "grey.png": encode(grey, "PNG"),
           "grey.jpg": encode(grey, "JPEG"),
           "rgba.png": encode(np.dstack([rgb, np.full(grey.shape, 7,
                                                      np.uint8)]), "PNG")}
  for name, data in files.items():
    (tmp_path / name).write_bytes(data)
  np.testing.assert_array_equal(
      predictor_lib.read_image(str(tmp_path / "rgb.png")), rgb)
  np.testing.assert_array_equal(
      predictor_lib.read_image(str(tmp_path / "grey.png")),
      np.repeat(grey[..., None], 3, axis=-1))
  assert predictor_lib.read_image(str(tmp_path / "grey.jpg")).shape == (
      20, 30, 3)
  np.testing.assert_array_equal(
      predictor_lib.read_image(str(tmp_path / "rgba.png")), rgb)


@pytest.mark.parametrize("content", [b"not an image", b"",
                                     encode(random_pixels(20, 30, 2),
                                            "JPEG")[:200]])
def test_read_image_names_a_bad_file(tmp_path, content):
  path = tmp_path / "broken.jpg"
  path.write_bytes(content)
  with pytest.raises(ValueError, match="broken.jpg is not a readable image"):
    predictor_lib.read_image(str(path))
  with pytest.raises(ValueError, match="missing.png is not a readable image"):
    predictor_lib.read_image(str(tmp_path / "missing.png"))


def test_coco_results_load_with_pycocotools(tiny):
  predictor = tiny.from_saved_model
  images = [(1, "a.jpg", predictor(random_pixels(40, 60, 3))),
            (3, "sub/c.png", predictor(random_pixels(64, 32, 4)))]
  results = predictor_lib.coco_results(images, predictor.category_map)
  assert len(results) == sum(len(d.scores) for _, _, d in images) > 0
  first = results[0]
  assert first["file_name"] == "a.jpg" and first["image_id"] == 1
  assert first["category_name"] == predictor.category_map.name(
      first["category_id"])
  x, y, w, h = first["bbox"]
  np.testing.assert_allclose([y, x, y + h, x + w], images[0][2].boxes[0],
                             atol=0.01)

  ground_truth = coco.COCO()
  ground_truth.dataset = {
      "images": [{"id": i, "file_name": name} for i, name, _ in images],
      "categories": [{"id": i, "name": predictor.category_map.name(i)}
                     for i in predictor.category_map.category_ids]}
  ground_truth.createIndex()
  loaded = ground_truth.loadRes(results)
  assert len(loaded.getAnnIds()) == len(results)
  assert loaded.getImgIds() == [1, 3]
