"""Shapes: a generated COCO-format detection dataset for demos and tests.

COCO cannot be downloaded everywhere megdet_tf runs, so the project ships a
generator of a small but real detection task in COCO's on-disk format
(`annotations/instances_{train,val}.json`, JPEGs under `train/` and `val/`),
read by the same input pipeline and evaluator as COCO.

What keeps it from being a colour threshold:
- the class is the geometry alone: every object gets a random colour with
  random shading, a random rotation and aspect ratio (0.75-1.33), and a size
  drawn from the same log-uniform range for every class;
- backgrounds are two-colour gradients with low-frequency colour clouds, thin
  random lines and pixel noise, all in colours from the objects' distribution;
- sizes span COCO's small (< 32^2 px), medium and large (> 96^2 px) at the
  default 256 px, since the range is relative to the image size;
- 0-6 objects per image (about 5% of images are empty), drawn in order so
  later objects occlude earlier ones; shapes may be cut by the image border.

Annotations are amodal: `bbox` is the full extent of the drawn shape inside
the image (clipped to it, in pixel-edge coordinates), even where a later object
covers part of it, and `area` is that shape's pixel count. Heavy occlusion is
avoided rather than dropped: a placement that would leave an earlier object
less than 40% visible is re-drawn (or the object skipped), so every shape in an
image is annotated and none is more than 60% hidden.

Each image depends only on (seed, split, index), not on the number of images,
and the same arguments give the same JSON and JPEG bytes.
"""
import dataclasses
import functools
import json
import os
import zlib
from typing import Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

# Ids with gaps, like COCO's 80 categories in 1..90.
CATEGORIES = [
    {"id": 1, "name": "circle"},
    {"id": 3, "name": "square"},
    {"id": 7, "name": "triangle"},
    {"id": 12, "name": "star"},
    {"id": 18, "name": "ring"},
    {"id": 25, "name": "cross"},
]

EMPTY_FRACTION = 0.05  # Share of images drawn without objects.
MIN_VISIBLE = 0.4  # Least visible share of an object's pixels after occlusion.
MIN_AREA = 16  # Pixels; smaller (mostly truncated) shapes are re-drawn.
JPEG_QUALITY = 90
_PLACEMENT_TRIES = 10


def _regular(n: int, radius: float = 1.0, phase: float = 0.0) -> np.ndarray:
  t = phase + 2 * np.pi * np.arange(n) / n
  return radius * np.stack([np.cos(t), np.sin(t)], axis=-1)


def _star() -> np.ndarray:
  outer = _regular(5, 1.0, -np.pi / 2)
  inner = _regular(5, 0.45, -np.pi / 2 + np.pi / 5)
  return np.stack([outer, inner], axis=1).reshape(-1, 2)


def _cross(half_width: float = 0.3) -> np.ndarray:
  # Arm ends' corners lie on the unit circle.
  a, b = half_width, np.sqrt(1 - half_width**2)
  return np.array([(a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b),
                   (-a, a), (-b, a), (-b, -a), (-a, -a), (-a, -b)])


# Per category name: (polygon in a unit circumcircle, fill) pairs drawn in
# order; fill 0 cuts a hole.
_TEMPLATES = {
    "circle": [(_regular(48), 255)],
    "square": [(_regular(4, phase=np.pi / 4), 255)],
    "triangle": [(_regular(3, phase=-np.pi / 2), 255)],
    "star": [(_star(), 255)],
    "ring": [(_regular(48), 255), (_regular(48, 0.55), 0)],
    "cross": [(_cross(), 255)],
}


@dataclasses.dataclass(frozen=True)
class ShapesExample:
  """One rendered image, its COCO annotations and what tests need to check them.

  Attributes:
    image: [S, S, 3] uint8 image, before JPEG encoding.
    annotations: per object `category_id`, `bbox` [x, y, w, h], `area`,
      `iscrowd` (no ids; the writer numbers them).
    masks: [N, S, S] bool, each object's full (unoccluded) in-image extent.
    visible_masks: [N, S, S] bool, the pixels each object shows in `image`.
    colors: [N, 3] float, each object's base colour before shading and noise.
  """
  image: np.ndarray
  annotations: list
  masks: np.ndarray
  visible_masks: np.ndarray
  colors: np.ndarray


@functools.lru_cache(maxsize=4)
def _pixel_centres(size: int) -> Tuple[np.ndarray, np.ndarray]:
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
  return xx, yy


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
  """Gradient + colour clouds + thin lines, as a float32 [S, S, 3] canvas."""
  xx, yy = _pixel_centres(size)
  angle = rng.uniform(0, 2 * np.pi)
  t = (np.cos(angle) * xx + np.sin(angle) * yy) / size
  t = (t - t.min()) / (t.max() - t.min())
  start, end = rng.uniform(0, 255, (2, 3)).astype(np.float32)
  canvas = start + (end - start) * t[..., None]
  # Clouds: a few cells of colour noise, smoothly upsampled.
  cells = int(rng.integers(3, 9))
  amplitude = rng.uniform(10, 40)
  clouds = np.clip(128 + amplitude * rng.standard_normal((cells, cells, 3)),
                   0, 255).astype(np.uint8)
  clouds = Image.fromarray(clouds).resize((size, size), Image.BICUBIC)
  canvas += np.asarray(clouds, np.float32) - 128
  image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
  draw = ImageDraw.Draw(image)
  max_width = max(1, size // 85)
  for _ in range(int(rng.integers(2, 9))):
    ends = rng.uniform(-0.2 * size, 1.2 * size, 4).tolist()
    draw.line(ends, fill=tuple(rng.integers(0, 256, 3).tolist()),
              width=int(rng.integers(1, max_width + 1)))
  return np.asarray(image, np.float32).copy()


def _shape_mask(rng: np.random.Generator, name: str, size: int,
                scale_range: Tuple[float, float]):
  """Draws one randomly placed shape; returns (mask, centre, radius)."""
  log_lo, log_hi = np.log(scale_range)
  radius = 0.5 * size * np.exp(rng.uniform(log_lo, log_hi))
  # Centres keep at least ~30% of the radius inside, so truncation is partial.
  centre = rng.uniform(0.3 * radius, size - 0.3 * radius, 2)
  stretch = np.sqrt(np.exp(rng.uniform(np.log(0.75), np.log(4 / 3))))
  angle = rng.uniform(0, 2 * np.pi)
  rotation = np.array([[np.cos(angle), -np.sin(angle)],
                       [np.sin(angle), np.cos(angle)]])
  transform = radius * rotation @ np.diag([stretch, 1 / stretch])
  mask = Image.new("L", (size, size), 0)
  draw = ImageDraw.Draw(mask)
  for polygon, fill in _TEMPLATES[name]:
    points = polygon @ transform.T + centre
    draw.polygon(points.ravel().tolist(), fill=fill)
  return np.asarray(mask) > 0, centre, radius


def _contrasting_colour(rng: np.random.Generator,
                        covered: np.ndarray) -> np.ndarray:
  """A random colour that differs from most of the pixels it will cover."""
  for _ in range(_PLACEMENT_TRIES):
    colour = rng.uniform(0, 255, 3).astype(np.float32)
    close = np.linalg.norm(covered - colour, axis=-1) < 60
    if close.mean() < 0.25:
      break
  return colour


def render_example(
    seed: int, split: str, index: int, image_size: int = 256,
    max_objects: int = 6,
    scale_range: Sequence[float] = (0.06, 0.8)) -> ShapesExample:
  """Renders image `index` of `split`, determined by (seed, split, index).

  Args:
    seed: dataset seed (non-negative).
    split: split name; different names give independent images.
    index: image index within the split (non-negative).
    image_size: side of the square image in pixels.
    max_objects: non-empty images get 1..max_objects objects (fewer when a
      placement keeps violating the occlusion limit).
    scale_range: (min, max) of a shape's circumscribed diameter relative to
      `image_size`, sampled log-uniformly. At 256 px the default gives shapes
      15-205 px across; by pixel area about 44% small, 45% medium and 11%
      large in COCO's terms.

  Returns:
    A `ShapesExample`.
  """
  rng = np.random.default_rng([seed, zlib.crc32(split.encode()), index])
  size = image_size
  canvas = _background(rng, size)
  xx, yy = _pixel_centres(size)
  owner = np.full((size, size), -1, np.int16)  # Object index on top per pixel.
  objects = []  # (category id, mask, colour)
  num_objects = 0 if rng.random() < EMPTY_FRACTION else int(
      rng.integers(1, max_objects + 1))
  for _ in range(num_objects):
    category = CATEGORIES[int(rng.integers(len(CATEGORIES)))]
    shown = np.bincount(owner.ravel() + 1, minlength=len(objects) + 1)[1:]
    full = np.array([m.sum() for _, m, _ in objects], np.int64)
    for _ in range(_PLACEMENT_TRIES):
      mask, centre, radius = _shape_mask(rng, category["name"], size,
                                         scale_range)
      if mask.sum() < MIN_AREA:
        continue
      # Pixels each earlier object would still show with this one on top.
      hidden = np.bincount(owner[mask] + 1, minlength=len(objects) + 1)[1:]
      if np.all(shown - hidden >= MIN_VISIBLE * full):
        break
    else:
      continue  # No placement kept the earlier objects visible: skip it.
    colour = _contrasting_colour(rng, canvas[mask])
    # Linear shading across the shape, up to +-30 levels at its rim.
    shade_angle = rng.uniform(0, 2 * np.pi)
    shading = rng.uniform(0, 30) * (
        np.cos(shade_angle) * (xx[mask] - centre[0]) +
        np.sin(shade_angle) * (yy[mask] - centre[1])) / radius
    canvas[mask] = colour + shading[:, None]
    owner[mask] = len(objects)
    objects.append((category["id"], mask, colour))
  canvas += rng.uniform(2, 10) * rng.standard_normal(canvas.shape, np.float32)
  image = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)

  annotations = []
  for category_id, mask, _ in objects:
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    x, y = float(cols[0]), float(rows[0])
    annotations.append({
        "category_id": category_id,
        "bbox": [x, y, float(cols[-1] + 1) - x, float(rows[-1] + 1) - y],
        "area": float(mask.sum()),
        "iscrowd": 0,
    })
  masks = np.array([m for _, m, _ in objects], bool).reshape(-1, size, size)
  visible = owner == np.arange(len(objects), dtype=np.int16)[:, None, None]
  colours = np.array([c for _, _, c in objects], np.float32).reshape(-1, 3)
  return ShapesExample(image, annotations, masks, visible, colours)


def write_shapes_dataset(output_dir: str, num_train: int = 2000,
                         num_val: int = 200, image_size: int = 256,
                         seed: int = 0, max_objects: int = 6,
                         scale_range: Sequence[float] = (0.06, 0.8)) -> dict:
  """Writes the shapes dataset in COCO format under `output_dir`.

  Layout: `annotations/instances_{train,val}.json` and `{train,val}/NNNNNN.jpg`
  (image ids and file names count from 1 in each split; annotation ids from 1).
  Existing files of the same names are overwritten; the JSON files define the
  dataset. Arguments other than `output_dir`/counts are as in `render_example`.

  Returns:
    {split: {"annotation_file", "image_dir", "num_images", "num_objects"}}.
  """
  for name, value, low in (("num_train", num_train, 0), ("num_val", num_val, 0),
                           ("image_size", image_size, 32), ("seed", seed, 0),
                           ("max_objects", max_objects, 1)):
    if int(value) != value or value < low:
      raise ValueError(f"write_shapes_dataset: {name} must be an integer "
                       f">= {low}, got {value!r}")
  if not (len(scale_range) == 2 and 0 < scale_range[0] < scale_range[1] <= 1):
    raise ValueError("write_shapes_dataset: scale_range must be (min, max) "
                     f"with 0 < min < max <= 1, got {scale_range!r}")
  os.makedirs(os.path.join(output_dir, "annotations"), exist_ok=True)
  result = {}
  for split, count in (("train", num_train), ("val", num_val)):
    image_dir = os.path.join(output_dir, split)
    os.makedirs(image_dir, exist_ok=True)
    images, annotations = [], []
    for index in range(count):
      example = render_example(seed, split, index, image_size, max_objects,
                               scale_range)
      image_id = index + 1
      file_name = f"{image_id:06d}.jpg"
      Image.fromarray(example.image).save(
          os.path.join(image_dir, file_name), quality=JPEG_QUALITY)
      images.append({"id": image_id, "file_name": file_name,
                     "width": image_size, "height": image_size})
      for annotation in example.annotations:
        annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                            **annotation})
    coco = {
        "info": {"description": f"megdet_tf shapes dataset, {split} split",
                 "version": "1.0", "seed": seed, "image_size": image_size,
                 "max_objects": max_objects,
                 "scale_range": list(scale_range)},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": CATEGORIES,
    }
    annotation_file = os.path.join(output_dir, "annotations",
                                   f"instances_{split}.json")
    with open(annotation_file, "w") as f:
      json.dump(coco, f)
    result[split] = {"annotation_file": annotation_file,
                     "image_dir": image_dir, "num_images": count,
                     "num_objects": len(annotations)}
  return result
