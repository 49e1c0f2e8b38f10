"""A checkpoint that does not fit the model is named with its first difference.
"""
import textwrap

import megdet_tf  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TF)
import gin
import pytest
import tensorflow as tf

from megdet_tf.modeling import checkpoint_fit
from megdet_tf.modeling import faster_rcnn


def _build(tiny_detector_gin, extra=""):
  gin.clear_config()
  gin.parse_config(textwrap.dedent(tiny_detector_gin) + extra)
  return faster_rcnn.build_faster_rcnn(num_classes=4)


def _save(tmp_path, model):
  optimizer = tf.keras.optimizers.SGD(0.1, momentum=0.9)
  optimizer.build(model.trainable_variables)
  return tf.train.Checkpoint(model=model, optimizer=optimizer).write(
      str(tmp_path / "ckpt-3"))


def test_the_same_configuration_fits_whatever_the_norm_kind(
    tmp_path, tiny_detector_gin):
  path = _save(tmp_path, _build(tiny_detector_gin))
  for norm in ("frozen", "bn"):  # Saved with the fixture's 'cgbn'.
    checkpoint_fit.check_fits(
        _build(tiny_detector_gin, f"build_norm.norm = '{norm}'\n"), path)


def test_model_variables_missing_from_the_checkpoint_are_named(
    tmp_path, tiny_detector_gin):
  path = _save(tmp_path, _build(tiny_detector_gin))
  with pytest.raises(ValueError, match=(
      r"ckpt-3 does not match this model: (its|the model's) "
      r"model/decoder/\S+ \[16\] is not in (it|the model) \(and \d+ more")):
    checkpoint_fit.check_fits(
        _build(tiny_detector_gin, "FPN.use_norm = True\n"), path)


def test_checkpoint_variables_the_model_lacks_are_named(
    tmp_path, tiny_detector_gin):
  path = _save(tmp_path, _build(tiny_detector_gin, "BoxHead.fc_norm = True\n"))
  with pytest.raises(ValueError, match=(
      r"its model/\S*detection_head/fc_norms/\S+ \[32\] is not in the "
      r"model")):
    checkpoint_fit.check_fits(_build(tiny_detector_gin), path)
  # A part the model and checkpoint agree on still fits.
  checkpoint_fit.check_fits(_build(tiny_detector_gin), path,
                            prefix="model/backbone/")


def test_model_keys_are_what_a_trainer_checkpoint_holds(
    tmp_path, tiny_detector_gin):
  model = _build(tiny_detector_gin)
  path = _save(tmp_path, model)
  saved = {k for k, _ in tf.train.list_variables(path)
           if k.startswith("model/") and ".OPTIMIZER_SLOT" not in k}
  assert set(checkpoint_fit.model_keys(model)) == saved
  assert len(saved) == len(model.variables)
