"""What the tools share: Gin flags and parsing, and building the trainer.

Gin files `include` each other by paths relative to the repository root
(`include 'gin/model/demo.gin'`), which `parse_gin` puts on Gin's search path
so that tools work from any directory.
"""
import os
from typing import Sequence

from absl import flags
import gin

from megdet_tf.dataloaders import prepare_shapes  # noqa: F401  pylint: disable=unused-import  (demo.gin binds it)
from megdet_tf.dataloaders.input_reader import InputReader
from megdet_tf.training import strategy as strategy_lib
from megdet_tf.training import trainer as trainer_lib

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


def define_gin_flags():
  """--gin_file and --gin_param, as every tool takes them."""
  flags.DEFINE_multi_string("gin_file", [], "Gin config files (repeatable; "
                            "later ones override earlier ones).")
  flags.DEFINE_multi_string("gin_param", [], "Gin bindings (repeatable), e.g. "
                            "--gin_param=DetectorTrainer.steps_per_loop=50.")


def parse_gin(gin_files: Sequence[str], gin_params: Sequence[str]):
  """Parses configs; misspelled names fail here, before any heavy work."""
  gin.add_config_file_search_path(REPO_ROOT)
  gin.parse_config_files_and_bindings(gin_files, gin_params)


@gin.configurable(denylist=["model_dir"])
def build_trainer(model_dir: str,
                  prepare_data=None) -> trainer_lib.DetectorTrainer:
  """Data (made first by `prepare_data`, e.g. the demo's), strategy, trainer."""
  if prepare_data:
    prepare_data()
  with gin.config_scope("train"):
    train_reader = InputReader(is_training=True)
  with gin.config_scope("eval"):
    eval_reader = InputReader(is_training=False)
  for reader in (train_reader, eval_reader):
    reader.check_files()  # A missing or foreign dataset fails before heavy work.
  strategy = strategy_lib.build_strategy()
  return trainer_lib.DetectorTrainer(strategy, model_dir, train_reader,
                                     eval_reader)
