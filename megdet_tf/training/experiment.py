"""What the tools share: Gin flags and parsing, and building the trainer.

Gin files `include` each other by paths relative to the repository root
(`include 'gin/model/demo.gin'`), which `parse_gin` puts on Gin's search path
so that tools work from any directory.
"""
import os
import time
from typing import Optional, Sequence

from absl import flags
import gin
import tensorflow as tf

from megdet_tf.dataloaders import prepare_shapes  # noqa: F401  pylint: disable=unused-import  (demo.gin binds it)
from megdet_tf.dataloaders.input_reader import InputReader
from megdet_tf.evaluation.coco_evaluator import COCOEvaluator
from megdet_tf.training import strategy as strategy_lib
from megdet_tf.training import trainer as trainer_lib

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


def define_gin_flags():
  """--gin_file, --gin_param and --tf_log_level, as every tool takes them."""
  flags.DEFINE_multi_string("gin_file", [], "Gin config files (repeatable; "
                            "later ones override earlier ones).")
  flags.DEFINE_multi_string("gin_param", [], "Gin bindings (repeatable), e.g. "
                            "--gin_param=DetectorTrainer.steps_per_loop=50.")
  flags.DEFINE_enum("tf_log_level", "error", ["debug", "info", "warning",
                                              "error"],
                    "TensorFlow's own Python logging (its C++ logging: "
                    "TF_CPP_MIN_LOG_LEVEL=0). The tools' progress is "
                    "--verbosity's.")


def parse_gin_flags():
  """Parses the Gin flags and sets TensorFlow's log level from the flags."""
  tf.get_logger().setLevel(flags.FLAGS.tf_log_level.upper())
  parse_gin(flags.FLAGS.gin_file, flags.FLAGS.gin_param)


def parse_gin(gin_files: Sequence[str], gin_params: Sequence[str]):
  """Parses configs; misspelled names fail here, before any heavy work."""
  gin.add_config_file_search_path(REPO_ROOT)
  gin.parse_config_files_and_bindings(gin_files, gin_params)


@gin.configurable
def configure_process(seed: Optional[int] = None,
                      mixed_precision: Optional[str] = None):
  """Process-wide setup, done once before anything is built.

  Args:
    seed: seeds Python, NumPy and TensorFlow (weight initialisation and
      random ops) for repeatable runs; None = a fresh random start.
    mixed_precision: Keras' global dtype policy: None (float32),
      `mixed_bfloat16` or `mixed_float16` (the trainer adds loss scaling).
  """
  if seed is not None:
    tf.keras.utils.set_random_seed(seed)
  if mixed_precision:
    tf.keras.mixed_precision.set_global_policy(mixed_precision)


@gin.configurable(denylist=["model_dir", "evaluate"])
def build_trainer(model_dir: str, evaluate: bool = False, prepare_data=None,
                  data_wait_seconds: float = 1800.0
                  ) -> trainer_lib.DetectorTrainer:
  """Data (made first by `prepare_data`, e.g. the demo's), strategy, trainer.

  Args:
    model_dir: the run's directory.
    evaluate: the run will evaluate; its annotations file is checked now,
      not after training.
    prepare_data: makes the dataset if it is missing. Only the chief runs it
      (workers that all made it at once would delete each other's files);
      the other workers wait until the chief's data is in place.
    data_wait_seconds: how long a worker waits for the chief's data.
  """
  with gin.config_scope("train"):
    train_reader = InputReader(is_training=True)
  with gin.config_scope("eval"):
    eval_reader = InputReader(is_training=False)
  if prepare_data:
    if strategy_lib.is_chief(
        tf.distribute.cluster_resolver.TFConfigClusterResolver()):
      prepare_data()
    else:
      _wait_for_files((train_reader, eval_reader), data_wait_seconds)
  for reader in (train_reader, eval_reader):
    reader.check_files()  # A missing or foreign dataset fails before heavy work.
  if evaluate:  # A malformed annotations file fails now, not after training.
    COCOEvaluator(category_map=train_reader.parser.category_map)
  strategy = strategy_lib.build_strategy()
  configure_process()  # After the strategy has set up the devices.
  return trainer_lib.DetectorTrainer(strategy, model_dir, train_reader,
                                     eval_reader)


def _wait_for_files(readers, timeout_seconds: float):
  """Waits until every reader's pattern matches a file (the chief's data)."""
  deadline = time.time() + timeout_seconds
  patterns = [r.file_pattern for r in readers]
  while not all(tf.io.gfile.glob(p) for p in patterns):
    if time.time() > deadline:
      raise TimeoutError(
          f"Waited {timeout_seconds:g} s for the chief (worker 0) to prepare "
          f"the data matching {patterns}; see the chief's log, or raise "
          "build_trainer.data_wait_seconds.")
    time.sleep(1.0)
