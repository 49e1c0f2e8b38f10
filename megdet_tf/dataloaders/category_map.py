"""Dataset category ids <-> the detector's contiguous class indices.

COCO's 80 categories carry ids 1..90 with gaps; the detector wants classes
1..K with 0 for background. The map is built from the dataset's id list
(`gin/data/*.gin`), used by the input parser on the way in and by the
evaluator, exporter and predictor on the way out.
"""
from typing import Sequence

import gin
import numpy as np
import tensorflow as tf


@gin.configurable
class CategoryMap:
  """Bidirectional map between category ids and class indices 1..K."""

  def __init__(self, category_ids: Sequence[int] = gin.REQUIRED,
               category_names: Sequence[str] = ()):
    ids = [int(i) for i in category_ids]
    if not ids or len(set(ids)) != len(ids) or min(ids) < 1:
      raise ValueError(
          f"CategoryMap.category_ids must be distinct positive ids, got {ids}")
    if category_names and len(category_names) != len(ids):
      raise ValueError(
          f"CategoryMap.category_names has {len(category_names)} names for "
          f"{len(ids)} category ids")
    self.category_ids = tuple(sorted(ids))
    order = np.argsort(ids)
    self.category_names = tuple(category_names[i] for i in order) if (
        category_names) else tuple(str(i) for i in self.category_ids)
    # index -> id, with index 0 (background) mapped to 0.
    self._index_to_id = np.array((0,) + self.category_ids, np.int64)
    # id -> index, with unknown ids mapped to -1.
    self._id_to_index = np.full(max(ids) + 1, -1, np.int64)
    self._id_to_index[list(self.category_ids)] = np.arange(1, len(ids) + 1)

  @property
  def num_classes(self) -> int:
    """Number of detector classes, background included."""
    return len(self.category_ids) + 1

  def to_index(self, category_ids: tf.Tensor) -> tf.Tensor:
    """Maps category ids to class indices; ids not in the map become -1."""
    ids = tf.cast(category_ids, tf.int64)
    table = tf.constant(self._id_to_index)
    in_range = (ids >= 0) & (ids < tf.size(table, out_type=tf.int64))
    return tf.where(in_range,
                    tf.gather(table, tf.clip_by_value(
                        ids, 0, tf.size(table, out_type=tf.int64) - 1)),
                    tf.constant(-1, tf.int64))

  def to_category_id(self, class_indices):
    """Maps class indices (tensor or array) back to category ids."""
    if isinstance(class_indices, (tf.Tensor, tf.Variable)):
      return tf.gather(tf.constant(self._index_to_id),
                       tf.cast(class_indices, tf.int64))
    return self._index_to_id[np.asarray(class_indices, np.int64)]

  def name(self, category_id: int) -> str:
    return self.category_names[self.category_ids.index(int(category_id))]
