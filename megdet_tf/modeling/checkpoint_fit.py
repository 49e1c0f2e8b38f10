"""Does a checkpoint fit a model? Checked before anything restores from it.

TensorFlow's object-based restore with `expect_partial()` silently leaves out
what the checkpoint does not have and ignores what the model does not use, so
a run resumed under another configuration (another width, norm kind or head)
would train a half-restored model. `check_fits` compares the variables the
model would save (its keys, written once to TensorFlow's in-memory file
system) with the checkpoint's, and names the first difference.
"""
import os
from typing import Dict, Tuple

import tensorflow as tf

_VALUE = "/.ATTRIBUTES/VARIABLE_VALUE"
_SLOT = "/.OPTIMIZER_SLOT/"


def _model_variables(path: str, prefix: str) -> Dict[str, Tuple[int, ...]]:
  """Model variables of a checkpoint (no optimizer slots) by key, with shape.

  Read with the checkpoint reader itself: `tf.train.list_variables` takes
  any path on the in-memory file system for a directory.
  """
  shapes = tf.compat.v1.train.NewCheckpointReader(
      path).get_variable_to_shape_map()
  return {key: tuple(shape) for key, shape in shapes.items()
          if key.startswith(prefix) and key.endswith(_VALUE) and
          _SLOT not in key}


def model_keys(model: tf.Module, root: str = "model"
               ) -> Dict[str, Tuple[int, ...]]:
  """The keys and shapes `tf.train.Checkpoint(**{root: model})` saves."""
  scratch = f"ram://megdet_tf_checkpoint_fit/{os.getpid()}-{id(model)}"
  try:
    path = tf.train.Checkpoint(**{root: model}).write(os.path.join(scratch,
                                                                   "ckpt"))
    return _model_variables(path, f"{root}/")
  finally:
    tf.io.gfile.rmtree(scratch)


def check_fits(model: tf.Module, checkpoint_path: str,
               prefix: str = "model/") -> None:
  """Raises ValueError unless the checkpoint's `prefix` variables are the
  model's `prefix` variables (same keys, same shapes).

  Args:
    model: the model as `tf.train.Checkpoint(model=...)` saves it.
    checkpoint_path: a checkpoint prefix (`.../ckpt-500`).
    prefix: which part to compare, e.g. "model/backbone/".
  """
  have = {k: v for k, v in model_keys(model).items() if k.startswith(prefix)}
  saved = _model_variables(checkpoint_path, prefix)
  problems = []
  for key in sorted(have.keys() | saved.keys()):
    name = key[:-len(_VALUE)]
    if key not in saved:
      problems.append(f"the model's {name} {list(have[key])} is not in it")
    elif key not in have:
      problems.append(f"its {name} {list(saved[key])} is not in the model")
    elif have[key] != saved[key]:
      problems.append(f"{name} is {list(saved[key])} in it but "
                      f"{list(have[key])} in the model")
  if problems:
    raise ValueError(
        f"Checkpoint {checkpoint_path} does not match this model: "
        f"{problems[0]}" + (f" (and {len(problems) - 1} more differences)"
                            if len(problems) > 1 else "") +
        ". Use the Gin configuration it was trained with, or another "
        "model_dir.")
