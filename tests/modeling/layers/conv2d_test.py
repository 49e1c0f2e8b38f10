"""Tests of Conv2D: Keras' convolution, pointwise ones as a matmul."""
import megdet_tf  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TF)
import numpy as np
import pytest
import tensorflow as tf

from megdet_tf.modeling.layers import Conv2D


def _pair(channels=5, **kwargs):
  """Keras' Conv2D and ours with the same weights, built for `channels`."""
  keras = tf.keras.layers.Conv2D(**kwargs)
  ours = Conv2D(**kwargs)
  for layer in (keras, ours):
    layer.build([None, None, None, channels])
  ours.set_weights([np.random.default_rng(0).normal(size=w.shape)
                    for w in keras.get_weights()])
  keras.set_weights(ours.get_weights())
  return keras, ours


def _output_and_gradients(layer, x):
  """Output and gradients w.r.t. the input and every weight, traced."""

  @tf.function
  def run(x):
    with tf.GradientTape() as tape:
      tape.watch(x)
      y = layer(x)
      loss = tf.reduce_sum(tf.cast(y, tf.float32) ** 2)
    return y, tape.gradient(loss, [x] + layer.trainable_weights)

  return run(x), run.get_concrete_function(x).graph


def _op_types(graph):
  return {op.type for op in graph.get_operations()}


@pytest.mark.parametrize("use_bias", [False, True])
@pytest.mark.parametrize("padding", ["same", "valid"])
def test_pointwise_conv_is_a_matmul_with_keras_results(use_bias, padding):
  keras, ours = _pair(filters=7, kernel_size=1, use_bias=use_bias,
                      padding=padding)
  x = tf.random.stateless_normal([3, 6, 4, 5], seed=[0, 1])
  (expected, expected_grads), keras_graph = _output_and_gradients(keras, x)
  (output, grads), graph = _output_and_gradients(ours, x)
  assert ours.is_pointwise
  assert "Conv2D" in _op_types(keras_graph)
  assert "MatMul" in _op_types(graph) and not {
      "Conv2D", "Conv2DBackpropInput", "Conv2DBackpropFilter"} & _op_types(
          graph)
  assert output.shape == expected.shape == (3, 6, 4, 7)
  np.testing.assert_allclose(output, expected, rtol=1e-5, atol=1e-5)
  assert len(grads) == len(expected_grads) == 2 + use_bias
  for grad, expected_grad in zip(grads, expected_grads):
    assert grad.shape == expected_grad.shape
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-4, atol=1e-4)


def test_pointwise_conv_under_mixed_bfloat16_and_unknown_shapes():
  tf.keras.mixed_precision.set_global_policy("mixed_bfloat16")
  try:
    keras, ours = _pair(filters=7, kernel_size=1)
  finally:
    tf.keras.mixed_precision.set_global_policy("float32")
  run = lambda layer: tf.function(layer, input_signature=[
      tf.TensorSpec([None, None, None, 5], tf.bfloat16)])
  x = tf.cast(tf.random.stateless_normal([2, 9, 3, 5], seed=[2, 3]),
              tf.bfloat16)
  output, expected = run(ours)(x), run(keras)(x)
  assert output.dtype == tf.bfloat16 and ours.kernel.dtype == tf.float32
  assert output.shape == (2, 9, 3, 7)
  np.testing.assert_allclose(tf.cast(output, tf.float32),
                             tf.cast(expected, tf.float32), rtol=2e-2,
                             atol=2e-2)


@pytest.mark.parametrize("padding", ["same", "valid"])
@pytest.mark.parametrize("strides", [2, (2, 3)])
def test_strided_pointwise_conv_over_few_channels_avoids_onednn(strides,
                                                                padding):
  """oneDNN's weight gradient of this conv corrupts the heap: not run, so
  the reference is NumPy's."""
  keras, ours = _pair(channels=8, filters=16, kernel_size=1, strides=strides,
                      padding=padding)
  x = tf.random.stateless_normal([1, 9, 7, 8], seed=[6, 7])
  (output, grads), graph = _output_and_gradients(ours, x)
  assert not {"Conv2D", "Conv2DBackpropInput", "Conv2DBackpropFilter"} & (
      _op_types(graph))
  # Keras' forward pass is safe.
  np.testing.assert_allclose(output, keras(x), rtol=1e-5, atol=1e-5)
  sh, sw = ours.strides
  kernel, bias = (w.numpy() for w in ours.weights)
  subsampled = x.numpy()[:, ::sh, ::sw]
  expected = subsampled @ kernel[0, 0] + bias
  dy = 2 * expected  # Of the loss, sum(y ** 2).
  dx = np.zeros(x.shape, np.float32)
  dx[:, ::sh, ::sw] = dy @ kernel[0, 0].T
  expected_grads = [dx, np.einsum("bhwc,bhwo->co", subsampled, dy)[None, None],
                    dy.sum(axis=(0, 1, 2))]
  np.testing.assert_allclose(output, expected, rtol=1e-5, atol=1e-5)
  for grad, expected_grad in zip(grads, expected_grads):
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kwargs", [
    dict(kernel_size=3, padding="same"),
    dict(kernel_size=1, strides=2, channels=16),
    dict(kernel_size=1, dilation_rate=2),
])
def test_other_convs_are_keras_own(kwargs):
  channels = kwargs.get("channels", 5)
  keras, ours = _pair(filters=4, **kwargs)
  x = tf.random.stateless_normal([2, 8, 8, channels], seed=[4, 5])
  (expected, expected_grads), _ = _output_and_gradients(keras, x)
  (output, grads), graph = _output_and_gradients(ours, x)
  assert not ours.is_pointwise
  assert "Conv2D" in _op_types(graph) and "MatMul" not in _op_types(graph)
  np.testing.assert_allclose(output, expected, rtol=1e-5, atol=1e-5)
  for grad, expected_grad in zip(grads, expected_grads):
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-4, atol=1e-4)


def test_weights_and_config_are_keras_conv2ds(tmp_path):
  keras, ours = _pair(filters=7, kernel_size=1, name="lateral")
  assert [w.shape for w in ours.weights] == [(1, 1, 5, 7), (7,)]
  assert [w.name for w in ours.weights] == [w.name for w in keras.weights]
  # A checkpoint written from Keras' layer restores into ours.
  path = tf.train.Checkpoint(layer=keras).write(str(tmp_path / "ckpt"))
  restored = Conv2D(filters=7, kernel_size=1)
  restored.build([None, None, None, 5])
  tf.train.Checkpoint(layer=restored).read(path).assert_consumed()
  np.testing.assert_array_equal(restored.kernel, keras.kernel)
  config = ours.get_config()
  clone = tf.keras.layers.deserialize(tf.keras.layers.serialize(ours))
  assert type(clone) is Conv2D and clone.get_config() == config
