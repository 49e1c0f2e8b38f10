"""Initialising a detector from another run's checkpoint.

Model Garden's `init_checkpoint` / `init_checkpoint_modules`: a fresh training
run starts from the weights of an earlier one, all of them (e.g. fine-tuning a
COCO detector) or only its backbone (e.g. a backbone pretrained on other data,
as ImageNet is for the paper). Moving statistics travel with the norms, so a
`frozen` norm keeps the statistics the pretraining run learned. The optimizer
state and step are never taken: the new run starts at step 0.
"""
from typing import Optional, Sequence, Union

from absl import logging
import gin
import tensorflow as tf

from megdet_tf.modeling import checkpoint_fit

# The detector's parts that `init_checkpoint_modules` can name.
MODULES = ("backbone", "decoder", "rpn_head", "detection_head")


def _resolve(path: str) -> str:
  """A checkpoint prefix, or the latest checkpoint of a directory."""
  if tf.io.gfile.isdir(path):
    latest = tf.train.latest_checkpoint(path)
    if not latest:
      raise FileNotFoundError(
          f"initialize_from_checkpoint.init_checkpoint: no checkpoint in "
          f"directory {path}")
    return latest
  if not tf.io.gfile.exists(path + ".index"):
    raise FileNotFoundError(
        f"initialize_from_checkpoint.init_checkpoint: no checkpoint {path} "
        f"({path}.index is missing); pass a prefix like runs/x/ckpt-500 or a "
        "model_dir")
  return path


@gin.configurable(denylist=["model"])
def initialize_from_checkpoint(
    model: tf.keras.Model,
    init_checkpoint: Optional[str] = None,
    init_checkpoint_modules: Union[str, Sequence[str]] = "all"
) -> Optional[str]:
  """Loads `init_checkpoint` into `model` (or its named parts); returns it.

  Args:
    model: a built `FasterRCNN`.
    init_checkpoint: a `DetectorTrainer` checkpoint prefix or a model_dir (its
      latest checkpoint); None does nothing.
    init_checkpoint_modules: "all", or some of `MODULES` (e.g. "backbone").
      Every variable of what is named must be in the checkpoint with the same
      shape; the rest of the model keeps its initialisation.

  Raises:
    ValueError: the checkpoint does not fit (`checkpoint_fit.check_fits`).
  """
  if not init_checkpoint:
    return None
  path = _resolve(init_checkpoint)
  if init_checkpoint_modules == "all":
    names = ()
  else:
    names = ((init_checkpoint_modules,)
             if isinstance(init_checkpoint_modules, str)
             else tuple(init_checkpoint_modules))
    unknown = sorted(set(names) - set(MODULES))
    if unknown or not names:
      raise ValueError(
          "initialize_from_checkpoint.init_checkpoint_modules: "
          f"{unknown or names} is not 'all' or a subset of {MODULES}")
  for prefix in [f"model/{n}/" for n in names] or ["model/"]:
    checkpoint_fit.check_fits(model, path, prefix)
  target = (tf.train.Checkpoint(**{n: getattr(model, n) for n in names})
            if names else model)
  tf.train.Checkpoint(model=target).read(path).expect_partial()
  logging.info("Initialised %s from %s", init_checkpoint_modules, path)
  return path
