"""Loading Keras Applications ResNet-50 weights: parity and clear errors.

Nothing can be downloaded here, so the reference is Keras Applications'
ResNet50 with random weights (random biases and moving statistics too, so the
bias/epsilon folding is exercised), saved the way the ImageNet file is.
"""
import megdet_tf  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TF)
import gin
import h5py
import numpy as np
import pytest
import tensorflow as tf

from official.vision.ops import preprocess_ops

from megdet_tf.modeling import pretrained
from megdet_tf.modeling.backbones import resnet

_OUTPUTS = {"2": "conv2_block3_out", "3": "conv3_block4_out",
            "4": "conv4_block6_out", "5": "conv5_block3_out"}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """(Keras Applications C2-C5 feature model, path of its .h5 weights)."""
  model = tf.keras.applications.ResNet50(weights=None, include_top=False,
                                         input_shape=(None, None, 3))
  rng = np.random.default_rng(0)
  values = []
  for w in model.weights:
    name = w.name.split("/")[-1]
    if name.startswith("moving_variance"):
      values.append(rng.uniform(0.5, 2.0, w.shape))
    elif name.startswith(("moving_mean", "beta", "bias")):
      values.append(rng.normal(0.0, 0.2, w.shape))
    elif name.startswith("gamma"):
      values.append(rng.uniform(0.5, 1.5, w.shape))
    else:
      values.append(w.numpy())
  model.set_weights([v.astype(np.float32) for v in values])
  path = str(tmp_path_factory.mktemp("weights") /
             "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5")
  model.save_weights(path)
  features = tf.keras.Model(model.input, {
      level: model.get_layer(name).output for level, name in _OUTPUTS.items()})
  return features, path


def _pixels(seed=0):
  return np.random.default_rng(seed).uniform(
      0, 255, (2, 64, 96, 3)).astype(np.float32)


def _caffe(pixels):
  return tf.keras.applications.resnet.preprocess_input(pixels.copy())


@pytest.mark.parametrize("norm", ["frozen", "bn"])
def test_caffe_input_matches_keras_applications(reference, norm):
  gin.bind_parameter("build_norm.norm", norm)
  features, path = reference
  backbone = resnet.ResNet(depth=50)
  assert pretrained.load_keras_applications_resnet(
      backbone, path, input_normalization="caffe")
  expected = features(_caffe(_pixels()), training=False)
  got = backbone(_caffe(_pixels()), training=False)
  for level in _OUTPUTS:
    scale = float(tf.reduce_max(tf.abs(expected[level])))
    np.testing.assert_allclose(got[level], expected[level], rtol=0,
                               atol=2e-6 * scale)


def test_model_garden_input_matches_up_to_border_padding(reference):
  features, path = reference
  backbone = resnet.ResNet(depth=50)
  pretrained.load_keras_applications_resnet(backbone, path)
  expected = features(_caffe(_pixels()), training=False)
  normalized = preprocess_ops.normalize_image(tf.constant(_pixels() / 255.0))
  got = backbone(normalized, training=False)
  for level in _OUTPUTS:
    scale = float(tf.reduce_max(tf.abs(expected[level])))
    error = tf.abs(got[level] - expected[level])
    assert float(tf.reduce_max(error)) < 5e-3 * scale, level
    assert float(tf.reduce_mean(error)) < 1e-4 * scale, level


@pytest.mark.filterwarnings("ignore:You are saving your model as an HDF5")
def test_full_model_file_loads(reference, tmp_path):
  features, _ = reference
  path = str(tmp_path / "full.h5")
  features.save(path)  # Weights under 'model_weights'.
  backbone = resnet.ResNet(depth=50)
  pretrained.load_keras_applications_resnet(backbone, path, "caffe")
  got = backbone(_caffe(_pixels(1)), training=False)["5"]
  expected = features(_caffe(_pixels(1)), training=False)["5"]
  np.testing.assert_allclose(got, expected, rtol=0,
                             atol=2e-6 * float(tf.reduce_max(abs(expected))))


def test_missing_layer_is_named_and_nothing_changes(reference, tmp_path):
  _, path = reference
  broken = str(tmp_path / "broken.h5")
  with h5py.File(path, "r") as src, h5py.File(broken, "w") as dst:
    for key, value in src.attrs.items():
      dst.attrs[key] = value
    for name in src:
      if name != "conv4_block2_2_bn":
        src.copy(src[name], dst, name)
  backbone = resnet.ResNet(depth=50)
  backbone(tf.zeros([1, 32, 32, 3]), training=False)
  before = [v.numpy() for v in backbone.variables]
  with pytest.raises(ValueError, match=r"no weights for layer "
                     r"'conv4_block2_2_bn' \(variable .*conv4_block2_2_bn/"):
    pretrained.load_keras_applications_resnet(backbone, broken)
  for b, v in zip(before, backbone.variables):
    np.testing.assert_array_equal(b, v.numpy())


def test_shape_mismatch_names_first_variable(reference):
  _, path = reference
  with pytest.raises(ValueError, match=r"'conv1_conv/kernel' has shape "
                     r"\(7, 7, 3, 64\) but variable .*conv1_conv/kernel:0 has "
                     r"shape \(7, 7, 3, 32\)"):
    pretrained.load_keras_applications_resnet(
        resnet.ResNet(depth=50, width_multiplier=0.5), path)


def test_other_network_file_is_refused(tmp_path):
  other = tf.keras.applications.MobileNetV2(
      weights=None, include_top=False, alpha=0.35, input_shape=(32, 32, 3))
  path = str(tmp_path / "mobilenet.h5")
  other.save_weights(path)
  with pytest.raises(ValueError, match="no weights for layer 'conv1_conv'"):
    pretrained.load_keras_applications_resnet(resnet.ResNet(depth=50), path)


def test_bad_files_and_backbones(tmp_path):
  backbone = resnet.ResNet(depth=50, width_multiplier=0.25)
  assert not pretrained.load_keras_applications_resnet(backbone, None)
  with pytest.raises(ValueError, match="does not exist"):
    pretrained.load_keras_applications_resnet(backbone, str(tmp_path / "x.h5"))
  text = tmp_path / "weights.h5"
  text.write_text("not hdf5")
  with pytest.raises(ValueError, match="not an HDF5"):
    pretrained.load_keras_applications_resnet(backbone, str(text))
  with pytest.raises(ValueError, match="input_normalization"):
    pretrained.load_keras_applications_resnet(backbone, str(text), "torch")
  for bad in (resnet.ResNet(depth=18), resnet.ResNet(stride_in_1x1=False)):
    with pytest.raises(ValueError, match="stride on the 1x1 conv"):
      pretrained.load_keras_applications_resnet(bad, str(text))
