"""Group batch norm's compiled CPU kernels against float64 numpy."""
import logging
import os

import megdet_tf  # noqa: F401  (Keras 2 before TensorFlow)
import numpy as np
import pytest
import tensorflow as tf

from megdet_tf.ops import group_norm_kernels

# Rows not a multiple of the kernels' 256-row blocks, odd channel counts, and
# an empty batch (a replica's short last batch).
SHAPES = [(3, 17, 13, 5), (2, 8, 8, 64), (700, 3), (0, 4, 4, 3)]
# Relative accuracy of each input type's values.
DTYPES = {tf.float32: 1e-6, tf.bfloat16: 2**-8, tf.float16: 2**-11}


@pytest.fixture(scope="module")
def kernels():
  module = group_norm_kernels.load()
  if module is None:
    pytest.fail("megdet_tf.ops.group_norm_kernels did not build (see the "
                "warning logged)")
  return module


def _values(shape, dtype, seed, mean=0.0):
  """Random values of `dtype` and the same values in float64."""
  rng = np.random.default_rng(seed)
  values = tf.cast(mean + rng.normal(size=shape), dtype)
  return values, tf.cast(values, tf.float64).numpy()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_moments_are_the_channels_mean_and_squared_deviations(
    kernels, shape, dtype):
  x, exact = _values(shape, dtype, seed=0, mean=3.0)
  mean, m2 = kernels.megdet_channel_moments(x)
  rows = exact.reshape(-1, shape[-1])
  want_mean = rows.mean(0) if len(rows) else np.zeros(shape[-1])
  np.testing.assert_allclose(mean, want_mean, rtol=0, atol=1e-5)
  np.testing.assert_allclose(m2, ((rows - want_mean)**2).sum(0), rtol=1e-5,
                             atol=1e-5)


def test_moments_keep_unit_variance_at_mean_1e4(kernels):
  # Sums of squares minus squared sums would lose it to cancellation.
  x, exact = _values((4, 32, 32, 8), tf.float32, seed=1, mean=1e4)
  mean, m2 = kernels.megdet_channel_moments(x)
  rows = exact.reshape(-1, 8)
  np.testing.assert_allclose(mean, rows.mean(0), rtol=1e-7)
  np.testing.assert_allclose(m2 / len(rows), rows.var(0), rtol=1e-3)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_grad_sums_and_grad_match_their_formulas(kernels, shape, dtype):
  dy, dy_exact = _values(shape, dtype, seed=2)
  x, x_exact = _values(shape, dtype, seed=3, mean=2.0)
  rng = np.random.default_rng(4)
  mean, dy_scale, centered_scale, offset = (
      rng.normal(size=shape[-1]).astype(np.float32) for _ in range(4))
  sum_dy, sum_dy_centered = kernels.megdet_channel_grad_sums(dy, x, mean)
  rows = lambda a: a.reshape(-1, shape[-1])
  centered = x_exact - mean
  np.testing.assert_allclose(sum_dy, rows(dy_exact).sum(0), rtol=1e-5,
                             atol=1e-4)
  np.testing.assert_allclose(sum_dy_centered,
                             rows(dy_exact * centered).sum(0), rtol=1e-5,
                             atol=1e-4)

  dx = kernels.megdet_group_norm_grad(dy, x, mean, dy_scale, centered_scale,
                                      offset)
  assert dx.dtype == dtype and dx.shape == shape
  want = dy_scale * dy_exact + centered_scale * centered + offset
  np.testing.assert_allclose(tf.cast(dx, tf.float64), want, rtol=0,
                             atol=2 * DTYPES[dtype] * np.abs(want).max(initial=1))


def test_grad_ops_refuse_mismatched_shapes(kernels):
  with pytest.raises(tf.errors.InvalidArgumentError, match="shapes differ"):
    kernels.megdet_channel_grad_sums(tf.zeros([2, 3]), tf.zeros([3, 3]),
                                     tf.zeros([3]))
  with pytest.raises(tf.errors.InvalidArgumentError, match="C values"):
    kernels.megdet_group_norm_grad(tf.zeros([2, 3]), tf.zeros([2, 3]),
                                   tf.zeros([3]), tf.zeros([2]),
                                   tf.zeros([3]), tf.zeros([3]))


def test_build_is_cached_and_leaves_no_partial_files(kernels, tmp_path):
  del kernels  # Built once already; this builds into an empty cache.
  library = group_norm_kernels.build(cache_dir=str(tmp_path))
  built_at = os.stat(library).st_mtime_ns
  assert group_norm_kernels.build(cache_dir=str(tmp_path)) == library
  assert os.stat(library).st_mtime_ns == built_at
  assert os.listdir(tmp_path) == [os.path.basename(library)]


def test_build_failure_names_the_command(tmp_path):
  with pytest.raises(RuntimeError, match="no-such-compiler"):
    group_norm_kernels.build(compiler="no-such-compiler",
                             cache_dir=str(tmp_path))
  assert not os.listdir(tmp_path)  # No partial library left behind.


def test_load_without_a_compiler_warns_and_falls_back(monkeypatch, tmp_path,
                                                      caplog):
  monkeypatch.setenv("CXX", "no-such-compiler")
  monkeypatch.setenv("MEGDET_TF_CACHE", str(tmp_path))
  group_norm_kernels._load_once.cache_clear()  # pylint: disable=protected-access
  try:
    with caplog.at_level(logging.WARNING):
      assert group_norm_kernels.load() is None
  finally:
    group_norm_kernels._load_once.cache_clear()  # pylint: disable=protected-access
  assert "fused kernels" in caplog.text and "no-such-compiler" in caplog.text
