"""ResNet-18/34/50/101 backbone with C2-C5 outputs for FPN.

ResNet v1 as Detectron and Keras Applications build it: a 7x7/2 stem and a
3x3/2 max pool, then four stages of basic (18, 34) or bottleneck (50, 101)
blocks, the first block of stages 3-5 striding by 2. Bottleneck blocks put the
stride on the first 1x1 conv (`stride_in_1x1=True`: MSRA/Caffe and Keras
Applications weights) or on the 3x3 conv (torchvision weights). Strided convs
pad symmetrically, as Caffe and PyTorch do, so pretrained weights see the
pixels they were trained on (TF's 'same' padding would shift them by one).

Sub-layer names follow Keras Applications (`conv1_conv`, `conv1_bn`,
`conv{stage}_block{i}_{j}_conv` with j = 0 for the projection shortcut), which
makes the pretrained file's layout the documentation of ours. Every
normalization comes from `build_norm`, so `frozen`/`bn`/`cgbn` share
variables and checkpoints load across norm kinds. Convs have no bias: a
normalization follows each of them (a pretrained bias is folded into the
moving mean on load, see `pretrained.py`).

`freeze_at` freezes the stem (1) and stage 2 (2) as Detectron does; a frozen
stage's norms run on their moving statistics. `recompute` is the paper's
sub-linear memory: the stem and each stage, when trainable, keep only their
input for the backward pass and recompute their activations there
(`tf.recompute_grad`); batch norms then update their moving statistics in the
forward pass only.
"""
import contextlib
import functools
import threading
from typing import Any, Dict, Optional

import gin
import tensorflow as tf

from megdet_tf.modeling.layers import conv2d
from megdet_tf.modeling.layers import initializers
from megdet_tf.modeling.layers import normalization

# depth -> (block kind, blocks per stage 2..5).
RESNET_SPECS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
}
_STAGE_FILTERS = (64, 128, 256, 512)


def _conv(filters: int, kernel_size: int, strides: int,
          name: str) -> conv2d.Conv2D:
  """Bias-free conv; strided ones get symmetric padding in `_apply_conv`."""
  return conv2d.Conv2D(
      filters, kernel_size, strides=strides,
      padding="same" if strides == 1 else "valid", use_bias=False,
      kernel_initializer=initializers.msra_fill(), name=name)


def _apply_conv(conv: conv2d.Conv2D, x: tf.Tensor) -> tf.Tensor:
  if conv.strides[0] > 1 and conv.kernel_size[0] > 1:
    pad = (conv.kernel_size[0] - 1) // 2
    x = tf.pad(x, [[0, 0], [pad, pad], [pad, pad], [0, 0]])
  return conv(x)


class _Block(tf.keras.layers.Layer):
  """Residual block: (conv, norm) pairs, relu between, a shortcut around."""

  def __init__(self, kernels, filters, strides, shortcut_filters,
               use_projection, norm, **kwargs):
    super().__init__(**kwargs)
    self.convs, self.norms = [], []
    for j, (kernel, f, s) in enumerate(zip(kernels, filters, strides), 1):
      self.convs.append(_conv(f, kernel, s, f"{self.name}_{j}_conv"))
      self.norms.append(
          normalization.build_norm(name=f"{self.name}_{j}_bn", **norm))
    self.shortcut_conv = self.shortcut_norm = None
    if use_projection:
      self.shortcut_conv = _conv(shortcut_filters, 1, max(strides),
                                 f"{self.name}_0_conv")
      self.shortcut_norm = normalization.build_norm(
          name=f"{self.name}_0_bn", **norm)

  def call(self, x, training=None):
    shortcut = x
    if self.shortcut_conv is not None:
      shortcut = self.shortcut_norm(self.shortcut_conv(x), training=training)
    for j, (conv, norm) in enumerate(zip(self.convs, self.norms)):
      x = norm(_apply_conv(conv, x), training=training)
      if j < len(self.convs) - 1:
        x = tf.nn.relu(x)
    return tf.nn.relu(x + shortcut)


def _block(kind: str, filters: int, strides: int, use_projection: bool,
           stride_in_1x1: bool, norm: Dict[str, Any], name: str) -> _Block:
  if kind == "basic":
    return _Block((3, 3), (filters, filters), (strides, 1), filters,
                  use_projection, norm, name=name)
  first, middle = (strides, 1) if stride_in_1x1 else (1, strides)
  return _Block((1, 3, 1), (filters, filters, 4 * filters),
                (first, middle, 1), 4 * filters, use_projection, norm,
                name=name)


# Replicas share the layers, and MirroredStrategy interleaves their tracing
# threads at every merge_call (cross-replica BN makes some), so their
# recomputations overlap.
_recomputing_lock = threading.Lock()
_recomputing = {}  # id(layer) -> [replicas recomputing, saved momenta].


@contextlib.contextmanager
def _moving_statistics_kept(layer: tf.keras.layers.Layer):
  """Runs `layer`'s batch norms in training mode without updating statistics.

  The recomputed forward pass must normalize exactly as the first one did
  (batch statistics) but must not move the moving averages a second time;
  momentum 1 is what Keras itself uses for "no update". The first replica to
  enter saves the momenta, the last to leave restores them.
  """
  norms = [l for l in layer.submodules
           if isinstance(l, tf.keras.layers.BatchNormalization)]
  with _recomputing_lock:
    state = _recomputing.setdefault(
        id(layer), [0, [n.momentum for n in norms]])
    state[0] += 1
    for n in norms:
      n.momentum = 1.0
  try:
    yield
  finally:
    with _recomputing_lock:
      state[0] -= 1
      if not state[0]:
        for n, m in zip(norms, state[1]):
          n.momentum = m
        del _recomputing[id(layer)]


@tf.keras.utils.register_keras_serializable(package="megdet_tf")
@gin.configurable
class ResNet(tf.keras.Model):
  """ResNet returning {'2': C2, '3': C3, '4': C4, '5': C5} (strides 4-32)."""

  def __init__(self,
               depth: int = 50,
               width_multiplier: float = 1.0,
               stride_in_1x1: bool = True,
               freeze_at: int = 2,
               recompute: bool = False,
               norm: Optional[Dict[str, Any]] = None,
               **kwargs):
    """Builds the layers.

    Args:
      depth: 18, 34, 50 or 101.
      width_multiplier: scales every conv's filters (demo models use 0.25).
      stride_in_1x1: bottleneck stride on the 1x1 conv (Keras Applications,
        MSRA weights) rather than the 3x3 conv (torchvision weights).
      freeze_at: 0 trains everything, 1 freezes the stem, 2 the stem and
        stage 2 (C2), as Detectron's FREEZE_AT.
      recompute: recompute the activations of the stem and of each stage in
        the backward pass instead of keeping them (sub-linear memory).
      norm: norm spec (`normalization.norm_spec`); None = Gin's choice.
      **kwargs: `tf.keras.Model` arguments (e.g. `name`).
    """
    super().__init__(**kwargs)
    if depth not in RESNET_SPECS:
      raise ValueError(f"ResNet.depth must be one of {sorted(RESNET_SPECS)}, "
                       f"got {depth}")
    if not 0 <= freeze_at <= 5:
      raise ValueError(f"ResNet.freeze_at must be in 0..5, got {freeze_at}")
    self._config = dict(depth=depth, width_multiplier=width_multiplier,
                        stride_in_1x1=stride_in_1x1, freeze_at=freeze_at,
                        recompute=recompute,
                        norm=normalization.norm_spec(norm))
    kind, blocks_per_stage = RESNET_SPECS[depth]
    width = lambda f: max(1, int(round(f * width_multiplier)))
    self.stem_conv = _conv(width(64), 7, 2, "conv1_conv")
    self.stem_norm = normalization.build_norm(name="conv1_bn",
                                              **self._config["norm"])
    self.stages = []
    for stage, (num_blocks, filters) in enumerate(
        zip(blocks_per_stage, _STAGE_FILTERS), 2):
      self.stages.append([
          _block(kind, width(filters), 2 if (i == 0 and stage > 2) else 1,
                 use_projection=(i == 0 and (stage > 2 or kind != "basic")),
                 stride_in_1x1=stride_in_1x1, norm=self._config["norm"],
                 name=f"conv{stage}_block{i + 1}")
          for i in range(num_blocks)])
    if freeze_at >= 1:
      self.stem_conv.trainable = self.stem_norm.trainable = False
    for stage in self.stages[:max(0, freeze_at - 1)]:
      for block in stage:
        block.trainable = False

  def _stem(self, x, training):
    x = tf.nn.relu(self.stem_norm(_apply_conv(self.stem_conv, x),
                                  training=training))
    # Zero padding equals -inf padding after a relu.
    x = tf.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]])
    return tf.nn.max_pool2d(x, 3, 2, "VALID")

  def _run_stage(self, blocks, x, training):
    for block in blocks:
      x = block(x, training=training)
    return x

  def _segment(self, fn, layers, x, training):
    """Runs `fn(x)`; recomputed in the backward pass if `recompute` applies.

    Applies in training to trainable segments whose variables exist (the
    first call creates them outside `tf.recompute_grad`).
    """
    if not (self._config["recompute"] and training and layers[0].trainable
            and all(l.built for l in layers)):
      return fn(x, training)
    runs = []

    def recomputable(inputs):
      # The first run is the forward pass; later runs recompute it for the
      # gradient and must leave the moving statistics alone.
      recomputing = bool(runs)
      runs.append(True)
      with (_moving_statistics_kept(self) if recomputing
            else contextlib.nullcontext()):
        return fn(inputs, training)

    return tf.recompute_grad(recomputable)(x)

  def call(self, inputs, training=None) -> Dict[str, tf.Tensor]:
    x = self._segment(self._stem, [self.stem_conv, self.stem_norm], inputs,
                      training)
    features = {}
    for level, blocks in enumerate(self.stages, 2):
      x = self._segment(functools.partial(self._run_stage, blocks), blocks, x,
                        training)
      features[str(level)] = x
    return features

  def get_config(self):
    return dict(self._config, name=self.name)

  @classmethod
  def from_config(cls, config, custom_objects=None):
    return cls(**config)
