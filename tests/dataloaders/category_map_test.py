"""Tests for CategoryMap."""
import megdet_tf  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TF)
import numpy as np
import pytest
import tensorflow as tf

from megdet_tf.dataloaders.category_map import CategoryMap


def test_round_trip_with_gaps():
  cmap = CategoryMap([90, 1, 7, 3], ["z", "a", "c", "b"])
  assert cmap.num_classes == 5
  assert cmap.category_ids == (1, 3, 7, 90)
  assert cmap.name(7) == "c" and cmap.name(90) == "z"
  indices = cmap.to_index(tf.constant([1, 3, 7, 90, 2, 91, 0]))
  np.testing.assert_array_equal(indices, [1, 2, 3, 4, -1, -1, -1])
  np.testing.assert_array_equal(cmap.to_category_id(np.array([0, 1, 4])),
                                [0, 1, 90])
  np.testing.assert_array_equal(
      cmap.to_category_id(tf.constant([[2, 3]])), [[3, 7]])


@pytest.mark.parametrize("ids", [[], [1, 1], [0, 2]])
def test_rejects_bad_ids(ids):
  with pytest.raises(ValueError, match="category_ids"):
    CategoryMap(ids)


def test_rejects_names_of_wrong_length():
  with pytest.raises(ValueError, match="category_names"):
    CategoryMap([1, 2], ["a"])
