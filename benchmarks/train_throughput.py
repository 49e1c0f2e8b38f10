r"""Training throughput vs replicas, and time to a target mmAP, on the demo.

  python benchmarks/train_throughput.py [--replicas 1,2,4,8] [--steps 30]
  python benchmarks/train_throughput.py --measure=time_to_map --target_ap 0.5

Throughput: images/s of the full training step (input pipeline included) of
gin/demo.gin at 4 images per replica, for each replica count in a fresh
process (logical CPU devices are fixed at TensorFlow start-up), after the
traced first loop. Time to mmAP: trains the demo, evaluating every
`--eval_every` steps, and reports when val AP first reaches `--target_ap`
(training time only, evaluation excluded). One JSON line per measurement.
"""
import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

from megdet_tf import result_line

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

flags.DEFINE_list("replicas", ["1", "2", "4", "8"], "Replica counts.")
flags.DEFINE_integer("steps", 30, "Timed steps per replica count.")
flags.DEFINE_integer("images_per_replica", 4, "Per-replica batch.")
flags.DEFINE_list("measure", ["throughput", "time_to_map"],
                  "What to measure: throughput, time_to_map.")
flags.DEFINE_float("target_ap", 0.5, "COCO AP target on the shapes val split.")
flags.DEFINE_integer("eval_every", 100, "Steps between evaluations.")
flags.DEFINE_multi_string("gin_param", [], "Extra Gin bindings for the demo, "
                          "e.g. to try a schedule.")
flags.DEFINE_integer("worker_replicas", 0, "Internal: run one measurement.")
FLAGS = flags.FLAGS


def _config():
  """The configuration trained: gin/demo.gin and any --gin_param."""
  return " ".join(["gin/demo.gin"] + FLAGS.gin_param)


def build_trainer(model_dir, *gin_params):
  from megdet_tf.training import experiment  # pylint: disable=g-import-not-at-top
  experiment.parse_gin(["gin/demo.gin"], FLAGS.gin_param + list(gin_params))
  return experiment.build_trainer(model_dir)


def measure_throughput(replicas):
  """Runs in its own process: images/s at `replicas` replicas."""
  with tempfile.TemporaryDirectory() as model_dir:
    trainer = build_trainer(
        model_dir, f"build_strategy.num_cpu_replicas={replicas}",
        f"GLOBAL_BATCH_SIZE={replicas * FLAGS.images_per_replica}",
        "DetectorTrainer.steps_per_loop=10",
        f"DetectorTrainer.checkpoint_every_steps={10 ** 6}")
    trainer.train(max_steps=10)  # Traces the step.
    start = time.perf_counter()
    trainer.train(max_steps=10 + FLAGS.steps)
    seconds = time.perf_counter() - start
  return {"benchmark": "train_throughput", "config": _config(),
          "replicas": replicas, "images_per_replica": FLAGS.images_per_replica,
          "steps": FLAGS.steps, "cpu_cores": os.cpu_count(),
          "images_per_second": round(
              FLAGS.steps * replicas * FLAGS.images_per_replica / seconds, 2),
          "step_seconds": round(seconds / FLAGS.steps, 3)}


def time_to_map():
  with tempfile.TemporaryDirectory() as model_dir:
    trainer = build_trainer(model_dir)
    training_seconds, step = 0.0, 0
    while step < trainer.total_steps:
      step = min(step + FLAGS.eval_every, trainer.total_steps)
      start = time.perf_counter()
      trainer.train(max_steps=step)
      training_seconds += time.perf_counter() - start
      ap = trainer.evaluate()["AP"]
      print(json.dumps({"benchmark": "time_to_map", "config": _config(),
                        "step": step, "training_seconds": round(
                            training_seconds, 1), "AP": round(ap, 4)}),
            flush=True)
      if ap >= FLAGS.target_ap:
        return {"benchmark": "time_to_map", "target_ap": FLAGS.target_ap,
                "reached": True, "step": step,
                "training_seconds": round(training_seconds, 1)}
  return {"benchmark": "time_to_map", "target_ap": FLAGS.target_ap,
          "reached": False, "step": step}


def main(argv):
  del argv
  os.chdir(REPO)
  if FLAGS.worker_replicas:
    result_line.print_result(measure_throughput(FLAGS.worker_replicas))
  else:
    for replicas in FLAGS.replicas if "throughput" in FLAGS.measure else ():
      out = subprocess.run(
          [sys.executable, __file__, f"--worker_replicas={replicas}",
           f"--steps={FLAGS.steps}",
           f"--images_per_replica={FLAGS.images_per_replica}"] +
          [f"--gin_param={param}" for param in FLAGS.gin_param],
          capture_output=True, text=True, check=True).stdout
      print(json.dumps(result_line.read_result(out)), flush=True)
    if "time_to_map" in FLAGS.measure:
      print(json.dumps(time_to_map()))
  sys.stdout.flush()
  os._exit(0)  # pylint: disable=protected-access  # Skip graph teardown.


if __name__ == "__main__":
  app.run(main)
