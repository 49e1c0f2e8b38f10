r"""Trains and/or evaluates a MegDet detector from Gin files.

  python tools/train.py --gin_file=gin/megdet_bs256.gin --model_dir=runs/bs256
  python tools/train.py --gin_file=gin/demo.gin --model_dir=runs/demo
  python tools/train.py --gin_file=gin/demo.gin --model_dir=runs/demo \
      --mode=eval

`--gin_file` and `--gin_param` repeat and compose; files `include` others
by paths relative to the repository root (`gin/model/demo.gin`), from any
working directory. Training resumes from the latest checkpoint in
`--model_dir`. Exit codes: 3 = diverged, 42 = preempted (SIGTERM; the step
was saved, run again to resume), 1 = any other failure, e.g. another worker
was lost (dead or stalled).
"""
import os
import sys

from absl import app
from absl import flags
from absl import logging
import gin

import megdet_tf  # noqa: F401  pylint: disable=unused-import
import tensorflow as tf

from megdet_tf.training import divergence
from megdet_tf.training import evaluator
from megdet_tf.training import experiment
from megdet_tf.training import peer_errors
from megdet_tf.training import trainer as trainer_lib

MODES = ("train", "eval", "train_and_eval")
OPERATIVE_CONFIG = "operative_config.gin"  # The bindings the run used.

experiment.define_gin_flags()
flags.DEFINE_string("model_dir", None, "Checkpoints, summaries, config.")
flags.DEFINE_enum("mode", "train_and_eval", MODES, "What to run.")
flags.DEFINE_integer("max_steps", None, "Stop training after this step.")
flags.DEFINE_string("checkpoint_path", None,
                    "Checkpoint to evaluate (default: latest in model_dir).")
flags.mark_flag_as_required("model_dir")
FLAGS = flags.FLAGS


def run(model_dir, mode, max_steps=None, checkpoint_path=None):
  """Trains and/or evaluates; returns the COCO metrics if it evaluated.

  The Gin config is written to model_dir only once the checkpoint to resume
  (or evaluate) is known to fit the configured model: a mistaken
  configuration changes nothing there. The chief ends by logging where the
  outputs are.
  """
  trainer = experiment.build_trainer(model_dir, evaluate=mode != "train")
  if mode == "eval":
    if not trainer.restore(checkpoint_path):
      raise FileNotFoundError(
          f"No checkpoint to evaluate in {model_dir}; pass --checkpoint_path")
  else:
    trainer.resume_or_initialize()
    if trainer.is_chief:
      with open(os.path.join(model_dir, "config.gin"), "w") as f:
        f.write(gin.config_str())
    trainer.train(max_steps=max_steps, evaluate=mode == "train_and_eval")
    if trainer.is_chief:
      with open(os.path.join(model_dir, OPERATIVE_CONFIG), "w") as f:
        f.write(gin.operative_config_str())
  metrics = trainer.evaluate() if mode != "train" else None
  if trainer.is_chief:
    logging.info("%s", outputs(model_dir, mode))
  return metrics


def outputs(model_dir, mode):
  """Where a run of `mode` left its outputs in model_dir, one per line."""
  lines = [f"Outputs in {model_dir}:"]
  if mode != "eval":
    lines += [f"  checkpoint   {tf.train.latest_checkpoint(model_dir)}",
              f"  config       {os.path.join(model_dir, OPERATIVE_CONFIG)}"]
  if mode != "train":
    lines.append("  detections   " +
                 os.path.join(model_dir, evaluator.DETECTIONS_FILE))
  lines.append(f"  TensorBoard  tensorboard --logdir={model_dir}")
  return "\n".join(lines)


def main(argv):
  del argv
  experiment.parse_gin_flags()
  os.makedirs(FLAGS.model_dir, exist_ok=True)
  exit_code = 0
  try:
    run(FLAGS.model_dir, FLAGS.mode, FLAGS.max_steps, FLAGS.checkpoint_path)
  except divergence.TrainingDivergedError as e:
    logging.error("%s", e)
    exit_code = trainer_lib.EXIT_DIVERGED
  except trainer_lib.PreemptedError as e:
    logging.warning("%s", e)
    exit_code = trainer_lib.EXIT_PREEMPTED
  except peer_errors.PeerLostError as e:
    logging.error("%s", e)  # TensorFlow's traceback would bury it.
    exit_code = 1
  # Everything is saved and flushed; skip Python's teardown of the traced
  # graphs, which takes minutes for a replicated detector.
  logging.flush()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(exit_code)  # pylint: disable=protected-access


if __name__ == "__main__":
  app.run(main)
