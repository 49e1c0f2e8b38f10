"""Tests for InputReader: sharding, batching and clear errors."""
import megdet_tf  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TF)
import numpy as np
import pytest
import tensorflow as tf

from official.vision.data import tf_example_builder

from megdet_tf.dataloaders.category_map import CategoryMap
from megdet_tf.dataloaders.detection_parser import DetectionParser
from megdet_tf.dataloaders.input_reader import InputReader
from megdet_tf.ops.anchor_spec import AnchorSpec

NUM_IMAGES = 10


def write_shards(directory, num_shards, truncated_image_id=None):
  """Writes NUM_IMAGES examples (source ids 1..N; image 5 has no box).

  With `truncated_image_id`, shard 0 ends with one more example, whose
  `image/encoded` is a JPEG cut in half.
  """
  writers = [tf.io.TFRecordWriter(str(directory / f"s-{i:05d}.tfrecord"))
             for i in range(num_shards)]
  rng = np.random.default_rng(0)
  for image_id in range(1, NUM_IMAGES + 1):
    builder = tf_example_builder.TfExampleBuilder()
    builder.add_image_matrix_feature(
        rng.integers(0, 255, (40, 60, 3), np.uint8), "PNG",
        str(image_id).encode())
    num_boxes = 0 if image_id == 5 else 2
    builder.add_boxes_feature([0.1] * num_boxes, [0.6] * num_boxes,
                              [0.2] * num_boxes, [0.9] * num_boxes,
                              [7] * num_boxes)
    writers[image_id % num_shards].write(builder.example.SerializeToString())
  if truncated_image_id is not None:
    builder = tf_example_builder.TfExampleBuilder()
    builder.add_image_matrix_feature(
        rng.integers(0, 255, (40, 60, 3), np.uint8), "JPEG",
        str(truncated_image_id).encode())
    builder.add_boxes_feature([0.1], [0.6], [0.2], [0.9], [7])
    example = builder.example
    encoded = example.features.feature["image/encoded"].bytes_list.value
    encoded[0] = encoded[0][:len(encoded[0]) // 2]
    writers[0].write(example.SerializeToString())
  for writer in writers:
    writer.close()
  return str(directory / "s-*.tfrecord")


def make_reader(pattern, **kwargs):
  parser = DetectionParser(category_map=CategoryMap([7]), short_side=32,
                           long_side=64, anchor_spec=AnchorSpec(max_level=4),
                           seed=kwargs.get("seed"))
  return InputReader(file_pattern=pattern, parser=parser, **kwargs)


def source_ids(dataset):
  return [int(i) for images, labels in dataset
          for i in labels["source_id"].numpy()]


@pytest.mark.parametrize("num_shards,num_pipelines", [(4, 2), (4, 4), (2, 3)])
def test_each_example_exactly_once_across_pipelines(tmp_path, num_shards,
                                                    num_pipelines):
  reader = make_reader(write_shards(tmp_path, num_shards), is_training=False,
                       global_batch_size=2 * num_pipelines)
  seen = []
  for pipeline_id in range(num_pipelines):
    context = tf.distribute.InputContext(num_pipelines, pipeline_id,
                                         num_replicas_in_sync=num_pipelines)
    seen += source_ids(reader(context))
  assert sorted(seen) == list(range(1, NUM_IMAGES + 1))


def test_training_batches_and_drops_images_without_boxes(tmp_path):
  reader = make_reader(write_shards(tmp_path, 3), is_training=True,
                       global_batch_size=3, deterministic=True, seed=1)
  batches = list(reader().take(6))
  images, labels = batches[0]
  assert images.shape == (3, 64, 64, 3) and images.dtype == tf.float32
  assert labels["gt_boxes"].shape == (3, 100, 4)
  assert labels["image_info"].shape == (3, 4, 2)
  assert labels["rpn_score_targets"]["2"].shape == (3, 16, 16, 3)
  for _, labels in batches:
    assert (labels["gt_classes"].numpy()[:, :2] == 1).all()


def test_deterministic_mode_repeats_exactly(tmp_path):
  pattern = write_shards(tmp_path, 3)
  def first_images():
    reader = make_reader(pattern, is_training=True, global_batch_size=2,
                         deterministic=True, seed=3)
    return np.concatenate([b[0].numpy() for b in reader().take(4)])
  np.testing.assert_array_equal(first_images(), first_images())


def test_per_replica_batches_under_mirrored_strategy(tmp_path):
  reader = make_reader(write_shards(tmp_path, 2), is_training=False,
                       global_batch_size=4)
  strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
  images, _ = next(iter(reader.distribute(strategy)))
  assert images.shape[0] == 4


def test_missing_files_is_a_clear_error(tmp_path):
  reader = make_reader(str(tmp_path / "nothing-*.tfrecord"),
                       global_batch_size=2)
  with pytest.raises(FileNotFoundError, match="create_coco_tfrecord"):
    reader()
  reader = make_reader("nothing", global_batch_size=2,
                       missing_data_help="Run make_data.sh.")
  with pytest.raises(FileNotFoundError, match="'nothing'. Run make_data.sh."):
    reader()


def test_deterministic_training_needs_a_seed(tmp_path):
  with pytest.raises(ValueError, match="seed"):
    make_reader("x", global_batch_size=2, deterministic=True)


def test_a_file_that_is_not_a_tfrecord_is_named(tmp_path):
  pattern = write_shards(tmp_path, 2)
  (tmp_path / "s-00009.tfrecord").write_text('{"images": []}')
  reader = make_reader(pattern, global_batch_size=2)
  with pytest.raises(ValueError, match="s-00009.tfrecord .* is not a TFRecord"):
    reader.check_files()
  (tmp_path / "s-00009.tfrecord").unlink()
  assert len(reader.check_files()) == 2


def test_deterministic_resume_reads_what_an_uninterrupted_run_reads(tmp_path):
  reader = make_reader(write_shards(tmp_path, 3), is_training=True,
                       global_batch_size=2, deterministic=True, seed=5)
  uninterrupted = [b[0].numpy() for b in reader().take(5)]
  resumed = [b[0].numpy() for b in reader(start_step=3).take(2)]
  np.testing.assert_array_equal(np.stack(uninterrupted[3:]), np.stack(resumed))


@pytest.mark.parametrize("cut", ["data", "header"])
def test_a_truncated_shard_is_named(tmp_path, cut):
  pattern = write_shards(tmp_path, 2)
  path = tmp_path / "s-00001.tfrecord"
  records = [r.numpy() for r in tf.data.TFRecordDataset(str(path))]
  last = sum(len(r) + 16 for r in records[:-1])  # Offset of the last record.
  with open(path, "r+b") as f:
    f.truncate(last + (12 + len(records[-1]) // 2 if cut == "data" else 5))
  reader = make_reader(pattern, global_batch_size=2)
  with pytest.raises(ValueError, match=r"s-00001.tfrecord .* is truncated"
                     r".*create_coco_tfrecord"):
    reader.check_files()


def test_a_partial_shard_of_an_interrupted_conversion_is_named(tmp_path):
  write_shards(tmp_path, 2)
  (tmp_path / "s-00002.tfrecord.partial").write_bytes(b"")
  reader = make_reader(str(tmp_path / "s-*"), global_batch_size=2)
  with pytest.raises(ValueError, match=r"s-00002.tfrecord.partial .* "
                     "interrupted conversion"):
    reader.check_files()


def test_undecodable_records_are_skipped_once_keeping_the_order(tmp_path):
  (tmp_path / "good").mkdir()
  (tmp_path / "bad").mkdir()
  good = write_shards(tmp_path / "good", 3)
  bad = write_shards(tmp_path / "bad", 3, truncated_image_id=99)
  reader = make_reader(bad, is_training=False, global_batch_size=4)
  assert sorted(source_ids(reader())) == list(range(1, NUM_IMAGES + 1))
  assert reader.skipped_records == 1

  def training_images(pattern):
    reader = make_reader(pattern, is_training=True, global_batch_size=2,
                         deterministic=True, seed=3)
    # 10 batches of 2 from 9 images with boxes: more than two epochs.
    return reader, np.concatenate([b[0].numpy() for b in reader().take(10)])
  reader, images = training_images(bad)
  # The bad record ends its shard, so the good ones come in the same order.
  np.testing.assert_array_equal(images, training_images(good)[1])
  assert reader.skipped_records == 1  # Read in every epoch, counted once.


def test_more_undecodable_records_than_allowed_is_a_clear_error(tmp_path):
  reader = make_reader(write_shards(tmp_path, 2, truncated_image_id=99),
                       is_training=False, global_batch_size=2,
                       max_skipped_records=0)
  with pytest.raises(tf.errors.OpError, match=r"(?s)s-\*\.tfrecord.*"
                     "create_coco_tfrecord"):
    source_ids(reader())
