r"""Training step of our Faster R-CNN against Model Garden's own, same work.

  python benchmarks/detector_step.py [--runs r50_256:float32,demo_256:...]
      [--rounds 3] [--steps 3]

Both detectors are built for the same work: same backbone (ResNet with the
bottleneck stride in the 3x3 conv, Model Garden's layout), FPN, RPN head,
2fc box head, anchors, proposals, RoI sampling, resolution and batch, per-
replica BN in training mode, nothing frozen, one CPU replica, each with its
own input pipeline on the same generated shapes TFRecords, optimizer step
included (benchmarks/detector_step_floor.py counts both steps' multiply-adds:
equal to 0.3%):

  megdet_tf      `DetectorTrainer` from gin/model/{r50_fpn,demo}.gin;
  model_garden   `official.vision.tasks.maskrcnn.MaskRCNNTask` from its
                 `fasterrcnn_resnetfpn_coco` experiment (masks off), its
                 `train_step`, configured to the same model.

Same results by other kernels: our RoI generator runs NMS with TensorFlow's
`CombinedNonMaxSuppression` on each level's top-k candidates, Model Garden's
with its padded NMS loop: the same proposals (tests/modeling/layers/
roi_generator_test.py). Model Garden's own batched option is not the same
work (it refills what NMS removed with lower-ranked anchors) and fails under
mixed_bfloat16 (bfloat16 scores reach the float32-only kernel). Both SGDs do
the same update in one fused kernel per variable: ours `MomentumSGD`, Model
Garden's the legacy Keras SGD its optimizer factory builds by default. Our
1x1 convs are matmuls (megdet_tf/modeling/layers/conv2d.py).

Not quite the same: Model Garden's FPN, RPN head and 2fc head always add a BN
(one per FPN level, one per RPN level, one after each fc); ours do with
`FPN.use_norm`, `RPNHead.use_norm` and `BoxHead.fc_norm`, on in the demo
model and off in R50-FPN (Detectron's layout), where Model Garden thus runs
12 more, small, BN layers than we do. The demo setting runs in float32, the
demo's precision.

Each run (setting:precision) is its own process, which builds both,
warms both up (tracing), then alternates timed rounds of `--steps` steps
(ours, theirs, ours, ...). Per pair of rounds, ratio = Model Garden time /
ours; a JSON line per setting gives the medians, and `step_peak_mib`, the
most memory TensorFlow's CPU allocator held during a detector's rounds above
what it held before them: activations, gradients and temporaries (weights,
optimizer slots and the other detector are already allocated). The last line
is `speedup_vs_model_garden: X`, the median ratio for R50-FPN at 256 px,
batch 2, under `mixed_bfloat16`. benchmarks/recompute_memory.py measures our
detector's recomputation with the same helpers.
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, NamedTuple

from absl import app
from absl import flags

from megdet_tf import result_line

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# `step_peak_mib` reads the CPU's memory statistics, which only the BFC
# allocator keeps: TensorFlow's default only while oneDNN is on.
os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")

# name -> (our model file, image size, Model Garden overrides of the model).
SETTINGS = {
    "r50_256": ("gin/model/r50_fpn.gin", 256, {}),
    "r50_512": ("gin/model/r50_fpn.gin", 512, {}),
    "demo_256": ("gin/model/demo.gin", 256, {
        "backbone": {"resnet": {"model_id": 18, "depth_multiplier": 0.25}},
        "decoder": {"fpn": {"num_filters": 64}},
        "rpn_head": {"num_filters": 64},
        "anchor": {"anchor_size": 4.0},
        "roi_generator": {"pre_nms_top_k": 500, "num_proposals": 200},
        "roi_sampler": {"num_sampled_rois": 128},
        "detection_head": {"fc_dims": 256}}),
}
HEADLINE = ("r50_256", "mixed_bfloat16")

flags.DEFINE_list(
    "runs", ["r50_256:mixed_bfloat16", "r50_256:float32",
             "r50_512:mixed_bfloat16", "demo_256:float32"],
    f"SETTING:PRECISION pairs; settings {list(SETTINGS)}, precisions "
    "float32 or mixed_bfloat16.")
flags.DEFINE_integer("batch", 2, "Images per step.")
flags.DEFINE_integer("steps", 3, "Steps per timed round.")
flags.DEFINE_integer("rounds", 3, "Timed rounds per detector.")
flags.DEFINE_multi_string(
    "gin_param", [], "Extra Gin bindings for our detector (e.g. to compare "
    "two of its options against the same Model Garden run).")
flags.DEFINE_string("setting", "", "Internal: the setting to time.")
flags.DEFINE_string("precision", "", "Internal: its precision.")
flags.DEFINE_string("data_dir", "", "Internal: the shapes dataset.")
FLAGS = flags.FLAGS


def _tfrecords(split):
  return os.path.join(FLAGS.data_dir, "tfrecord", f"{split}-*")


class TracedSteps(NamedTuple):
  """A detector's training loop, traced and warmed up."""
  run: Callable[[], Any]  # Runs `--steps` steps.
  graph: Any  # The loop's `tf.Graph` (benchmarks/detector_step_floor.py).


def _timed_round(run_steps):
  """Seconds per step of `run_steps()`, and the peak memory it added (MiB)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.experimental.reset_memory_stats("CPU:0")
  before = tf.config.experimental.get_memory_info("CPU:0")["current"]
  start = time.perf_counter()
  run_steps()
  seconds = (time.perf_counter() - start) / FLAGS.steps
  peak = tf.config.experimental.get_memory_info("CPU:0")["peak"]
  return seconds, (peak - before) / 2**20


def build_ours(model_file, size, model_dir, gin_params=()):
  """`TracedSteps` of our trainer."""
  from megdet_tf.training import experiment  # pylint: disable=g-import-not-at-top
  precision = FLAGS.precision if FLAGS.precision != "float32" else None
  experiment.parse_gin(["gin/data/shapes.gin", model_file, "gin/norm/bn.gin",
                        "gin/schedule/linear_scaling.gin"], [
      f"train/InputReader.file_pattern={_tfrecords('train')!r}",
      f"eval/InputReader.file_pattern={_tfrecords('val')!r}",
      f"train/InputReader.global_batch_size={FLAGS.batch}",
      f"eval/InputReader.global_batch_size={FLAGS.batch}",
      f"GLOBAL_BATCH_SIZE={FLAGS.batch}",
      f"DetectionParser.short_side={size}", f"DetectionParser.long_side={size}",
      # Model Garden's bottlenecks stride in the 3x3 conv (ResNet v1.5).
      "ResNet.freeze_at=0", "ResNet.stride_in_1x1=False",
      "load_keras_applications_resnet.path=None",
      "build_strategy.kind='one_device'",
      f"configure_process.mixed_precision={precision!r}",
      f"DetectorTrainer.steps_per_loop={FLAGS.steps}",
      f"DetectorTrainer.checkpoint_every_steps={10 ** 6}",
      f"DetectorTrainer.log_every_seconds={10 ** 6}", *gin_params,
      *FLAGS.gin_param])
  trainer = experiment.build_trainer(model_dir)
  trainer.train(max_steps=FLAGS.steps)  # Builds and traces the loop.
  # Then the traced loop alone: no checkpoint at the end of each round.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  iterator = iter(trainer.train_reader.distribute(trainer.strategy))
  steps = tf.constant(FLAGS.steps)
  loop = trainer._train_loop  # pylint: disable=protected-access
  run_steps = lambda: int(loop(iterator, steps)[1])
  run_steps()
  return TracedSteps(run_steps, loop.get_concrete_function(iterator,
                                                           steps).graph)


def build_model_garden(size, overrides):
  """`TracedSteps` of Model Garden's task."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from official.vision.configs import maskrcnn as maskrcnn_config  # pylint: disable=g-import-not-at-top
  from official.vision.tasks import maskrcnn  # pylint: disable=g-import-not-at-top
  from megdet_tf.dataloaders import shapes_dataset  # pylint: disable=g-import-not-at-top
  config = maskrcnn_config.fasterrcnn_resnetfpn_coco().task
  config.init_checkpoint = None
  config.model.override({
      "num_classes": max(c["id"] for c in shapes_dataset.CATEGORIES) + 1,
      "input_size": [size, size, 3],
      # Ours: per-replica BN (momentum 0.9), a 2fc-1024 head, 2000
      # training proposals per image (gin/model/r50_fpn.gin).
      "norm_activation": {"use_sync_bn": False, "norm_momentum": 0.9},
      "detection_head": {"num_convs": 0, "num_fcs": 2},
      "roi_generator": {"num_proposals": 2000}})
  config.model.override(overrides)
  data = config.train_data
  data.override({"input_path": _tfrecords("train"),
                 "global_batch_size": FLAGS.batch, "shuffle_buffer_size": 64,
                 "dtype": "float32" if FLAGS.precision == "float32"
                          else "bfloat16",
                 "parser": {"aug_scale_min": 1.0, "aug_scale_max": 1.0}})
  task = maskrcnn.MaskRCNNTask(config)
  model = task.build_model()
  # What Model Garden's `OptimizerFactory` builds for `sgd` by default.
  optimizer = tf.keras.optimizers.legacy.SGD(0.01, momentum=0.9)
  iterator = iter(task.build_inputs(data))

  @tf.function
  def loop():
    loss = 0.0
    for _ in tf.range(FLAGS.steps):
      loss = task.train_step(next(iterator), model, optimizer)["loss"]
    return loss

  run_steps = lambda: loop().numpy()
  run_steps()
  return TracedSteps(run_steps, loop.get_concrete_function().graph)


def measure():
  """Runs in its own process: one setting at one precision."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  model_file, size, overrides = SETTINGS[FLAGS.setting]
  with tempfile.TemporaryDirectory() as model_dir:
    ours = build_ours(model_file, size, model_dir).run  # Sets the precision.
    theirs = build_model_garden(size, overrides).run
    assert tf.keras.mixed_precision.global_policy().name == FLAGS.precision
    rounds = [(_timed_round(ours), _timed_round(theirs))
              for _ in range(FLAGS.rounds)]
  ratios = [t[0] / o[0] for o, t in rounds]
  median = lambda values: round(statistics.median(values), 3)
  return {"benchmark": "detector_step", "setting": FLAGS.setting,
          "precision": FLAGS.precision, "image_size": size,
          "batch": FLAGS.batch, "steps": FLAGS.steps * FLAGS.rounds,
          "ours_step_s": median([o[0] for o, _ in rounds]),
          "model_garden_step_s": median([t[0] for _, t in rounds]),
          "speedup_vs_model_garden": median(ratios),
          "ours_step_peak_mib": round(max(o[1] for o, _ in rounds)),
          "model_garden_step_peak_mib": round(max(t[1] for _, t in rounds))}


def main(argv):
  del argv
  os.chdir(REPO)
  if FLAGS.setting:
    result_line.print_result(measure())
    os._exit(0)  # pylint: disable=protected-access  # Skip graph teardown.
  from megdet_tf.dataloaders import prepare_shapes  # pylint: disable=g-import-not-at-top
  runs = [tuple(run.split(":")) for run in FLAGS.runs]
  for run in runs:
    if (len(run) != 2 or run[0] not in SETTINGS or
        run[1] not in ("float32", "mixed_bfloat16")):
      raise app.UsageError(f"--runs: {':'.join(run)!r} is not SETTING:"
                           f"PRECISION with SETTING in {list(SETTINGS)}")
  headline = None
  with tempfile.TemporaryDirectory() as tmp:  # One dataset per image size.
    for setting, precision in runs:
      size = SETTINGS[setting][1]
      data_dir = prepare_shapes.prepare_shapes_dataset(
          os.path.join(tmp, str(size)), num_train=64, num_val=4,
          image_size=size)
      process = subprocess.run(
          [sys.executable, __file__, f"--setting={setting}",
           f"--precision={precision}", f"--data_dir={data_dir}",
           f"--batch={FLAGS.batch}", f"--steps={FLAGS.steps}",
           f"--rounds={FLAGS.rounds}",
           *(f"--gin_param={p}" for p in FLAGS.gin_param)],
          capture_output=True, text=True, check=False)
      if process.returncode:
        sys.exit(f"{setting}:{precision} failed:\n{process.stderr[-3000:]}")
      result = result_line.read_result(process.stdout)
      print(json.dumps(result), flush=True)
      if (setting, precision) == HEADLINE and FLAGS.batch == 2:
        headline = result["speedup_vs_model_garden"]
  if headline is not None:
    print(f"speedup_vs_model_garden: {headline}")


if __name__ == "__main__":
  app.run(main)
