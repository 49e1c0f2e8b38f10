"""Tests of the SavedModel export for TF Serving.

Fast tests run the serving module of a tiny random detector in process and
the versioned, atomic save on a trivial module. The slow tests share one
export: the session's demo detector (`trained_demo` in tests/conftest.py,
trained by `tools/train.py` on 2 replicas with cross-replica BN until it
detects the shapes of four generated images), exported by
`tools/export_saved_model.py`, then inspected and run by `saved_model_cli`
and by a fresh Python process that imports TensorFlow only.
"""
import io
import json
import os
import shutil
import subprocess
import sys
import types

import megdet_tf  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TF)
import gin
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from official.vision.ops import box_ops
from tensorflow.core.protobuf import saved_model_pb2

from megdet_tf.dataloaders.category_map import CategoryMap
from megdet_tf.dataloaders.detection_parser import DetectionParser
from megdet_tf.dataloaders.input_reader import InputReader
from megdet_tf.modeling import faster_rcnn
from megdet_tf.serving import export_saved_model as export_lib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
EXPORT = os.path.join(REPO, "tools", "export_saved_model.py")
# The console script TensorFlow installs, or the same program as a module.
SAVED_MODEL_CLI = ([shutil.which("saved_model_cli")]
                   if shutil.which("saved_model_cli") else
                   [sys.executable, "-m",
                    "tensorflow.python.tools.saved_model_cli"])
KEYS = ("detection_boxes", "detection_scores", "detection_classes",
        "num_detections")
TIMEOUT = 900


def png(pixels: np.ndarray) -> bytes:
  out = io.BytesIO()
  Image.fromarray(pixels).save(out, format="PNG")
  return out.getvalue()


def run(args, timeout=TIMEOUT):
  return subprocess.run(args, cwd=REPO, capture_output=True, text=True,
                        timeout=timeout, check=False)


def as_numpy(outputs):
  return {k: np.asarray(outputs[k]) for k in KEYS}


# --- Fast: the serving module of a tiny random detector, in process. --------

TINY_CATEGORIES = CategoryMap([2, 5, 9])


@pytest.fixture(scope="module")
def tiny_module(tiny_detector_gin):
  gin.parse_config(tiny_detector_gin)
  try:
    tf.keras.utils.set_random_seed(0)
    model = faster_rcnn.build_faster_rcnn(TINY_CATEGORIES.num_classes)
  finally:
    gin.clear_config()
  parser = DetectionParser(category_map=TINY_CATEGORIES, short_side=64,
                           long_side=64, aug_rand_hflip=False)
  return export_lib.DetectionModule(model, parser)


def random_pixels(height, width, seed):
  return np.random.default_rng(seed).integers(0, 256, (height, width, 3),
                                              np.uint8)


def test_images_of_any_size_share_a_batch(tiny_module):
  pixels = [random_pixels(64, 64, 0), random_pixels(40, 90, 1),
            random_pixels(100, 50, 2)]
  batch = as_numpy(tiny_module.serve_encoded(tf.constant(
      [png(p) for p in pixels])))
  for i, image in enumerate(pixels):
    alone = as_numpy(tiny_module.serve_encoded(tf.constant([png(image)])))
    uint8 = as_numpy(tiny_module.serve_images(tf.constant(image[None])))
    for key in KEYS:
      np.testing.assert_allclose(alone[key][0], batch[key][i], atol=1e-4,
                                 err_msg=key)
      np.testing.assert_allclose(uint8[key][0], batch[key][i], atol=1e-4,
                                 err_msg=key)
    count = int(batch["num_detections"][i])
    assert count > 0  # Random weights give low but non-zero scores.
    assert set(batch["detection_classes"][i, :count]) <= {2.0, 5.0, 9.0}
    assert not batch["detection_classes"][i, count:].any()
    boxes = batch["detection_boxes"][i, :count]
    assert (boxes >= 0).all() and (boxes <= 1).all()
    assert (boxes[:, 2:] >= boxes[:, :2]).all()


def test_boxes_are_fractions_of_the_input_image(tiny_module):
  small = random_pixels(48, 64, 3)
  # Twice the size, nearest-neighbour: the 2x bilinear downscale in the
  # preprocessing gives the small image back exactly.
  large = small.repeat(2, axis=0).repeat(2, axis=1)
  out = as_numpy(tiny_module.serve_encoded(tf.constant([png(small),
                                                        png(large)])))
  assert out["num_detections"][0] == out["num_detections"][1] > 0
  np.testing.assert_allclose(out["detection_boxes"][0],
                             out["detection_boxes"][1], atol=1e-5)
  np.testing.assert_allclose(out["detection_scores"][0],
                             out["detection_scores"][1], atol=1e-5)


def test_bad_requests_are_errors_and_the_next_request_works(tiny_module):
  image = png(random_pixels(64, 64, 4))
  expected = as_numpy(tiny_module.serve_encoded(tf.constant([image])))
  with pytest.raises(tf.errors.InvalidArgumentError, match="image"):
    tiny_module.serve_encoded(tf.constant([image, b"not an image"]))
  with pytest.raises(tf.errors.InvalidArgumentError, match="no image"):
    tiny_module.serve_encoded(tf.constant([], tf.string))
  with pytest.raises(tf.errors.InvalidArgumentError, match="no image"):
    tiny_module.serve_images(tf.zeros([0, 8, 8, 3], tf.uint8))
  again = as_numpy(tiny_module.serve_encoded(tf.constant([image])))
  for key in KEYS:
    np.testing.assert_array_equal(again[key], expected[key])


# --- Fast: the versioned, atomic save. ---------------------------------------


class _Doubler(tf.Module):
  """A stand-in with the interface `save_versioned` needs."""

  def __init__(self, fail=False):
    super().__init__()
    self.factor = tf.Variable(2.0)
    self._fail = fail

  @tf.function(input_signature=[tf.TensorSpec([None], tf.float32)])
  def double(self, x):
    return {"y": x * self.factor}

  def serving_signatures(self):
    if self._fail:
      raise RuntimeError("disk full")
    return {"serving_default": self.double.get_concrete_function()}


def test_save_versioned_never_overwrites_and_leaves_no_partial_version(
    tmp_path):
  base = str(tmp_path / "models")
  os.makedirs(base)
  path = export_lib.save_versioned(_Doubler(), base, 3)
  assert path == os.path.join(base, "3")
  first = {name: os.path.getmtime(os.path.join(path, name))
           for name in os.listdir(path)}
  with pytest.raises(FileExistsError, match="Version 3 already exists"):
    export_lib.save_versioned(_Doubler(), base, 3)
  assert {name: os.path.getmtime(os.path.join(path, name))
          for name in os.listdir(path)} == first
  with pytest.raises(RuntimeError, match="disk full"):
    export_lib.save_versioned(_Doubler(fail=True), base, 4)
  assert sorted(os.listdir(base)) == ["3"]  # No version 4, no temp dir.
  with pytest.raises(ValueError, match="integer >= 0"):
    export_lib.save_versioned(_Doubler(), base, -1)
  loaded = tf.saved_model.load(path)
  y = loaded.signatures["serving_default"](tf.constant([1.5]))["y"]
  np.testing.assert_allclose(y, [3.0])


def test_checkpoint_paths_and_steps(tmp_path):
  assert export_lib.checkpoint_step("runs/demo/ckpt-2500") == 2500
  with pytest.raises(ValueError, match="pass the version"):
    export_lib.checkpoint_step("runs/demo/best")
  with pytest.raises(FileNotFoundError, match="No checkpoint in directory"):
    export_lib.resolve_checkpoint(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="ckpt-7.index is missing"):
    export_lib.resolve_checkpoint(str(tmp_path / "ckpt-7"))
  checkpoint = tf.train.Checkpoint(v=tf.Variable(1.0))
  prefix = checkpoint.save(str(tmp_path / "ckpt"))
  assert export_lib.resolve_checkpoint(str(tmp_path)) == prefix
  assert export_lib.resolve_checkpoint(prefix) == prefix


# --- Slow: a trained demo detector, exported and served. ---------------------

@pytest.fixture(scope="module")
def exported(trained_demo, tmp_path_factory):
  """The session's trained demo detector (tests/conftest.py), exported."""
  export_dir = str(tmp_path_factory.mktemp("serving") / "export")
  export = run([sys.executable, EXPORT,
                f"--checkpoint_path={trained_demo.model_dir}",
                f"--export_dir={export_dir}"] + trained_demo.gin_flags)
  assert export.returncode == 0, export.stderr[-3000:]
  return types.SimpleNamespace(
      export_dir=export_dir,
      saved_model=os.path.join(export_dir, str(trained_demo.steps)),
      **vars(trained_demo))


def ground_truth(coco, image_index):
  """[(category id, [ymin, xmin, ymax, xmax] as fractions)] of one image."""
  image = coco["images"][image_index]
  size = np.array([image["height"], image["width"]] * 2, np.float32)
  return [(a["category_id"], np.array([y, x, y + h, x + w]) / size)
          for a in coco["annotations"] if a["image_id"] == image["id"]
          for x, y, w, h in [a["bbox"]]]


def iou(a, b):
  """IoU of two [ymin, xmin, ymax, xmax] boxes, by Model Garden's box_ops."""
  overlaps = box_ops.bbox_overlap(np.float32([[a]]), np.float32([[b]]))
  return float(overlaps[0, 0, 0])


def assert_detects(outputs, row, truth, min_score=0.5):
  """Each object found (same id, IoU >= 0.7), nothing confident extra."""
  confident = [(c, box) for c, s, box in zip(
      outputs["detection_classes"][row], outputs["detection_scores"][row],
      outputs["detection_boxes"][row]) if s >= min_score]
  for category, box in truth:
    assert any(c == category and iou(box, b) >= 0.7 for c, b in confident), (
        f"object {category} at {box} missed; detections {confident}")
  for category, box in confident:
    assert any(c == category and iou(box, b) >= 0.5 for c, b in truth), (
        f"false detection {category} at {box}; objects {truth}")


@pytest.mark.slow
def test_saved_model_cli_show_lists_both_signatures(exported):
  shown = run(SAVED_MODEL_CLI + ["show", "--dir", exported.saved_model,
                                 "--all"])
  assert shown.returncode == 0, shown.stderr[-3000:]
  text = shown.stdout
  default, images = (text.split("signature_def['serving_default']")[1],
                     text.split("signature_def['serving_images']")[1])
  default = default.split("signature_def[")[0]
  images = images.split("signature_def[")[0]
  assert "inputs['encoded_images']" in default and "DT_STRING" in default
  assert "inputs['images']" in images and "DT_UINT8" in images
  assert "shape: (-1, -1, -1, 3)" in images
  for signature in (default, images):
    assert "Method name is: tensorflow/serving/predict" in signature
    for key, shape in (("detection_boxes", "(-1, 100, 4)"),
                       ("detection_scores", "(-1, 100)"),
                       ("detection_classes", "(-1, 100)"),
                       ("num_detections", "(-1)")):
      output = signature.split(f"outputs['{key}']")[1]
      assert "dtype: DT_FLOAT" in output.split("outputs[")[0]
      assert f"shape: {shape}" in output.split("outputs[")[0]


@pytest.mark.slow
def test_label_map_names_the_exported_categories(exported):
  categories = export_lib.load_label_map(exported.saved_model)
  assert [{"id": i, "name": categories.name(i)}
          for i in categories.category_ids] == exported.coco["categories"]


@pytest.mark.slow
def test_exported_graph_has_no_collective_op(exported):
  saved_model = saved_model_pb2.SavedModel()
  with open(os.path.join(exported.saved_model, "saved_model.pb"), "rb") as f:
    saved_model.ParseFromString(f.read())
  graph = saved_model.meta_graphs[0].graph_def
  ops = {node.op for node in graph.node}
  for function in graph.library.function:
    ops.update(node.op for node in function.node_def)
  assert {"DecodeImage", "ResizeBilinear", "Conv2D"} <= ops  # All scanned.
  assert not {op for op in ops if op.startswith(("Collective", "Nccl"))}


@pytest.mark.slow
def test_saved_model_cli_runs_both_signatures(exported, tmp_path):
  # A demo image 1.5x the training size, as PNG so both inputs hold the same
  # pixels.
  size = exported.image_size * 3 // 2
  pixels = np.asarray(Image.open(exported.files[0]).resize((size, size),
                                                           Image.BICUBIC))
  encoded, uint8 = str(tmp_path / "encoded.npy"), str(tmp_path / "uint8.npy")
  np.save(encoded, np.array([png(pixels)], dtype=object), allow_pickle=True)
  np.save(uint8, pixels[None])
  results = {}
  for signature, inputs in (("serving_default", f"encoded_images={encoded}"),
                            ("serving_images", f"images={uint8}")):
    outdir = str(tmp_path / signature)
    ran = run(SAVED_MODEL_CLI + [
        "run", "--dir", exported.saved_model, "--tag_set", "serve",
        "--signature_def", signature, "--inputs", inputs, "--outdir", outdir])
    assert ran.returncode == 0, ran.stderr[-3000:]
    results[signature] = {k: np.load(os.path.join(outdir, f"{k}.npy"))
                          for k in KEYS}
  for key in KEYS:
    np.testing.assert_allclose(results["serving_images"][key],
                               results["serving_default"][key], atol=1e-5)
  assert_detects(results["serving_default"], 0,
                 ground_truth(exported.coco, 0))


# A client that knows nothing of megdet_tf: TensorFlow and NumPy only.
CLIENT = """
import json, sys
import numpy as np
import tensorflow as tf

saved_model, files, output = sys.argv[1], sys.argv[2:-1], sys.argv[-1]
model = tf.saved_model.load(saved_model)
default = model.signatures["serving_default"]
encoded = [open(path, "rb").read() for path in files]
results, errors = {}, {}
results["first"] = default(encoded_images=tf.constant(encoded))
for name, bad in (("not_an_image", [encoded[0], b"not an image"]),
                  ("empty", [])):
  try:
    default(encoded_images=tf.constant(bad, tf.string))
  except tf.errors.InvalidArgumentError as e:
    errors[name] = e.message
pixels = tf.stack([tf.io.decode_image(e, channels=3) for e in encoded])
results["uint8"] = model.signatures["serving_images"](images=pixels)
results["again"] = default(encoded_images=tf.constant(encoded))
np.savez(output, **{f"{run}/{key}": value.numpy()
                    for run, outputs in results.items()
                    for key, value in outputs.items()})
print(json.dumps(errors))
"""


def keras_detections(exported):
  """The trained checkpoint in this process, fed by the evaluation reader."""
  gin.add_config_file_search_path(REPO)
  # skip_unknown: tools/train.py's `build_trainer` is not imported here.
  gin.parse_config_files_and_bindings(["gin/demo.gin"], exported.params,
                                      skip_unknown=True)
  try:
    model = export_lib.load_detector(
        export_lib.resolve_checkpoint(exported.model_dir))
    with gin.config_scope("eval"):
      reader = InputReader(is_training=False)
  finally:
    gin.clear_config()
  results = {}
  for images, labels in reader():
    outputs = model.call_with_labels(images, labels, training=False)
    detections = model.detections(outputs, labels["image_info"],
                                  reader.parser.category_map)
    size = np.tile(labels["image_info"][:, 0:1, :].numpy(), [1, 1, 2])
    for i, source_id in enumerate(labels["source_id"].numpy()):
      results[int(source_id)] = {
          "detection_boxes": detections["detection_boxes"][i].numpy() /
                             size[i],
          "detection_scores": detections["detection_scores"][i].numpy(),
          "detection_classes": detections["detection_classes"][i].numpy(),
          "num_detections": detections["num_detections"][i].numpy()}
  return results


@pytest.mark.slow
def test_fresh_process_detects_like_the_keras_model(exported, tmp_path):
  output = str(tmp_path / "client.npz")
  client = run([sys.executable, "-c", CLIENT, exported.saved_model] +
               exported.files + [output])
  assert client.returncode == 0, client.stderr[-3000:]
  errors = json.loads(client.stdout.strip().splitlines()[-1])
  assert "Unknown image file format" in errors["not_an_image"], errors
  assert "The request holds no image" in errors["empty"], errors
  served = np.load(output)
  results = {run_name: {k: served[f"{run_name}/{k}"] for k in KEYS}
             for run_name in ("first", "uint8", "again")}
  for key in KEYS:
    np.testing.assert_array_equal(results["again"][key],
                                  results["first"][key])
    np.testing.assert_allclose(results["uint8"][key], results["first"][key],
                               atol=1e-5)

  reference = keras_detections(exported)
  for row, image in enumerate(exported.coco["images"]):
    expected = reference[image["id"]]
    count = int(expected["num_detections"])
    assert results["first"]["num_detections"][row] == count
    # Same graph, same CPU: float32 round-off only.
    np.testing.assert_allclose(
        results["first"]["detection_boxes"][row, :count],
        expected["detection_boxes"][:count], atol=1e-4)
    np.testing.assert_allclose(
        results["first"]["detection_scores"][row, :count],
        expected["detection_scores"][:count], atol=1e-4)
    np.testing.assert_array_equal(
        results["first"]["detection_classes"][row, :count],
        expected["detection_classes"][:count])
    assert_detects(results["first"], row, ground_truth(exported.coco, row))


@pytest.mark.slow
def test_second_export_of_a_version_fails_and_keeps_the_first(exported):
  def snapshot():
    return {os.path.relpath(os.path.join(d, name), exported.export_dir):
            os.stat(os.path.join(d, name)).st_mtime_ns
            for d, _, names in os.walk(exported.export_dir) for name in names}

  before = snapshot()
  steps = exported.steps
  again = run([sys.executable, EXPORT,
               f"--checkpoint_path={exported.model_dir}/ckpt-{steps}",
               f"--export_dir={exported.export_dir}",
               f"--version={steps}"] + exported.gin_flags)
  assert again.returncode != 0
  assert f"Version {steps} already exists" in again.stderr
  assert snapshot() == before
  assert os.listdir(exported.export_dir) == [str(steps)]
