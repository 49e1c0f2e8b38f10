"""CrossReplicaBatchNormalization on 8 logical CPU replicas (MirroredStrategy;
tests/conftest.py splits the CPU)."""
import collections
import os
import sys

import numpy as np
import pytest
import tensorflow as tf

from megdet_tf.modeling import layers
from megdet_tf.ops import group_exchange
from megdet_tf.ops import group_norm_kernels

sys.path.insert(0, os.path.dirname(__file__))
import _cgbn_check  # noqa: E402  pylint: disable=wrong-import-position

NUM_REPLICAS = 8
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def strategy():
  return tf.distribute.MirroredStrategy(
      [f"/cpu:{i}" for i in range(NUM_REPLICAS)])


@pytest.fixture(params=["compiled", "fused"])
def kernel_path(request, monkeypatch):
  """CGBN on its compiled CPU kernels, or on TensorFlow's fused ones only."""
  if request.param == "fused":
    monkeypatch.setattr(group_norm_kernels, "load", lambda: None)
  elif group_norm_kernels.load() is None:
    pytest.fail("megdet_tf.ops.group_norm_kernels did not build (see the "
                "warning logged)")
  return request.param


def _assert_close(errors, tolerance=TOLERANCE):
  assert errors and max(errors.values()) <= tolerance, errors


@pytest.mark.parametrize("group_size,spatial", [
    (1, (3, 2)), (2, (3, 2)), (4, (3, 2)), (8, (3, 2)), (None, (3, 2)),
    (1, ()), (4, ())])  # Images, and [N, C] features (reshaped inside).
@pytest.mark.parametrize("exchange", ["auto", "collective"])
def test_matches_bn_on_each_groups_concatenated_batch(strategy, group_size,
                                                      spatial, exchange,
                                                      kernel_path):
  inputs = _cgbn_check.make_inputs(NUM_REPLICAS, spatial=spatial)
  result, step, _ = _cgbn_check.run_step(strategy, group_size, *inputs,
                                         exchange=exchange)
  # None = the local worker's replicas = all 8 under MirroredStrategy.
  expected = _cgbn_check.reference(group_size or NUM_REPLICAS, *inputs)
  _assert_close(_cgbn_check.max_errors(result, expected,
                                       range(NUM_REPLICAS)))
  # Statistics, gradient sums and dx by the compiled kernels, on each replica.
  assert _cgbn_check.kernel_ops(step) == (
      [] if group_size == 1 or kernel_path == "fused" else
      ["MegdetChannelGradSums"] * NUM_REPLICAS +
      ["MegdetChannelMoments"] * NUM_REPLICAS +
      ["MegdetGroupNormGrad"] * NUM_REPLICAS)
  # CPU replicas of one process share rows inside the graph by default; with
  # collectives, per replica one all-gather forward and one all-reduce
  # backward, both over the group only. Per-replica BN shares nothing.
  collectives = _cgbn_check.bn_collectives(step)
  if group_size == 1 or exchange == "auto":
    assert not collectives
  else:
    assert sorted(op_type for op_type, *_ in collectives) == (
        ["CollectiveGatherV2"] * NUM_REPLICAS +
        ["CollectiveReduceV2"] * NUM_REPLICAS)
    assert {size for _, size, *_ in collectives} == {
        group_size or NUM_REPLICAS}


def test_a_devices_collectives_are_ordered_on_one_chain(strategy):
  """BN group collectives take the ordering token of the strategy's own
  (here the gradient all-reduce): each device runs them all in one program
  order, which NCCL's single stream per GPU needs against deadlocks."""
  batches, upstream, gamma, beta = _cgbn_check.make_inputs(NUM_REPLICAS,
                                                           seed=6)
  layer, x, w = _cgbn_check.make_layer(strategy, 4, batches, upstream, gamma,
                                       beta, exchange="collective")

  def replica_step(x, w):
    with tf.GradientTape() as tape:
      loss = tf.reduce_sum(layer(x, training=True) * w)
    grads = tape.gradient(loss, [layer.gamma, layer.beta])
    return tf.distribute.get_replica_context().all_reduce("sum", grads)

  step = tf.function(lambda x, w: strategy.run(replica_step, args=(x, w)))
  dgamma, dbeta = step(x, w)
  expected = _cgbn_check.reference(4, batches, upstream, gamma, beta)
  for got, key in ((dgamma, "dgamma"), (dbeta, "dbeta")):
    for value in strategy.experimental_local_results(got):
      np.testing.assert_allclose(value, np.sum(expected[key], axis=0),
                                 atol=1e-4)

  tokens, kinds = collections.defaultdict(set), collections.defaultdict(set)
  for op in step.get_concrete_function(x, w).graph.get_operations():
    if op.type in ("CollectiveGatherV2", "CollectiveReduceV2"):
      is_bn = (int(tf.get_static_value(op.inputs[2])) >=
               group_exchange.GROUP_KEY_BASE)
      kinds[op.device].add("bn" if is_bn else "strategy")
      tokens[op.device].update(t.name for t in op.inputs
                               if t.dtype == tf.resource)
  assert len(kinds) == NUM_REPLICAS
  assert all(k == {"bn", "strategy"} for k in kinds.values()), kinds
  assert all(len(t) == 1 for t in tokens.values()), tokens


def test_eager_replicas_match_bn(strategy):
  inputs = _cgbn_check.make_inputs(NUM_REPLICAS, seed=1)
  result, _, _ = _cgbn_check.run_step(strategy, 4, *inputs, eager=True)
  expected = _cgbn_check.reference(4, *inputs)
  _assert_close(_cgbn_check.max_errors(result, expected,
                                       range(NUM_REPLICAS)))


@pytest.mark.parametrize("group_size", [3, 16])
def test_group_size_must_divide_replicas_at_build(strategy, group_size):
  with strategy.scope():
    layer = layers.CrossReplicaBatchNormalization(group_size=group_size)
    with pytest.raises(ValueError, match="must divide the 8 replicas"):
      layer.build((None, 4))


@pytest.mark.parametrize("group_size", [0, 2.0, -1])
def test_group_size_must_be_positive_int(group_size):
  with pytest.raises(ValueError, match="group_size"):
    layers.CrossReplicaBatchNormalization(group_size=group_size)


def test_exchange_must_be_known():
  with pytest.raises(ValueError, match="exchange must be one of"):
    layers.CrossReplicaBatchNormalization(exchange="nccl")


@pytest.mark.parametrize("option", [dict(renorm=True),
                                    dict(virtual_batch_size=2)])
def test_options_that_cannot_share_groups_are_refused(option):
  with pytest.raises(ValueError, match="cannot be combined"):
    layers.CrossReplicaBatchNormalization(**option)


@pytest.mark.parametrize("case, message", [
    ("mask", "masks are not supported"),
    ("channels_first", "only the last axis"),
    ("float64", "float64 is not supported"),
])
def test_what_training_across_replicas_refuses(strategy, case, message):
  shape = (2, 3, 4)
  with strategy.scope():
    layer = layers.CrossReplicaBatchNormalization(
        group_size=2, axis=1 if case == "channels_first" else -1,
        dtype="float64" if case == "float64" else None)
    layer.build((None,) + shape[1:])
  mask = tf.ones(shape[:2], tf.bool) if case == "mask" else None
  step = tf.function(lambda: strategy.run(
      lambda: layer(tf.ones(shape), training=True, mask=mask)))
  with pytest.raises(ValueError, match=f"{layer.name}: training across "
                     f"replicas: {message}"):
    step()


@pytest.mark.parametrize("use_strategy", [False, True])
def test_single_replica_is_plain_bn(use_strategy):
  rng = np.random.default_rng(2)
  x = tf.constant(rng.normal(1.0, 2.0, (5, 3, 4)).astype(np.float32))
  mask = tf.constant(rng.uniform(size=(5, 3)) > 0.3)
  one_device = tf.distribute.OneDeviceStrategy("/cpu:0")
  with one_device.scope() if use_strategy else tf.init_scope():
    # group_size is moot with one replica (e.g. exporting a CGBN model).
    layer = layers.CrossReplicaBatchNormalization(group_size=4, momentum=0.5)
    plain = tf.keras.layers.BatchNormalization(fused=False, momentum=0.5)

  def both(mask_value, training):
    with tf.GradientTape(persistent=True) as tape:
      tape.watch(x)
      got = layer(x, training=training, mask=mask_value)
      want = plain(x, training=training, mask=mask_value)
    return got, want, tape.gradient(got, x), tape.gradient(want, x)

  for mask_value in (None, mask):
    for training in (True, False):
      args = (mask_value, training)
      got, want, got_dx, want_dx = (
          one_device.run(both, args) if use_strategy else both(*args))
      np.testing.assert_allclose(got, want, atol=TOLERANCE)
      np.testing.assert_allclose(got_dx, want_dx, atol=TOLERANCE)
      np.testing.assert_allclose(layer.moving_variance, plain.moving_variance,
                                 atol=TOLERANCE)
      np.testing.assert_allclose(layer.moving_mean, plain.moving_mean,
                                 atol=TOLERANCE)
  assert np.abs(layer.moving_mean.numpy()).max() > 0.1  # Stats were updated.


@pytest.mark.usefixtures("kernel_path")
def test_large_mean_matches_float64_reference(strategy):
  # Mean 1e4, unit variance: E[x^2] - E[x]^2 in float32 would be off by ~1.
  # Each replica's float32 mean is rounded at ~1e-3 here, which reaches the
  # merged variance to first order (~1e-4 relative; see the layer).
  batches, upstream, gamma, beta = _cgbn_check.make_inputs(
      NUM_REPLICAS, seed=3, mean=1e4, std=1.0)
  result, _, _ = _cgbn_check.run_step(strategy, 4, batches, upstream, gamma,
                                      beta)
  momentum = _cgbn_check.MOMENTUM
  for r in range(NUM_REPLICAS):
    group = np.concatenate(batches[r // 4 * 4:r // 4 * 4 + 4]).astype(
        np.float64)
    mean, variance = group.mean(axis=(0, 1, 2)), group.var(axis=(0, 1, 2))
    np.testing.assert_allclose(result["moving_variance"][r],
                               momentum + (1 - momentum) * variance,
                               rtol=0, atol=(1 - momentum) * 1e-3)
    np.testing.assert_allclose(result["moving_mean"][r],
                               (1 - momentum) * mean, rtol=1e-6)
    y = gamma * (batches[r] - mean) / np.sqrt(
        variance + _cgbn_check.EPSILON) + beta
    # Float32 normalization of values near 1e4 rounds at ~1e-3.
    np.testing.assert_allclose(result["y"][r], y, rtol=0, atol=1e-2)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
@pytest.mark.usefixtures("kernel_path")
def test_16_bit_inputs_keep_float32_statistics(strategy, policy):
  batches, upstream, gamma, beta = _cgbn_check.make_inputs(NUM_REPLICAS,
                                                           seed=4)
  compute_dtype = tf.keras.mixed_precision.Policy(policy).compute_dtype
  # The reference sees exactly the 16-bit values the layer sees.
  rounded = [tf.cast(tf.cast(b, compute_dtype), tf.float32).numpy()
             for b in batches]
  result, _, _ = _cgbn_check.run_step(strategy, 4, rounded, upstream, gamma,
                                      beta, dtype=policy)
  expected = _cgbn_check.reference(4, rounded, upstream, gamma, beta)
  errors = _cgbn_check.max_errors(result, expected, range(NUM_REPLICAS))
  assert result["y"][0].dtype == compute_dtype
  assert result["moving_mean"][0].dtype == np.float32
  # Statistics and their updates are float32-exact; outputs and input
  # gradients carry the 16-bit rounding.
  _assert_close({k: v for k, v in errors.items() if "moving" in k})
  eps = float(np.finfo(np.float16).eps) if policy == "mixed_float16" else 2**-7
  for key in ("y", "dx", "dgamma"):
    scale = max(np.abs(v).max() for v in expected[key] if v.size)
    assert errors[key] <= 8 * eps * scale, (key, errors[key], scale)


def test_checkpoint_and_keras_round_trip(strategy, tmp_path):
  inputs = _cgbn_check.make_inputs(NUM_REPLICAS, seed=5)
  result, _, layer = _cgbn_check.run_step(strategy, 2, *inputs)
  groups_differ = np.ptp(np.stack(result["moving_mean"]), axis=0)
  assert groups_differ.max() > 0.1  # The check below means something.

  config = layer.get_config()
  assert config["group_size"] == 2
  clone = layers.CrossReplicaBatchNormalization.from_config(config)
  assert clone.get_config() == config
  revived = tf.keras.layers.deserialize(tf.keras.layers.serialize(layer))
  assert isinstance(revived, layers.CrossReplicaBatchNormalization)
  assert revived.group_size == 2

  # The checkpoint holds the mean over groups; a one-device restore uses it.
  path = tf.train.Checkpoint(layer=layer).write(str(tmp_path / "ckpt"))
  restored = layers.CrossReplicaBatchNormalization.from_config(config)
  restored.build((None,) + _cgbn_check.SPATIAL + (_cgbn_check.CHANNELS,))
  tf.train.Checkpoint(layer=restored).read(path).assert_consumed()
  np.testing.assert_allclose(restored.moving_mean,
                             np.mean(result["moving_mean"], axis=0),
                             atol=TOLERANCE)
  np.testing.assert_allclose(restored.moving_variance,
                             np.mean(result["moving_variance"], axis=0),
                             atol=TOLERANCE)

  # A Keras model with the layer saves and loads with its class and weights.
  x = inputs[0][0]
  model = tf.keras.Sequential([tf.keras.Input(x.shape[1:]), restored])
  model.save(tmp_path / "model.keras")
  loaded = tf.keras.models.load_model(tmp_path / "model.keras")
  assert isinstance(loaded.layers[0], layers.CrossReplicaBatchNormalization)
  assert loaded.layers[0].group_size == 2
  np.testing.assert_allclose(loaded(x, training=False),
                             model(x, training=False), atol=TOLERANCE)
