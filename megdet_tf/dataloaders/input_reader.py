"""The tf.data pipeline: TFRecord shards -> decoded -> parsed -> batched.

One `InputReader` per split (Gin scopes `train/` and `eval/`). Under a
`tf.distribute` strategy, `distribute(strategy)` builds one pipeline per
worker through `distribute_datasets_from_function`: each worker reads a
disjoint set of shards (or, with fewer shards than workers, every
`num_input_pipelines`-th record), so each example is seen exactly once per
epoch across workers, and batches per replica.

Bad data is found as early as it can be: `check_files` reads every shard
through before training, and a record whose image does not decode is skipped
and counted (`skipped_records`) rather than stopping a long run at that
step; past `max_skipped_records` the input stops with an error.
"""
from typing import Optional

import gin
import tensorflow as tf

from official.vision.dataloaders import tf_example_decoder

from megdet_tf.dataloaders import coco_tfrecord
from megdet_tf.dataloaders.detection_parser import DetectionParser
from megdet_tf.dataloaders.undecodable_records import UndecodableRecords


@gin.configurable
class InputReader:
  """Builds the training or evaluation dataset of one split."""

  def __init__(self,
               file_pattern: str = gin.REQUIRED,
               global_batch_size: int = gin.REQUIRED,
               is_training: bool = True,
               parser: Optional[DetectionParser] = None,
               drop_images_without_boxes: bool = True,
               shuffle_buffer_size: int = 1000,
               cycle_length: int = 8,
               deterministic: bool = False,
               seed: Optional[int] = None,
               cache_decoded: bool = False,
               max_skipped_records: int = 100,
               missing_data_help: str = (
                   "Convert the dataset first with "
                   "tools/create_coco_tfrecord.py (see README).")):
    """Initializes the reader.

    Args:
      file_pattern: glob of TFRecord shards (comma-separated for several).
      global_batch_size: images per step over all replicas.
      is_training: shuffle, repeat, augment and drop the last partial batch.
      parser: `DetectionParser`; Gin's if None.
      drop_images_without_boxes: skip training images with no non-crowd box.
      shuffle_buffer_size: examples in the training shuffle buffer.
      cycle_length: shards read in parallel.
      deterministic: same elements in the same order on every run (for tests
        and reproducible runs); slower, parsing runs sequentially. Random
        augmentation repeats when `DetectionParser.seed` is set too, and a run
        resumed at step s reads what an uninterrupted run would have.
      seed: shuffle seed; required with `deterministic` in training.
      cache_decoded: keep decoded examples in memory after the first epoch
        (small datasets such as the demo).
      max_skipped_records: records that do not decode (corrupt images) are
        skipped, logged and counted, each once however many epochs read it;
        more than this many stop the input with an error, as the shards are
        then worth re-creating.
      missing_data_help: what to do when no file matches (data Gin files say
        where their dataset is expected and how to make it).
    """
    if deterministic and is_training and seed is None:
      raise ValueError("InputReader.deterministic training needs a seed")
    self.file_pattern = file_pattern
    self.global_batch_size = global_batch_size
    self.is_training = is_training
    self.parser = parser or DetectionParser()
    self._drop_images_without_boxes = drop_images_without_boxes
    self._shuffle_buffer_size = shuffle_buffer_size
    self._cycle_length = cycle_length
    self._deterministic = deterministic
    self._seed = seed
    self._cache_decoded = cache_decoded
    self._missing_data_help = missing_data_help
    self._decoder = UndecodableRecords(
        tf_example_decoder.TfExampleDecoder().decode, file_pattern,
        max_skipped_records)

  def files(self) -> list:
    """The shard paths, sorted; a clear error when none match."""
    paths = sorted(path for pattern in self.file_pattern.split(",")
                   for path in tf.io.gfile.glob(pattern.strip()))
    if not paths:
      raise FileNotFoundError(
          f"No TFRecord files match InputReader.file_pattern="
          f"{self.file_pattern!r}. {self._missing_data_help}")
    return paths

  @property
  def skipped_records(self) -> int:
    """Records left out because they do not decode (each counted once)."""
    return self._decoder.count

  def check_files(self) -> list:
    """`files()`, each checked to be a whole TFRecord of TF Examples.

    Reads every record (their checksums too), parses the first, and checks
    that the records fill the file: a shard cut short, by an interrupted
    copy for instance, fails here and not when training reaches its end.
    Costs one read of the files (page cache or disk speed). Doesn't start TensorFlow's device runtime, so it can run
    before a strategy splits the CPU into logical devices.
    """
    paths = self.files()
    for path in paths:
      name = (f"{path} (matched by InputReader.file_pattern="
              f"{self.file_pattern!r})")
      if path.endswith(coco_tfrecord.PARTIAL_SUFFIX):
        raise ValueError(
            f"{name} is a shard of an interrupted conversion. Re-run "
            "tools/create_coco_tfrecord.py, or match only *.tfrecord files.")
      size, num_records = 0, 0
      try:
        for record in tf.compat.v1.io.tf_record_iterator(path):
          if not num_records:
            tf.train.Example.FromString(record)
          # Length (8 bytes) and its CRC (4), the record, its CRC (4).
          size += len(record) + 16
          num_records += 1
      except (tf.errors.OpError, ValueError) as e:
        message = e.message if isinstance(e, tf.errors.OpError) else str(e)
        if num_records:
          raise ValueError(
              f"{name} is truncated or corrupt after {num_records} records: "
              f"{message}. Re-create it with tools/create_coco_tfrecord.py "
              "(or copy it again).") from None
        raise ValueError(
            f"{name} is not a TFRecord of TF Examples: {message}. Re-create "
            "it with tools/create_coco_tfrecord.py or fix the pattern."
        ) from None
      length = tf.io.gfile.stat(path).length
      if size != length:
        raise ValueError(
            f"{name} is truncated: its {num_records} whole records end at "
            f"byte {size} of {length}. Re-create it with "
            "tools/create_coco_tfrecord.py (or copy it again).")
    return paths

  def __call__(self, input_context: Optional[tf.distribute.InputContext] = None,
               start_step: int = 0) -> tf.data.Dataset:
    """The dataset of one input pipeline, batched per replica.

    Args:
      input_context: the strategy's, for sharding and per-replica batches.
      start_step: in deterministic training, skip the batches that steps
        0..start_step-1 consumed (resuming from a checkpoint).
    """
    batch_size = self.global_batch_size
    num_pipelines, pipeline_id, replicas_per_pipeline = 1, 0, 1
    if input_context:
      batch_size = input_context.get_per_replica_batch_size(batch_size)
      num_pipelines = input_context.num_input_pipelines
      pipeline_id = input_context.input_pipeline_id
      replicas_per_pipeline = (input_context.num_replicas_in_sync //
                               num_pipelines)
    parallel = None if self._deterministic else tf.data.AUTOTUNE

    files = self.files()
    shard_files = len(files) >= num_pipelines
    dataset = tf.data.Dataset.from_tensor_slices(files)
    if shard_files:
      dataset = dataset.shard(num_pipelines, pipeline_id)
    if self.is_training:
      dataset = dataset.shuffle(len(files), seed=self._seed)
    # Sharding records needs the same record order in every pipeline.
    dataset = dataset.interleave(
        tf.data.TFRecordDataset, cycle_length=self._cycle_length,
        num_parallel_calls=parallel or tf.data.AUTOTUNE,
        deterministic=self._deterministic or not shard_files or None)
    if not shard_files:
      dataset = dataset.shard(num_pipelines, pipeline_id)

    dataset = self._decoder.decode(dataset, parallel)
    if self.is_training and self._drop_images_without_boxes:
      dataset = dataset.filter(self.parser.has_boxes)
    if self._cache_decoded:
      dataset = dataset.cache()
    if self.is_training:
      dataset = dataset.shuffle(self._shuffle_buffer_size, seed=self._seed)
      dataset = dataset.repeat()
    dataset = dataset.map(self.parser.parse_fn(self.is_training),
                          num_parallel_calls=parallel)
    dataset = dataset.batch(batch_size, drop_remainder=self.is_training,
                            num_parallel_calls=parallel)
    if self._deterministic and start_step:
      dataset = dataset.skip(start_step * replicas_per_pipeline)
    options = tf.data.Options()
    options.deterministic = self._deterministic
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.OFF)
    return dataset.with_options(options).prefetch(tf.data.AUTOTUNE)

  def distribute(self, strategy: tf.distribute.Strategy, start_step: int = 0):
    """Per-replica batches for `strategy` (one pipeline per worker)."""
    return strategy.distribute_datasets_from_function(
        lambda context: self(context, start_step))
