"""Tests for DetectionParser: labels and geometry of resized, flipped images."""
import megdet_tf  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TF)
import numpy as np
import pytest
import tensorflow as tf

from official.vision.data import tf_example_builder
from official.vision.dataloaders import tf_example_decoder
from official.vision.ops import preprocess_ops

from megdet_tf.dataloaders.category_map import CategoryMap
from megdet_tf.dataloaders.detection_parser import DetectionParser
from megdet_tf.ops.anchor_spec import AnchorSpec

# Category id -> pure colour of its rectangles; ids have gaps like COCO's.
COLOURS = {3: (255, 0, 0), 11: (0, 255, 0), 42: (0, 0, 255)}


def make_example(height=96, width=160, rects=(), crowd=()):
  """A black PNG with solid rectangles (x0, y0, x1, y1, category id)."""
  image = np.zeros((height, width, 3), np.uint8)
  for x0, y0, x1, y1, cid in rects:
    image[y0:y1, x0:x1] = COLOURS[cid]
  builder = tf_example_builder.TfExampleBuilder()
  builder.add_image_matrix_feature(image, "PNG", b"17")
  builder.add_boxes_feature(
      xmins=[r[0] / width for r in rects], xmaxs=[r[2] / width for r in rects],
      ymins=[r[1] / height for r in rects],
      ymaxs=[r[3] / height for r in rects], labels=[r[4] for r in rects])
  builder.add_ints_feature("image/object/is_crowd",
                           [int(i in crowd) for i in range(len(rects))])
  return tf_example_decoder.TfExampleDecoder().decode(
      builder.example.SerializeToString())


def make_parser(**kwargs):
  args = dict(category_map=CategoryMap(list(COLOURS)), short_side=64,
              long_side=100, anchor_spec=AnchorSpec(
                  max_level=4, aspect_ratios=(1.0,), anchor_size=4.0))
  args.update(kwargs)
  return DetectionParser(**args)


def to_rgb(image):
  """Undoes Model Garden's ImageNet normalisation."""
  return (np.asarray(image, np.float32) * preprocess_ops.STDDEV_RGB +
          preprocess_ops.MEAN_RGB)


RECTS = ((10, 20, 50, 70, 3), (100, 10, 150, 40, 11), (60, 50, 90, 90, 42))


@pytest.mark.parametrize("seed", range(4))
def test_train_boxes_enclose_the_drawn_shapes(seed):
  parser = make_parser(seed=seed)
  image, labels = parser.parse_fn(is_training=True)(make_example(rects=RECTS))
  rgb = to_rgb(image)
  assert image.shape == (112, 112, 3) and image.dtype == tf.float32
  # 96x160 -> short side 64 would make the long side 107 > 100: long side 100.
  np.testing.assert_allclose(labels["image_info"][1], [60, 100])
  classes = labels["gt_classes"].numpy()
  boxes = labels["gt_boxes"].numpy()[classes > 0]
  assert sorted(classes[classes > 0]) == [1, 2, 3]
  assert (labels["gt_classes"].numpy()[3:] == -1).all()
  for (y0, x0, y1, x1), cls in zip(boxes, classes[classes > 0]):
    colour = COLOURS[parser.category_map.category_ids[cls - 1]]
    inside = rgb[int(y0) + 2:int(y1) - 2, int(x0) + 2:int(x1) - 2]
    np.testing.assert_allclose(inside.mean(axis=(0, 1)), colour, atol=8)
    # One pixel ring just outside the box is background or another shape.
    ring = np.concatenate([rgb[max(int(y0) - 2, 0), int(x0):int(x1)],
                           rgb[min(int(np.ceil(y1)) + 1, 59), int(x0):int(x1)]])
    assert (np.abs(ring - colour).sum(axis=-1) > 100).mean() > 0.9


def test_flip_happens_for_some_seeds_only():
  lefts = set()
  for seed in range(8):
    _, labels = make_parser(seed=seed).parse_fn(True)(
        make_example(rects=RECTS[:1]))
    lefts.add(round(float(labels["gt_boxes"][0, 1])))
  # The red box starts at x=10 (scaled 6.25) or mirrored at 160-50 (68.75).
  assert lefts == {6, 69}


def test_crowd_boxes_are_dropped_in_training():
  _, labels = make_parser(aug_rand_hflip=False).parse_fn(True)(
      make_example(rects=RECTS, crowd=(1,)))
  classes = labels["gt_classes"].numpy()
  assert sorted(classes[classes > 0]) == [1, 3]


def test_rpn_targets_match_model_garden_layout():
  _, labels = make_parser().parse_fn(True)(make_example(rects=RECTS))
  for level, stride in (("2", 4), ("3", 8), ("4", 16)):
    side = 112 // stride
    assert labels["anchor_boxes"][level].shape == (side, side, 4)
    assert labels["rpn_score_targets"][level].shape == (side, side, 1)
    assert labels["rpn_box_targets"][level].shape == (side, side, 4)
  positives = sum(int(tf.reduce_sum(tf.cast(t > 0, tf.int32)))
                  for t in labels["rpn_score_targets"].values())
  assert positives >= 3


def test_unknown_category_id_is_an_error():
  parser = make_parser(category_map=CategoryMap([3, 42]))
  with pytest.raises(tf.errors.InvalidArgumentError, match="CategoryMap"):
    parser.parse_fn(True)(make_example(rects=RECTS))


def test_eval_keeps_what_maps_back_to_the_original_image():
  image, labels = make_parser().parse_fn(is_training=False)(
      make_example(rects=RECTS))
  assert image.shape == (112, 112, 3)
  assert int(labels["source_id"]) == 17
  info = labels["image_info"].numpy()
  np.testing.assert_allclose(info[0], [96, 160])
  np.testing.assert_allclose(info[2], [100 / 160, 100 / 160], rtol=1e-2)


def test_padded_size_must_fit_the_stride():
  with pytest.raises(ValueError, match="padded_size"):
    make_parser(padded_size=(100, 100))


def test_preprocess_image_is_the_eval_preprocessing():
  parser = make_parser()
  data = make_example(rects=RECTS)
  image, labels = parser.parse_fn(is_training=False)(data)
  served, info = parser.preprocess_image(data["image"])
  np.testing.assert_array_equal(served, image)
  np.testing.assert_array_equal(info, labels["image_info"])
  anchors = parser.anchor_boxes()
  assert anchors.keys() == labels["anchor_boxes"].keys()
  for level, boxes in anchors.items():
    np.testing.assert_array_equal(boxes, labels["anchor_boxes"][level])
  portrait, info = parser.preprocess_image(tf.zeros([200, 50, 3], tf.uint8))
  assert portrait.shape == (112, 112, 3)
  np.testing.assert_allclose(info[1], [100, 25])
