"""Tests of the evaluation image summaries, on the real preprocessing."""
import glob

import numpy as np
from pycocotools import coco
import tensorflow as tf

from megdet_tf.dataloaders.category_map import CategoryMap
from megdet_tf.dataloaders.detection_parser import DetectionParser
from megdet_tf.evaluation import image_summaries
from megdet_tf.evaluation import visualization

CATEGORIES = CategoryMap([4, 9], ["disc", "bar"])


def parser():
  return DetectionParser(category_map=CATEGORIES, short_side=64,
                         long_side=64, aug_rand_hflip=False)


def picture(height, width, seed):
  """A smooth random picture (resizing keeps it close to itself)."""
  coarse = np.random.default_rng(seed).integers(0, 256, (4, 4, 3))
  return tf.cast(tf.image.resize(coarse[None], [height, width]),
                 tf.uint8)[0].numpy()


def test_network_input_image_undoes_normalisation_and_padding():
  original = picture(50, 80, 0)  # -> scaled 40x64, padded to 64x64.
  image, image_info = parser().preprocess_image(tf.constant(original))
  assert image.shape == (64, 64, 3)
  shown = image_summaries.network_input_image(image.numpy(),
                                              image_info.numpy())
  assert shown.shape == (40, 64, 3) and shown.dtype == np.uint8
  expected = tf.image.resize(original, [40, 64]).numpy()
  assert np.abs(shown - expected).max() <= 1.0
  # bfloat16 inputs (mixed-precision pipelines) work too.
  shown_bf16 = image_summaries.network_input_image(
      tf.cast(image, tf.bfloat16).numpy(), image_info.numpy())
  assert np.abs(shown_bf16.astype(int) - shown).max() <= 2


def ground_truth():
  dataset = {
      "images": [{"id": 9, "file_name": "c.jpg", "height": 32, "width": 48},
                 {"id": 2, "file_name": "a.jpg", "height": 50, "width": 80},
                 {"id": 5, "file_name": "b.jpg", "height": 64, "width": 64}],
      "annotations": [
          {"id": 1, "image_id": 2, "category_id": 9, "bbox": [10, 5, 40, 30],
           "area": 1200, "iscrowd": 0}],
      "categories": [{"id": 4, "name": "disc"}, {"id": 9, "name": "bar"}]}
  truth = coco.COCO()
  truth.dataset = dataset
  truth.createIndex()
  return truth


def test_writes_the_lowest_ids_with_truth_left_and_detections_right(
    tmp_path):
  pictures = {2: picture(50, 80, 1), 5: picture(64, 64, 2),
              9: picture(32, 48, 3)}
  preprocessed = {i: parser().preprocess_image(tf.constant(p))
                  for i, p in pictures.items()}
  # Image 2 is scaled by 0.8: its box [y 5..35, x 10..50] is at
  # [4, 8, 28, 40] in the network input. Detections: class index 2 (id 9)
  # there, and a low-scoring one elsewhere.
  detections = np.zeros([3, 3, 4], np.float32)
  detections[0, :2] = [[4, 8, 28, 40], [30, 45, 38, 60]]
  scores = np.array([[0.9, 0.2, 0], [0, 0, 0], [0, 0, 0]], np.float32)
  classes = np.array([[2, 1, 0], [0, 0, 0], [0, 0, 0]], np.float32)
  order = [2, 9, 5]  # As the pipeline delivers them; 9 is not wanted.
  predictions = {
      "source_id": np.array(order),
      "image_info": np.stack([preprocessed[i][1] for i in order]),
      "detection_boxes": detections, "detection_scores": scores,
      "detection_classes": classes,
      "num_detections": np.array([2, 0, 0], np.int32)}
  images = [preprocessed[i][0] for i in order]

  summaries = image_summaries.EvalImageSummaries(ground_truth(), CATEGORIES,
                                                 num_images=2)
  # Two replicas' local results: images [2, 9] and [5].
  summaries.add([tf.stack(images[:2]), tf.stack(images[2:])],
                [tf.constant(order[:2]), tf.constant(order[2:])],
                predictions)
  writer = tf.summary.create_file_writer(str(tmp_path))
  with writer.as_default(step=7):
    summaries.write()
  writer.close()

  written = {}
  for path in glob.glob(str(tmp_path / "events.out.tfevents.*")):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        assert event.step == 7
        _, _, encoded = tf.make_ndarray(value.tensor)
        written[value.tag] = tf.io.decode_png(encoded).numpy()
  assert set(written) == {"eval_images/a.jpg", "eval_images/b.jpg"}

  panel = written["eval_images/a.jpg"]
  assert panel.shape == (40, 2 * 64 + 4, 3)
  shown = image_summaries.network_input_image(preprocessed[2][0].numpy(),
                                              preprocessed[2][1].numpy())
  truth, detected = panel[:, :64], panel[:, 68:]
  expected_box = visualization.draw_detections(
      shown, np.array([[4., 8., 28., 40.]]), np.array([9]), CATEGORIES)
  np.testing.assert_array_equal(truth, expected_box)
  np.testing.assert_array_equal(detected, visualization.draw_detections(
      shown, np.array([[4., 8., 28., 40.]]), np.array([9]), CATEGORIES,
      np.array([0.9])))  # The 0.2 detection is below the threshold.
  assert np.all(panel[:, 64:68] == 255)
  # Image 5 has no object and no detection: the picture twice.
  plain = image_summaries.network_input_image(preprocessed[5][0].numpy(),
                                              preprocessed[5][1].numpy())
  np.testing.assert_array_equal(written["eval_images/b.jpg"][:, :64], plain)
  np.testing.assert_array_equal(written["eval_images/b.jpg"][:, 68:], plain)


def test_no_images_when_disabled(tmp_path):
  summaries = image_summaries.EvalImageSummaries(ground_truth(), CATEGORIES,
                                                 num_images=0)
  summaries.add([tf.zeros([1, 64, 64, 3])], [tf.constant([2])], {})
  writer = tf.summary.create_file_writer(str(tmp_path))
  with writer.as_default(step=0):
    summaries.write()
  writer.close()
  events = [event for path in glob.glob(str(tmp_path / "events.*"))
            for event in tf.compat.v1.train.summary_iterator(path)
            if event.summary.value]
  assert not events
