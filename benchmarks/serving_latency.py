r"""Latency and throughput of the exported SavedModel on CPU.

Exports each model with random weights (the network's cost does not depend
on their values; the NMS's does, so the output reports `num_detections`,
which is the full 100 per image with these untrained heads), loads the
SavedModel with `tf.saved_model.load` as a server would and times
`serving_default` on JPEG bytes, one request after another. Prints one JSON line per model and batch
size: p50/p95 request latency and images/s (batch / mean latency).

  demo  gin/model/demo.gin, a 256x256 shapes image (gin/data/shapes.gin);
  r50   gin/model/r50_fpn.gin, an 800x1333 image (gin/data/coco.gin; the
        network runs on the evaluation's padded 1344x1344 canvas).

  python benchmarks/serving_latency.py --models=demo,r50 --batch_sizes=1,8
"""
import io
import json
import os
import tempfile
import time

from absl import app
from absl import flags

import megdet_tf  # noqa: F401  pylint: disable=unused-import
import gin
import numpy as np
from PIL import Image
import tensorflow as tf

from megdet_tf.dataloaders import shapes_dataset
from megdet_tf.modeling import faster_rcnn
from megdet_tf.serving import export_saved_model as export_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# model -> (Gin files, image height, image width).
MODELS = {
    "demo": (["gin/data/shapes.gin", "gin/model/demo.gin"], 256, 256),
    "r50": (["gin/data/coco.gin", "gin/model/r50_fpn.gin"], 800, 1333),
}

_MODELS = flags.DEFINE_list("models", ["demo", "r50"], "Models to time.")
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["1", "8"], "Request sizes.")
_SECONDS = flags.DEFINE_float("seconds", 30.0, "Timing budget per setting; "
                              "stops early after --max_requests.")
_MIN_REQUESTS = flags.DEFINE_integer("min_requests", 3, "Requests timed at "
                                     "least, whatever the budget.")
_MAX_REQUESTS = flags.DEFINE_integer("max_requests", 50, "Requests timed at "
                                     "most.")


def _jpeg(height: int, width: int) -> bytes:
  """A generated shapes scene cropped to height x width, as JPEG."""
  side = max(height, width)
  pixels = shapes_dataset.render_example(seed=0, split="benchmark", index=0,
                                         image_size=side).image
  out = io.BytesIO()
  Image.fromarray(pixels[:height, :width]).save(out, format="JPEG",
                                                quality=90)
  return out.getvalue()


def _export(name: str, directory: str) -> str:
  gin_files, _, _ = MODELS[name]
  gin.clear_config()
  gin.add_config_file_search_path(REPO)
  # Only the model and the parser are built; the data files' reader and
  # evaluator bindings are skipped.
  gin.parse_config_files_and_bindings(gin_files, [], skip_unknown=True)
  tf.keras.utils.set_random_seed(0)
  module = export_lib.DetectionModule(
      faster_rcnn.build_faster_rcnn(), export_lib.build_parser())
  return export_lib.save_versioned(module, os.path.join(directory, name), 1)


def _time(signature, encoded: tf.Tensor) -> dict:
  outputs = signature(encoded_images=encoded)  # Warm-up.
  latencies = []
  start = time.perf_counter()
  while len(latencies) < _MAX_REQUESTS.value and (
      len(latencies) < _MIN_REQUESTS.value or
      time.perf_counter() - start < _SECONDS.value):
    begin = time.perf_counter()
    signature(encoded_images=encoded)["num_detections"].numpy()
    latencies.append(time.perf_counter() - begin)
  batch_size = int(encoded.shape[0])
  return {
      "p50_ms": round(1e3 * float(np.percentile(latencies, 50)), 1),
      "p95_ms": round(1e3 * float(np.percentile(latencies, 95)), 1),
      "images_per_second": round(batch_size / float(np.mean(latencies)), 2),
      "requests": len(latencies),
      "num_detections": float(np.mean(outputs["num_detections"])),
  }


def main(argv):
  del argv
  with tempfile.TemporaryDirectory() as directory:
    for name in _MODELS.value:
      _, height, width = MODELS[name]
      path = _export(name, directory)
      signature = tf.saved_model.load(path).signatures["serving_default"]
      image = _jpeg(height, width)
      for batch_size in map(int, _BATCH_SIZES.value):
        print(json.dumps({
            "model": name, "image": f"{height}x{width} JPEG",
            "batch_size": batch_size, "cpu_cores": os.cpu_count(),
            **_time(signature, tf.constant([image] * batch_size))}),
              flush=True)
  # Skips the minutes-long teardown of large graphs (see tf-notes.md).
  os._exit(0)  # pylint: disable=protected-access


if __name__ == "__main__":
  app.run(main)
