r"""Training step time of our Faster R-CNN against Model Garden's own.

  python benchmarks/detector_step.py [--image_size 256] [--batch 2] [--steps 10]

Both detectors are the paper's R50-FPN (anchors 8 x stride, 2000 training
proposals per image, 512 RoIs, a 2fc-1024 box head, per-replica BN in training
mode, nothing frozen), float32, one CPU replica, on the same generated shapes
TFRecords at the same resolution and batch, each through its own input
pipeline, optimizer step included:

  megdet_tf      `DetectorTrainer` from gin/model/r50_fpn.gin + data/shapes;
  model_garden   `official.vision.tasks.maskrcnn.MaskRCNNTask` from its
                 `fasterrcnn_resnetfpn_coco` experiment, its `train_step`.

Each runs in its own process (one heavy TensorFlow process at a time); the
first `--warmup` steps (tracing) are not timed. One JSON line per detector.
"""
import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

flags.DEFINE_integer("image_size", 256, "Image height and width.")
flags.DEFINE_integer("batch", 2, "Images per step.")
flags.DEFINE_integer("steps", 10, "Timed steps.")
flags.DEFINE_integer("warmup", 2, "Untimed first steps (tracing).")
flags.DEFINE_string("detector", "", "Internal: time one detector.")
flags.DEFINE_string("data_dir", "", "Internal: the shapes dataset.")
FLAGS = flags.FLAGS


def _tfrecords(data_dir, split="train"):
  return os.path.join(data_dir, "tfrecord", f"{split}-*")


def time_megdet_tf(data_dir, model_dir):
  """Seconds per step of `DetectorTrainer` on the R50-FPN config."""
  from megdet_tf.training import experiment  # pylint: disable=g-import-not-at-top
  size = FLAGS.image_size
  experiment.parse_gin(["gin/data/shapes.gin", "gin/model/r50_fpn.gin",
                        "gin/norm/bn.gin", "gin/schedule/linear_scaling.gin"], [
      f"train/InputReader.file_pattern={_tfrecords(data_dir)!r}",
      f"eval/InputReader.file_pattern={_tfrecords(data_dir, 'val')!r}",
      f"train/InputReader.global_batch_size={FLAGS.batch}",
      f"eval/InputReader.global_batch_size={FLAGS.batch}",
      f"GLOBAL_BATCH_SIZE={FLAGS.batch}",
      f"DetectionParser.short_side={size}", f"DetectionParser.long_side={size}",
      "ResNet.freeze_at=0", "load_keras_applications_resnet.path=None",
      "build_strategy.kind='one_device'",
      "DetectorTrainer.steps_per_loop=1",
      f"DetectorTrainer.checkpoint_every_steps={10 ** 6}"])
  trainer = experiment.build_trainer(model_dir)
  trainer.train(max_steps=FLAGS.warmup)
  start = time.perf_counter()
  trainer.train(max_steps=FLAGS.warmup + FLAGS.steps)
  return (time.perf_counter() - start) / FLAGS.steps


def time_model_garden(data_dir):
  """Seconds per step of Model Garden's MaskRCNNTask, masks off."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from official.vision.configs import maskrcnn as maskrcnn_config  # pylint: disable=g-import-not-at-top
  from official.vision.tasks import maskrcnn  # pylint: disable=g-import-not-at-top
  from megdet_tf.dataloaders import shapes_dataset  # pylint: disable=g-import-not-at-top
  config = maskrcnn_config.fasterrcnn_resnetfpn_coco().task
  config.init_checkpoint = None
  model = config.model
  model.num_classes = max(c["id"] for c in shapes_dataset.CATEGORIES) + 1
  model.input_size = [FLAGS.image_size, FLAGS.image_size, 3]
  model.norm_activation.use_sync_bn = False
  model.norm_activation.norm_momentum = 0.9
  model.detection_head.num_convs = 0
  model.detection_head.num_fcs = 2
  model.roi_generator.num_proposals = 2000
  data = config.train_data
  data.input_path = _tfrecords(data_dir)
  data.global_batch_size = FLAGS.batch
  data.dtype = "float32"
  data.shuffle_buffer_size = 100
  data.parser.aug_scale_min = data.parser.aug_scale_max = 1.0
  task = maskrcnn.MaskRCNNTask(config)
  detector = task.build_model()
  optimizer = tf.keras.optimizers.SGD(0.01, momentum=0.9)
  iterator = iter(task.build_inputs(data))

  @tf.function
  def step():
    return task.train_step(next(iterator), detector, optimizer)["loss"]

  for _ in range(FLAGS.warmup):
    step().numpy()
  start = time.perf_counter()
  for _ in range(FLAGS.steps):
    step().numpy()
  return (time.perf_counter() - start) / FLAGS.steps


def measure(detector, data_dir):
  with tempfile.TemporaryDirectory() as model_dir:
    seconds = (time_megdet_tf(data_dir, model_dir) if detector == "megdet_tf"
               else time_model_garden(data_dir))
  return {"benchmark": "detector_step", "detector": detector,
          "model": "R50-FPN Faster R-CNN, float32",
          "image_size": FLAGS.image_size, "batch": FLAGS.batch,
          "steps": FLAGS.steps, "step_seconds": round(seconds, 3),
          "images_per_second": round(FLAGS.batch / seconds, 2)}


def main(argv):
  del argv
  os.chdir(REPO)
  if FLAGS.detector:
    print("RESULT " + json.dumps(measure(FLAGS.detector, FLAGS.data_dir)))
    sys.stdout.flush()
    os._exit(0)  # pylint: disable=protected-access  # Skip graph teardown.
  from megdet_tf.dataloaders import prepare_shapes  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as tmp:
    data_dir = prepare_shapes.prepare_shapes_dataset(
        tmp, num_train=64, num_val=4, image_size=FLAGS.image_size)
    results = {}
    for detector in ("megdet_tf", "model_garden"):
      out = subprocess.run(
          [sys.executable, __file__, f"--detector={detector}",
           f"--data_dir={data_dir}", f"--image_size={FLAGS.image_size}",
           f"--batch={FLAGS.batch}", f"--steps={FLAGS.steps}",
           f"--warmup={FLAGS.warmup}"],
          capture_output=True, text=True, check=True).stdout
      results[detector] = json.loads(out.split("RESULT ")[-1])
    reference = results["model_garden"]["step_seconds"]
    for result in results.values():
      result["ratio_to_model_garden"] = round(
          result["step_seconds"] / reference, 3)
      print(json.dumps(result), flush=True)


if __name__ == "__main__":
  app.run(main)
