"""build_norm, FrozenBatchNormalization, bn_size and gin/norm/*.gin."""
import pathlib

import gin
import numpy as np
import pytest
import tensorflow as tf

from megdet_tf.modeling import layers

GIN_NORM = pathlib.Path(__file__).parents[3] / "gin" / "norm"


@pytest.mark.parametrize("norm, cls", [
    ("frozen", layers.FrozenBatchNormalization),
    ("bn", tf.keras.layers.BatchNormalization),
    ("cgbn", layers.CrossReplicaBatchNormalization),
])
def test_gin_file_selects_the_norm(norm, cls):
  gin.parse_config_file(str(GIN_NORM / f"{norm}.gin"))
  layer = layers.build_norm(name="stem_bn", gamma_initializer="zeros")
  assert type(layer) is cls  # pylint: disable=unidiomatic-typecheck
  assert (layer.name, layer.momentum, layer.epsilon) == ("stem_bn", 0.9, 1e-5)
  layer.build((None, 3))
  np.testing.assert_array_equal(layer.gamma, np.zeros(3))


def test_build_norm_passes_group_options_and_rejects_unknown_norms():
  norm = layers.build_norm("cgbn", group_size=4, exchange="collective")
  assert (norm.group_size, norm.exchange) == (4, "collective")
  with pytest.raises(ValueError, match="build_norm.norm"):
    layers.build_norm("group_norm")


def test_frozen_bn_uses_moving_statistics_and_never_trains():
  layer = layers.build_norm("frozen", moving_mean_initializer="ones",
                            moving_variance_initializer=tf.constant_initializer(
                                4.0), epsilon=0.0)
  layer.trainable = True  # Ignored.
  x = tf.constant([[1.0, 5.0], [3.0, -1.0]])
  y = layer(x, training=True)
  np.testing.assert_allclose(y, (x - 1.0) / 2.0)
  assert not layer.trainable_weights
  np.testing.assert_array_equal(layer.moving_mean, [1.0, 1.0])
  np.testing.assert_array_equal(layer.moving_variance, [4.0, 4.0])


def test_bn_size_follows_build_norm_bindings():
  # Unbound: build_norm's default norm, frozen, has no batch statistics.
  assert layers.bn_size(2, replicas_per_worker=8) == 0
  gin.parse_config_file(str(GIN_NORM / "bn.gin"))
  assert layers.bn_size(2, replicas_per_worker=8) == 2
  gin.parse_config_file(str(GIN_NORM / "cgbn.gin"))
  assert layers.bn_size(2, replicas_per_worker=8) == 16  # One worker's group.
  gin.parse_config("GROUP = 2\nbuild_norm.group_size = %GROUP")
  assert layers.bn_size(2, replicas_per_worker=8) == 4
  gin.bind_parameter("build_norm.norm", "batch")
  with pytest.raises(ValueError, match="build_norm.norm"):
    layers.bn_size(2)
