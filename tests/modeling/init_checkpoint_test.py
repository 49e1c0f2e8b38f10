"""Initialising a detector from a trainer checkpoint: all, backbone, errors."""
import textwrap

import megdet_tf  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TF)
import gin
import numpy as np
import pytest
import tensorflow as tf

from megdet_tf.modeling import faster_rcnn
from megdet_tf.modeling.init_checkpoint import initialize_from_checkpoint


@pytest.fixture
def build(tiny_detector_gin):
  """`build(norm, extra_gin)`: conftest's tiny detector with that norm; every
  build names its variables alike."""
  def build_tiny(norm="bn", extra=""):
    tf.keras.backend.clear_session()
    gin.clear_config()
    gin.parse_config(textwrap.dedent(tiny_detector_gin) +
                     f"build_norm.norm = '{norm}'\n" + extra)
    return faster_rcnn.build_faster_rcnn(num_classes=4)
  return build_tiny


def _randomize(model, seed):
  """Distinct values in every variable, moving statistics included."""
  rng = np.random.default_rng(seed)
  for v in model.variables:
    v.assign(rng.uniform(0.5, 1.5, v.shape).astype(v.dtype.as_numpy_dtype))


def _trainer_checkpoint(tmp_path, model):
  """Saved as `DetectorTrainer` saves: model and optimizer at the root."""
  optimizer = tf.keras.optimizers.SGD(0.1, momentum=0.9)
  optimizer.build(model.trainable_variables)
  manager = tf.train.CheckpointManager(
      tf.train.Checkpoint(model=model, optimizer=optimizer), str(tmp_path),
      max_to_keep=1)
  return manager.save(checkpoint_number=7)


def _values(layer):
  return {v.name: v.numpy() for v in layer.variables}


def _assert_equal(got, want):
  assert sorted(got) == sorted(want)
  for name, value in want.items():
    np.testing.assert_array_equal(got[name], value, err_msg=name)


def test_backbone_only_takes_backbone_and_its_statistics_into_frozen_norms(
    tmp_path, build):
  source = build("bn")
  _randomize(source, 0)
  path = _trainer_checkpoint(tmp_path, source)

  target = build("frozen")
  _randomize(target, 1)
  decoder_before = _values(target.decoder)
  assert initialize_from_checkpoint(
      target, init_checkpoint=str(tmp_path),
      init_checkpoint_modules="backbone") == path
  _assert_equal(_values(target.backbone), _values(source.backbone))
  _assert_equal(_values(target.decoder), decoder_before)


def test_all_takes_every_model_variable(tmp_path, build):
  source = build("bn")
  _randomize(source, 0)
  path = _trainer_checkpoint(tmp_path, source)
  target = build("cgbn")
  _randomize(target, 1)
  initialize_from_checkpoint(target, init_checkpoint=path)
  _assert_equal(_values(target), _values(source))


def test_none_leaves_the_model_alone(build):
  model = build()
  before = _values(model)
  assert initialize_from_checkpoint(model, init_checkpoint=None) is None
  _assert_equal(_values(model), before)


def test_a_checkpoint_of_another_width_is_refused_naming_file_and_variable(
    tmp_path, build):
  path = _trainer_checkpoint(tmp_path, build("bn"))
  target = build("bn", "ResNet.width_multiplier = 0.25\n")
  with pytest.raises(ValueError, match=(
      r"ckpt-7 does not match this model: model/backbone/\S+ is "
      r"\[3, 3, 8, 8\] in it but \[3, 3, 16, 16\] in the model "
      r"\(and \d+ more differences\)")):
    initialize_from_checkpoint(target, init_checkpoint=path,
                               init_checkpoint_modules=["backbone"])


def test_missing_checkpoint_and_unknown_module_are_clear_errors(tmp_path,
                                                                build):
  model = build()
  with pytest.raises(FileNotFoundError, match="no checkpoint in directory"):
    initialize_from_checkpoint(model, init_checkpoint=str(tmp_path))
  with pytest.raises(FileNotFoundError, match=r"nothing-7.index is missing"):
    initialize_from_checkpoint(model,
                               init_checkpoint=str(tmp_path / "nothing-7"))
  path = _trainer_checkpoint(tmp_path, model)
  with pytest.raises(ValueError, match="'heads'"):
    initialize_from_checkpoint(model, init_checkpoint=path,
                               init_checkpoint_modules="heads")
