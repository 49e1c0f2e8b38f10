"""Draws boxes with class names (and scores) on images, with Pillow.

Each class keeps one colour in every image: a palette of saturated colours
that stand out on photos, indexed by the class's position in the
`CategoryMap` (cycled past the palette's length, where the names still tell
classes apart). A box is an outline of `line_width` pixels drawn inside its
pixel extent; its label is a tag filled with the same colour, holding the
text in black or white (whichever contrasts more with the fill), above the
box's top-left corner or, for a box touching the image top, inside it. Line
width and font size grow with the image, so labels stay legible on 256 px
demo images and on 1333 px COCO photos alike.

Only the outlines and tags are painted: every other pixel keeps its value,
so an annotated image can be compared with its input.
"""
import dataclasses
from typing import Optional, Sequence, Tuple

import numpy as np
from PIL import Image
from PIL import ImageDraw
from PIL import ImageFont

from megdet_tf.dataloaders.category_map import CategoryMap

Colour = Tuple[int, int, int]
Rectangle = Tuple[int, int, int, int]  # x0, y0, x1, y1; inclusive pixels.

# Sasha Trubetskoy's "20 simple, distinct colours" without the pale and the
# near-black ones, which vanish on bright or dark backgrounds.
PALETTE: Tuple[Colour, ...] = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (67, 99, 216),
    (245, 130, 49), (145, 30, 180), (66, 212, 244), (240, 50, 230),
    (191, 239, 69), (70, 153, 144), (154, 99, 36), (128, 128, 0),
)
_TAG_PADDING = 2


def class_colour(category_map: CategoryMap, category_id: int) -> Colour:
  """The colour of a category in every drawing."""
  index = category_map.category_ids.index(int(category_id))
  return PALETTE[index % len(PALETTE)]


def _text_colour(fill: Colour) -> Colour:
  """Black or white, whichever contrasts more with `fill` (WCAG 2 ratio).

  The contrast ratio of luminances L1 > L2 is (L1 + 0.05) / (L2 + 0.05), with
  L the relative luminance of linearised sRGB; the better of black and white
  always reaches 4.58, above WCAG's 4.5 for text.
  """
  linear = np.asarray(fill, np.float64) / 255.0
  linear = np.where(linear <= 0.04045, linear / 12.92,
                    ((linear + 0.055) / 1.055)**2.4)
  luminance = float(np.dot([0.2126, 0.7152, 0.0722], linear))
  on_black = (luminance + 0.05) / 0.05
  on_white = 1.05 / (luminance + 0.05)
  return (0, 0, 0) if on_black >= on_white else (255, 255, 255)


@dataclasses.dataclass(frozen=True)
class Style:
  """Line width and font for an image of a given size."""
  line_width: int
  font: ImageFont.FreeTypeFont

  @classmethod
  def for_image(cls, height: int, width: int) -> "Style":
    side = max(height, width)
    return cls(line_width=max(2, round(side / 300)),
               font=ImageFont.load_default(size=max(10, round(side / 40))))


def outline_rectangle(box: Sequence[float], height: int,
                      width: int) -> Rectangle:
  """The pixels a [ymin, xmin, ymax, xmax] box (pixel edges) covers."""
  ymin, xmin, ymax, xmax = (float(v) for v in box)
  x0 = int(np.clip(round(xmin), 0, width - 1))
  y0 = int(np.clip(round(ymin), 0, height - 1))
  x1 = int(np.clip(round(xmax) - 1, x0, width - 1))
  y1 = int(np.clip(round(ymax) - 1, y0, height - 1))
  return x0, y0, x1, y1


def tag_rectangle(outline: Rectangle, text: str, style: Style, height: int,
                  width: int) -> Tuple[Rectangle, Tuple[int, int]]:
  """Where a box's label goes: the tag's rectangle and the text's origin."""
  left, top, right, bottom = style.font.getbbox(text)
  tag_width = right - left + 2 * _TAG_PADDING
  tag_height = bottom - top + 2 * _TAG_PADDING
  x0 = max(0, min(outline[0], width - tag_width))
  y0 = outline[1] - tag_height if outline[1] >= tag_height else outline[1]
  tag = (x0, y0, min(x0 + tag_width, width) - 1,
         min(y0 + tag_height, height) - 1)
  return tag, (x0 + _TAG_PADDING - left, y0 + _TAG_PADDING - top)


def draw_boxes(image: np.ndarray, boxes: np.ndarray, texts: Sequence[str],
               colours: Sequence[Colour]) -> np.ndarray:
  """A copy of `image` with outlined, labelled boxes.

  Args:
    image: uint8 [H, W, 3].
    boxes: [N, 4] [ymin, xmin, ymax, xmax] in pixels (pixel edges: a box
      around the whole image is [0, 0, H, W]); clipped to the image.
    texts: N labels; an empty one draws no tag.
    colours: N RGB colours.

  Returns:
    The annotated uint8 [H, W, 3] image. Later boxes are drawn over earlier
    ones, so pass the most important (highest scoring) last.
  """
  height, width = image.shape[:2]
  style = Style.for_image(height, width)
  canvas = Image.fromarray(np.asarray(image, np.uint8), mode="RGB")
  draw = ImageDraw.Draw(canvas)
  for box, text, colour in zip(boxes, texts, colours):
    outline = outline_rectangle(box, height, width)
    draw.rectangle(outline, outline=colour, width=style.line_width)
    if text:
      tag, origin = tag_rectangle(outline, text, style, height, width)
      draw.rectangle(tag, fill=colour)
      draw.text(origin, text, fill=_text_colour(colour), font=style.font)
  return np.asarray(canvas)


def draw_detections(image: np.ndarray, boxes: np.ndarray,
                    category_ids: np.ndarray, category_map: CategoryMap,
                    scores: Optional[np.ndarray] = None) -> np.ndarray:
  """Draws boxes labelled `name` or `name 0.93` in their class colours.

  Args:
    image: uint8 [H, W, 3].
    boxes: [N, 4] [ymin, xmin, ymax, xmax] in the image's pixels.
    category_ids: [N] dataset category ids (not class indices).
    category_map: gives names and colours.
    scores: [N] detection scores, or None for ground truth (names only).
  """
  texts = [category_map.name(c) for c in category_ids]
  if scores is not None:
    texts = [f"{t} {s:.2f}" for t, s in zip(texts, scores)]
    # Lowest score first, so the most confident box is drawn on top.
    order = np.argsort(scores, kind="stable")
  else:
    order = np.arange(len(texts))
  return draw_boxes(image, np.asarray(boxes)[order],
                    [texts[i] for i in order],
                    [class_colour(category_map, category_ids[i])
                     for i in order])
