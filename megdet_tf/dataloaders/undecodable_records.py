"""Decodes TF Examples, skipping and counting those that do not decode.

A corrupt image (in shards written before the converter decoded every image,
or damaged since) fails `tf.io.decode_image` when the input pipeline reaches
it, which stops training at that step. A graph can't catch that error, and
`Dataset.ignore_errors` on the pipeline drops the element without a trace.
So each record is decoded in a dataset of its own, with errors ignored and a
placeholder flagged as failed after it; the first element of that is the
decoded example or, for a bad record, the flag. Failures are seen in order,
without decoding twice, and good records keep their order.

A skipped record is logged and counted once (it comes back every epoch);
more than `max_skipped` distinct ones stop the pipeline with an error that
says what to do.
"""
from typing import Callable

from absl import logging
from google.protobuf import message
import numpy as np
import tensorflow as tf


def _source_id(record: bytes) -> str:
  """The record's `image/source_id`, to name it in the log."""
  try:
    feature = tf.train.Example.FromString(record).features.feature
    return feature["image/source_id"].bytes_list.value[0].decode()
  except (message.DecodeError, IndexError, UnicodeDecodeError):
    return "unreadable"


class UndecodableRecords:
  """Decodes serialized examples; leaves out and counts the ones that fail."""

  def __init__(self, decode_fn: Callable, file_pattern: str, max_skipped: int):
    """Initializes the decoder.

    Args:
      decode_fn: serialized tf.Example -> dict of tensors.
      file_pattern: the records' files, named in the log and the error.
      max_skipped: distinct records skipped before the error.
    """
    self._decode_fn = decode_fn
    self._file_pattern = file_pattern
    self._max_skipped = max_skipped
    self._skipped = set()  # hash() of each skipped record.

  @property
  def count(self) -> int:
    """Distinct records skipped so far, over every dataset built here."""
    return len(self._skipped)

  def decode(self, records: tf.data.Dataset,
             num_parallel_calls=None) -> tf.data.Dataset:
    """The decoded examples of `records`, in order, the bad ones left out."""
    flagged = records.interleave(self._decode_or_flag,
                                 num_parallel_calls=num_parallel_calls)
    return flagged.filter(self._keep).map(lambda data, ok, record: data)

  def _decode_or_flag(self, record: tf.Tensor) -> tf.data.Dataset:
    decoded = tf.data.Dataset.from_tensors(record).map(
        lambda r: (self._decode_fn(r), True, r)).ignore_errors()
    placeholder = tf.nest.map_structure(
        lambda spec: tf.zeros([d or 0 for d in spec.shape], spec.dtype),
        decoded.element_spec[0])
    return decoded.concatenate(tf.data.Dataset.from_tensors(
        (placeholder, False, record))).take(1)

  def _keep(self, data, ok, record) -> tf.Tensor:
    del data
    return tf.cond(ok, lambda: ok, lambda: tf.reshape(
        tf.numpy_function(self._skip, [record], tf.bool), []))

  def _skip(self, record: bytes) -> np.bool_:
    if hash(record) not in self._skipped:
      self._skipped.add(hash(record))
      logging.warning(
          "Skipped a record of %s that does not decode (image/source_id %s), "
          "%d so far. Re-run tools/create_coco_tfrecord.py, which lists the "
          "images that do not decode.", self._file_pattern,
          _source_id(record), self.count)
    if self.count > self._max_skipped:
      raise ValueError(
          f"{self.count} records of {self._file_pattern} do not decode, more "
          f"than InputReader.max_skipped_records={self._max_skipped}: the "
          "shards hold corrupt images. Re-run tools/create_coco_tfrecord.py, "
          "which decodes every image and lists those that fail, or raise "
          "max_skipped_records.")
    return np.False_
