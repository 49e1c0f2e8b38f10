"""ImageNet initialization from Keras Applications' ResNet weights files.

Loads `resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5` (and the
ResNet-101 file, same layout) into `ResNet(depth=50|101, stride_in_1x1=True,
width_multiplier=1)`. Keras Applications' ResNet is v1 with the stride on the
1x1 conv, a bias on every conv and batch-norm epsilon 1.001e-5; our convs
have no bias and our norms `build_norm`'s epsilon. Loading is exact anyway:

- a conv's bias b moves into the following norm's moving mean:
  BN(Wx + b) with mean mu equals BN(Wx) with mean mu - b;
- the epsilon difference moves into the moving variance:
  var' = var + 1.001e-5 - eps, so var' + eps = var + 1.001e-5.

(Both are exact where the moving statistics are used: frozen norms and
inference. In `bn`/`cgbn` training a bias has no effect at all.)

Input normalization. The file expects Caffe preprocessing: BGR, 0-255, minus
the ImageNet mean (103.939, 116.779, 123.68), no scaling. Our parser feeds RGB
normalized with Model Garden's ImageNet mean/std, u = (x - m) / s. With
`input_normalization='model_garden'` (the default) the stem conv is rewritten
for that input: its input channels are reversed to RGB and scaled by s, and
the constant W (m - caffe_mean) is folded into the moving mean like a bias.
This is exact except within the stem conv's 3-pixel zero padding, where the
two normalizations pad different colours (their means differ by < 0.5 of 255).
`input_normalization='caffe'` loads the file as it is, for inputs already
preprocessed with `tf.keras.applications.resnet.preprocess_input`.
"""
import os
from typing import Dict, List, Optional, Tuple

import gin
import h5py
import numpy as np
import tensorflow as tf

from official.vision.ops import preprocess_ops

from megdet_tf.modeling.backbones.resnet import ResNet

KERAS_APPLICATIONS_EPSILON = 1.001e-5
_KERAS_URL = ("https://storage.googleapis.com/tensorflow/keras-applications/"
              "resnet/")
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
INPUT_NORMALIZATIONS = ("model_garden", "caffe")
_NORM_WEIGHTS = ("gamma", "beta", "moving_mean", "moving_variance")


def _conv_norm_pairs(backbone: ResNet) -> List[Tuple[tf.keras.layers.Layer,
                                                     tf.keras.layers.Layer]]:
  pairs = [(backbone.stem_conv, backbone.stem_norm)]
  for stage in backbone.stages:
    for block in stage:
      if block.shortcut_conv is not None:
        pairs.append((block.shortcut_conv, block.shortcut_norm))
      pairs.extend(zip(block.convs, block.norms))
  return pairs


def _read_layer(root: h5py.Group, layer: tf.keras.layers.Layer,
                path: str) -> Dict[str, np.ndarray]:
  """The file's weights of the layer named like `layer`, by short name."""
  if layer.name not in root:
    first = layer.weights[0]
    raise ValueError(
        f"{path} has no weights for layer '{layer.name}' (variable "
        f"{first.name}, shape {first.shape}). Expected Keras Applications' "
        f"ResNet-50/101 weights (e.g. "
        f"resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5).")
  group = root[layer.name]
  names = [n.decode() if isinstance(n, bytes) else n
           for n in group.attrs.get("weight_names", [])]
  return {n.split("/")[-1].split(":")[0]: np.asarray(group[n]) for n in names}


def _check_shape(variable: tf.Variable, value: np.ndarray, what: str,
                 path: str) -> np.ndarray:
  if tuple(variable.shape) != value.shape:
    raise ValueError(
        f"{path}: {what} has shape {value.shape} but variable "
        f"{variable.name} has shape {tuple(variable.shape)}. Keras "
        f"Applications weights fit ResNet(depth=50 or 101, "
        f"width_multiplier=1.0) only.")
  return value


def _stem_for_model_garden_input(kernel: np.ndarray) -> Tuple[np.ndarray,
                                                              np.ndarray]:
  """Rewrites the stem kernel from Caffe BGR input to normalized RGB input.

  Returns the new kernel and the constant it adds per output channel.
  """
  mean_rgb = np.array(preprocess_ops.MEAN_RGB)
  scale_rgb = np.array(preprocess_ops.STDDEV_RGB)
  rgb_kernel = kernel[:, :, ::-1, :]
  offset = mean_rgb - np.array(CAFFE_MEAN_BGR[::-1])
  constant = np.einsum("hwio,i->o", rgb_kernel, offset)
  return rgb_kernel * scale_rgb[None, None, :, None], constant


@gin.configurable(denylist=["backbone"])
def load_keras_applications_resnet(
    backbone: ResNet,
    path: Optional[str] = None,
    input_normalization: str = "model_garden") -> bool:
  """Loads Keras Applications ResNet-50/101 ImageNet weights into `backbone`.

  Args:
    backbone: a `ResNet(depth=50 or 101, stride_in_1x1=True)`; built here if
      it has not been called yet.
    path: the `.h5` weights file (`model.save_weights` layout; the `notop`
      file or the full one, whose classifier is ignored); None loads nothing
      (training from scratch), so a trainer can always call this.
    input_normalization: `model_garden` (parser's normalized RGB) or `caffe`
      (Keras Applications' `preprocess_input`), see the module docstring.

  Returns:
    Whether weights were loaded.

  Raises:
    ValueError: the file is missing, not Keras HDF5 weights, or a variable of
      the backbone has no counterpart of its shape in it (the message names
      the first such variable).
  """
  if path is None:
    return False
  if input_normalization not in INPUT_NORMALIZATIONS:
    raise ValueError(f"input_normalization must be one of "
                     f"{INPUT_NORMALIZATIONS}, got {input_normalization!r}")
  config = backbone.get_config()
  if config["depth"] not in (50, 101) or not config["stride_in_1x1"]:
    raise ValueError(
        f"Keras Applications weights are ResNet-50/101 v1 with the stride on "
        f"the 1x1 conv; the backbone is ResNet(depth={config['depth']}, "
        f"stride_in_1x1={config['stride_in_1x1']})")
  if not os.path.isfile(path):
    raise ValueError(
        f"load_keras_applications_resnet.path: {path} does not exist. Get "
        f"{_KERAS_URL}resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5 "
        f"(ResNet-50) there, or bind the path to None to train from scratch.")
  if not backbone.built:
    backbone(tf.zeros([1, 64, 64, 3]), training=False)
  try:
    h5 = h5py.File(path, "r")
  except OSError as e:
    raise ValueError(f"{path} is not an HDF5 (Keras .h5) weights file: {e}"
                     ) from e
  with h5:
    root = h5["model_weights"] if "model_weights" in h5 else h5
    assignments = []
    for conv, norm in _conv_norm_pairs(backbone):
      conv_weights = _read_layer(root, conv, path)
      norm_weights = _read_layer(root, norm, path)
      if "kernel" not in conv_weights:
        raise ValueError(f"{path}: layer '{conv.name}' has no kernel "
                         f"(variable {conv.kernel.name})")
      kernel = _check_shape(conv.kernel, conv_weights["kernel"],
                            f"'{conv.name}/kernel'", path)
      bias = conv_weights.get("bias", np.zeros(kernel.shape[-1]))
      if conv is backbone.stem_conv and input_normalization == "model_garden":
        kernel, constant = _stem_for_model_garden_input(kernel)
        bias = bias + constant
      assignments.append((conv.kernel, kernel))
      for name, variable in zip(_NORM_WEIGHTS, (norm.gamma, norm.beta,
                                                norm.moving_mean,
                                                norm.moving_variance)):
        if name not in norm_weights:
          raise ValueError(f"{path}: layer '{norm.name}' has no {name} "
                           f"(variable {variable.name})")
        value = norm_weights[name]
        if name == "moving_mean":
          value = value - _check_shape(variable, bias, f"'{conv.name}/bias'",
                                       path)
        elif name == "moving_variance":
          value = value + (KERAS_APPLICATIONS_EPSILON - norm.epsilon)
        assignments.append((variable, _check_shape(
            variable, value, f"'{norm.name}/{name}'", path)))
  # Assign only once the whole file fits, so a bad file changes nothing.
  for variable, value in assignments:
    variable.assign(value.astype(variable.dtype.as_numpy_dtype))
  return True
