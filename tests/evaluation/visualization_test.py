"""Tests of box drawing: what changes, where, in which colours."""
import numpy as np
import pytest

from megdet_tf.dataloaders.category_map import CategoryMap
from megdet_tf.evaluation import visualization

SHAPES = CategoryMap([1, 3, 7, 12, 18, 25],
                     ["circle", "square", "triangle", "star", "ring", "cross"])


def ring(outline, width, shape):
  """Mask of the `width` px band just inside an inclusive rectangle."""
  x0, y0, x1, y1 = outline
  mask = np.zeros(shape[:2], bool)
  mask[y0:y1 + 1, x0:x1 + 1] = True
  mask[y0 + width:y1 + 1 - width, x0 + width:x1 + 1 - width] = False
  return mask


def rectangle(rect, shape):
  x0, y0, x1, y1 = rect
  mask = np.zeros(shape[:2], bool)
  mask[y0:y1 + 1, x0:x1 + 1] = True
  return mask


@pytest.mark.parametrize("background", ["grey", "noise"])
def test_only_outlines_and_tags_change(background):
  shape = (120, 160, 3)
  image = (np.full(shape, 128, np.uint8) if background == "grey" else
           np.random.default_rng(0).integers(0, 256, shape, np.uint8))
  # One box touching the top (tag inside it), one lower (tag above it), one
  # reaching past the right and bottom borders (clipped).
  boxes = np.array([[0., 10., 50., 70.], [60., 30.4, 100.6, 90.],
                    [90., 130., 140., 200.]])
  texts = ["star 0.91", "ring", "cross 0.50"]
  colours = [visualization.PALETTE[i] for i in (3, 4, 5)]
  original = image.copy()
  drawn = visualization.draw_boxes(image, boxes, texts, colours)
  assert drawn.shape == shape and drawn.dtype == np.uint8
  np.testing.assert_array_equal(image, original)  # A copy is drawn on.

  style = visualization.Style.for_image(*shape[:2])
  outlines = [visualization.outline_rectangle(b, *shape[:2]) for b in boxes]
  assert outlines == [(10, 0, 69, 49), (30, 60, 89, 100), (130, 90, 159, 119)]
  tags = [visualization.tag_rectangle(o, t, style, *shape[:2])[0]
          for o, t in zip(outlines, texts)]
  assert tags[0][1] == 0 and tags[0][0] == 10  # Inside the top box.
  assert tags[1][3] == outlines[1][1] - 1  # Just above the lower box.
  assert tags[2][2] == shape[1] - 1  # Pushed left to fit the image.

  rings = [ring(o, style.line_width, shape) for o in outlines]
  tag_masks = [rectangle(t, shape) for t in tags]
  changed = np.any(drawn != image, axis=-1)
  allowed = np.any(rings + tag_masks, axis=0)
  assert not np.any(changed & ~allowed), "pixels changed outside the drawing"
  for i, (colour, ring_mask) in enumerate(zip(colours, rings)):
    # Each outline has its colour where no later box or tag covers it.
    covered = np.any(rings[i + 1:] + tag_masks[i:], axis=0)
    visible = ring_mask & ~covered
    assert visible.sum() > 50
    np.testing.assert_array_equal(drawn[visible],
                                  np.broadcast_to(colour, (visible.sum(), 3)))
  for colour, tag in zip(colours, tag_masks):
    pixels = drawn[tag]
    fill = np.all(pixels == colour, axis=-1)
    assert 0.4 < fill.mean() < 0.95  # A filled tag with text on it.


def test_box_pixels_use_pixel_edges_and_clip():
  assert visualization.outline_rectangle([0, 0, 64, 48], 64, 48) == (
      0, 0, 47, 63)
  assert visualization.outline_rectangle([-5, -5, 3, 2], 64, 48) == (
      0, 0, 1, 2)
  # A degenerate box still covers one pixel.
  assert visualization.outline_rectangle([10, 10, 10, 10], 64, 48) == (
      10, 10, 10, 10)


def test_style_grows_with_the_image():
  small = visualization.Style.for_image(256, 256)
  large = visualization.Style.for_image(800, 1333)
  assert small.line_width == 2 and large.line_width == 4
  assert large.font.size > small.font.size >= 10


def _contrast(a, b):
  """WCAG 2 contrast ratio of two sRGB colours."""
  def luminance(colour):
    c = np.asarray(colour) / 255.0
    c = np.where(c <= 0.03928, c / 12.92, ((c + 0.055) / 1.055)**2.4)
    return 0.2126 * c[0] + 0.7152 * c[1] + 0.0722 * c[2]
  high, low = sorted([luminance(a), luminance(b)], reverse=True)
  return (high + 0.05) / (low + 0.05)


def test_classes_have_distinct_colours_and_legible_text():
  colours = [visualization.class_colour(SHAPES, i)
             for i in SHAPES.category_ids]
  assert len(set(colours)) == len(colours)
  for colour in visualization.PALETTE:
    text = visualization._text_colour(colour)  # pylint: disable=protected-access
    assert _contrast(colour, text) >= 4.5, colour  # WCAG AA for text.
  # Classes beyond the palette cycle through it.
  many = CategoryMap(range(1, 30))
  assert (visualization.class_colour(many, 1) ==
          visualization.class_colour(many, 1 + len(visualization.PALETTE)))


def test_draw_detections_labels_and_stacks_by_score():
  image = np.full((100, 100, 3), 128, np.uint8)
  # Two boxes sharing their left edge: the higher score is drawn on top.
  boxes = np.array([[40., 20., 90., 60.], [40., 20., 80., 90.]])
  for scores in ([0.9, 0.6], [0.6, 0.9]):
    drawn = visualization.draw_detections(image, boxes, np.array([3, 12]),
                                          SHAPES, np.array(scores))
    top = np.argmax(scores)
    colour = visualization.class_colour(SHAPES, [3, 12][top])
    np.testing.assert_array_equal(drawn[60, 20], colour)
  # Ground truth: names only, so narrower tags than with scores.
  truth = visualization.draw_detections(image, boxes[:1], np.array([3]),
                                        SHAPES)
  scored = visualization.draw_detections(image, boxes[:1], np.array([3]),
                                         SHAPES, np.array([0.9]))
  assert np.any(truth != image) and np.any(scored != truth)
  tag_row = 40 - 3  # Inside both tags, above the box.
  assert (np.any(truth[tag_row] != 128, axis=-1).sum() <
          np.any(scored[tag_row] != 128, axis=-1).sum())
  empty = visualization.draw_detections(image, np.zeros([0, 4]),
                                        np.zeros([0], np.int64), SHAPES,
                                        np.zeros([0]))
  np.testing.assert_array_equal(empty, image)
