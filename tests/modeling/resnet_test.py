"""ResNet backbone: shapes, freezing, norm kinds, recomputation, config."""
import megdet_tf  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TF)
import gin
import numpy as np
import pytest
import tensorflow as tf

from megdet_tf.modeling.backbones import resnet
from megdet_tf.modeling.layers import normalization


def _images(batch=2, size=64, seed=0):
  return tf.random.stateless_normal([batch, size, size, 3], seed=[seed, 1])


@pytest.mark.parametrize("depth,width,channels", [
    (18, 0.25, (16, 32, 64, 128)),
    (34, 0.25, (16, 32, 64, 128)),
    (50, 0.25, (64, 128, 256, 512)),
    (101, 0.125, (32, 64, 128, 256)),
])
def test_outputs_c2_to_c5(depth, width, channels):
  model = resnet.ResNet(depth=depth, width_multiplier=width)
  features = model(_images(size=96), training=False)
  assert sorted(features) == ["2", "3", "4", "5"]
  for level, c in zip("2345", channels):
    stride = 2**int(level)
    assert features[level].shape == (2, 96 // stride, 96 // stride, c)
    assert features[level].dtype == tf.float32
  num_convs = sum(isinstance(l, tf.keras.layers.Conv2D)
                  for l in model._flatten_layers())
  blocks = sum(resnet.RESNET_SPECS[depth][1])
  per_block = 2 if depth < 50 else 3
  projections = 3 if depth < 50 else 4
  assert num_convs == 1 + per_block * blocks + projections


def test_odd_input_sizes_round_up():
  features = resnet.ResNet(depth=18, width_multiplier=0.25)(
      _images(size=65), training=False)
  assert [features[l].shape[1] for l in "2345"] == [17, 9, 5, 3]


@pytest.mark.parametrize("stride_in_1x1,strides", [(True, (2, 1)),
                                                    (False, (1, 2))])
def test_bottleneck_stride_placement(stride_in_1x1, strides):
  model = resnet.ResNet(depth=50, width_multiplier=0.25,
                        stride_in_1x1=stride_in_1x1)
  block = model.stages[1][0]  # conv3_block1, the first strided block.
  assert (block.convs[0].strides[0], block.convs[1].strides[0]) == strides
  assert block.shortcut_conv.strides[0] == 2


def test_names_follow_keras_applications():
  model = resnet.ResNet(depth=50, width_multiplier=0.25)
  model(_images(), training=False)
  names = {l.name for l in model._flatten_layers()}
  assert {"conv1_conv", "conv1_bn", "conv2_block1_0_conv", "conv2_block1_3_bn",
          "conv5_block3_2_conv"} <= names


@pytest.mark.parametrize("freeze_at,frozen_prefixes", [
    (0, ()), (1, ("conv1_",)), (2, ("conv1_", "conv2_")),
    (5, ("conv1_", "conv2_", "conv3_", "conv4_", "conv5_"))])
def test_freeze_at(freeze_at, frozen_prefixes):
  gin.bind_parameter("build_norm.norm", "bn")
  model = resnet.ResNet(depth=18, width_multiplier=0.25, freeze_at=freeze_at)
  model(_images(), training=False)
  trainable = {v.name for v in model.trainable_variables}
  for v in model.variables:
    layer = v.name.split("/")[-2]
    expect_trainable = (not layer.startswith(frozen_prefixes) and
                        "moving_" not in v.name)
    assert (v.name in trainable) == expect_trainable, v.name


def _train_step(model, images):
  with tf.GradientTape() as tape:
    features = model(images, training=True)
    loss = tf.add_n([tf.reduce_mean(tf.square(f)) for f in features.values()])
  grads = tape.gradient(loss, model.trainable_variables)
  tf.keras.optimizers.SGD(0.1).apply_gradients(
      zip(grads, model.trainable_variables))


def _moving_statistics(model):
  """Moving statistics by variable name without the model's unique prefix."""
  return {v.name.split("/", 1)[1]: v.numpy() for v in model.variables
          if "moving_" in v.name}


@pytest.mark.parametrize("norm", normalization.NORMS)
def test_norm_kinds_behave_as_named(norm):
  gin.bind_parameter("build_norm.norm", norm)
  model = resnet.ResNet(depth=18, width_multiplier=0.25, freeze_at=0)
  model(_images(), training=False)
  norms = [l for l in model._flatten_layers()
           if isinstance(l, tf.keras.layers.BatchNormalization)]
  assert len(norms) == 1 + 2 * 8 + 3
  assert all(type(n) is type(norms[0]) for n in norms)
  trainable_norm_variables = [
      v for v in model.trainable_variables if "_bn/" in v.name]
  before = _moving_statistics(model)
  _train_step(model, _images(seed=3) * 3.0 + 1.0)
  after = _moving_statistics(model)
  moved = [n for n in before if not np.array_equal(before[n], after[n])]
  if norm == "frozen":
    assert not trainable_norm_variables
    assert not moved
  else:
    assert len(trainable_norm_variables) == 2 * len(norms)  # gamma, beta.
    assert len(moved) == len(before)


def test_checkpoints_load_across_norm_kinds(tmp_path):
  models = {}
  for norm in normalization.NORMS:
    gin.bind_parameter("build_norm.norm", norm)
    models[norm] = resnet.ResNet(depth=18, width_multiplier=0.25)
    models[norm](_images(), training=False)
  for v in models["bn"].variables:
    v.assign(tf.random.uniform(v.shape, 0.5, 1.5))
  path = tf.train.Checkpoint(model=models["bn"]).write(str(tmp_path / "ckpt"))
  expected = models["bn"](_images(seed=5), training=False)
  for norm in ("frozen", "cgbn"):
    tf.train.Checkpoint(model=models[norm]).read(path).assert_consumed()
    got = models[norm](_images(seed=5), training=False)
    for level in expected:
      np.testing.assert_allclose(got[level], expected[level], rtol=1e-5,
                                 atol=1e-5)


def _gradients(recompute, norm, use_function):
  gin.bind_parameter("build_norm.norm", norm)
  tf.keras.utils.set_random_seed(0)
  model = resnet.ResNet(depth=18, width_multiplier=0.25, freeze_at=1,
                        recompute=recompute)
  model(_images(), training=False)

  def step(images):
    with tf.GradientTape() as tape:
      features = model(images, training=True)
      loss = tf.add_n([tf.reduce_sum(f * f) for f in features.values()])
    return loss, tape.gradient(loss, model.trainable_variables)

  step = tf.function(step) if use_function else step
  loss, grads = step(_images(seed=2))
  return loss, grads, _moving_statistics(model)


@pytest.mark.parametrize("use_function", [False, True])
@pytest.mark.parametrize("norm", ["frozen", "bn"])
def test_recompute_matches_gradients_and_statistics(norm, use_function):
  loss, grads, stats = _gradients(False, norm, use_function)
  loss_r, grads_r, stats_r = _gradients(True, norm, use_function)
  np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
  assert len(grads) == len(grads_r) > 0
  for g, g_r in zip(grads, grads_r):
    np.testing.assert_allclose(g_r, g, rtol=1e-4,
                               atol=1e-5 * float(tf.reduce_max(tf.abs(g))))
  # The recomputed forward pass must not update the moving averages again.
  for name in stats:
    np.testing.assert_allclose(stats_r[name], stats[name], rtol=1e-6)


def test_overlapping_recomputations_restore_the_momenta():
  """Replicas' recomputations overlap when merge_calls interleave them."""
  gin.bind_parameter("build_norm.norm", "bn")
  backbone = resnet.ResNet(depth=18, width_multiplier=0.125)
  backbone(_images(batch=1), training=True)
  norms = [l for l in backbone.submodules
           if isinstance(l, tf.keras.layers.BatchNormalization)]
  replica_0 = resnet._moving_statistics_kept(backbone)  # pylint: disable=protected-access
  replica_1 = resnet._moving_statistics_kept(backbone)  # pylint: disable=protected-access
  replica_0.__enter__()
  replica_1.__enter__()
  replica_0.__exit__(None, None, None)
  assert {n.momentum for n in norms} == {1.0}  # Replica 1 still recomputes.
  replica_1.__exit__(None, None, None)
  assert {n.momentum for n in norms} == {0.9}


def test_recompute_keeps_only_stage_inputs():
  """Recomputation lowers the step's peak memory.

  By 45-49% here with oneDNN's kernels, 36-43% with Eigen's
  (TF_ENABLE_ONEDNN_OPTS=0), whose convolution scratch buffers take more of
  the peak: at 128 px only 10-22% with Eigen's, so the images are 256 px.
  """
  gin.bind_parameter("build_norm.norm", "bn")
  images = _images(batch=2, size=256)
  peaks = {}
  for recompute in (False, True):
    model = resnet.ResNet(depth=50, width_multiplier=0.25, freeze_at=0,
                          recompute=recompute)
    model(images, training=False)

    @tf.function
    def step(x, model=model):
      with tf.GradientTape() as tape:
        features = model(x, training=True)
        loss = tf.add_n([tf.reduce_mean(f) for f in features.values()])
      return tape.gradient(loss, model.trainable_variables)

    step(images)  # Traces.
    tf.config.experimental.reset_memory_stats("CPU:0")
    base = tf.config.experimental.get_memory_info("CPU:0")["current"]
    step(images)
    peaks[recompute] = (
        tf.config.experimental.get_memory_info("CPU:0")["peak"] - base)
  assert peaks[True] < 0.8 * peaks[False], peaks


def test_get_config_round_trip():
  model = resnet.ResNet(depth=34, width_multiplier=0.5, stride_in_1x1=False,
                        freeze_at=1, recompute=True, name="backbone")
  config = model.get_config()
  clone = resnet.ResNet.from_config(config)
  assert clone.get_config() == config
  restored = tf.keras.layers.deserialize(tf.keras.layers.serialize(model))
  assert isinstance(restored, resnet.ResNet)
  assert restored.get_config() == config
  model(_images(), training=False)
  clone(_images(), training=False)
  assert ([(v.name.split("/", 1)[1], v.shape) for v in clone.variables] ==
          [(v.name.split("/", 1)[1], v.shape) for v in model.variables])


def test_bad_arguments():
  with pytest.raises(ValueError, match="depth"):
    resnet.ResNet(depth=42)
  with pytest.raises(ValueError, match="freeze_at"):
    resnet.ResNet(freeze_at=6)
