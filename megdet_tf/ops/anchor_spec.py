"""The anchors and the RPN's sampling of them, configured once.

The parser labels the anchors the model decodes, and the loss divides the RPN
objectness loss by the number of anchors the parser samples per image. All
three read one `AnchorSpec` (Gin: `AnchorSpec.anchor_size = 4.0`, ...), so
they cannot disagree: the model its geometry, the parser all of it, the loss
`rpn_batch_size_per_im`. Field names and defaults are Model Garden's Faster
R-CNN's: anchors on P2-P6, one scale, three aspect ratios, 8 x the level's
stride (32 px at P2); 256 anchors sampled per image, at most half of them
positive (IoU >= 0.7), negatives below IoU 0.3.
"""
import dataclasses
from typing import Any, Dict, Mapping, Sequence

import gin


@gin.configurable
@dataclasses.dataclass(frozen=True)
class AnchorSpec:
  """Anchor geometry and RPN anchor sampling.

  Attributes:
    min_level: finest FPN level with anchors (stride 2**min_level).
    max_level: coarsest FPN level with anchors.
    num_scales: anchor scales per octave.
    aspect_ratios: anchor width/height ratios.
    anchor_size: anchor side in units of the level's stride.
    rpn_match_threshold: IoU from which an anchor is positive.
    rpn_unmatched_threshold: IoU below which an anchor is negative.
    rpn_batch_size_per_im: anchors sampled per image for the RPN
      classification loss, which is divided by it.
    rpn_fg_fraction: the largest fraction of positives among them.
  """
  min_level: int = 2
  max_level: int = 6
  num_scales: int = 1
  aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0)
  anchor_size: float = 8.0
  rpn_match_threshold: float = 0.7
  rpn_unmatched_threshold: float = 0.3
  rpn_batch_size_per_im: int = 256
  rpn_fg_fraction: float = 0.5

  def __post_init__(self):
    # Gin and JSON give lists; a tuple keeps the spec immutable and hashable.
    object.__setattr__(self, "aspect_ratios", tuple(self.aspect_ratios))
    is_int = lambda x: isinstance(x, int) and not isinstance(x, bool)
    checks = (
        ("min_level", is_int(self.min_level) and self.min_level >= 1,
         "an integer >= 1"),
        ("max_level", is_int(self.max_level) and
         self.max_level >= self.min_level,
         f"an integer >= min_level ({self.min_level})"),
        ("num_scales", is_int(self.num_scales) and self.num_scales >= 1,
         "an integer >= 1"),
        ("aspect_ratios", bool(self.aspect_ratios) and
         all(r > 0 for r in self.aspect_ratios), "non-empty and positive"),
        ("anchor_size", self.anchor_size > 0, "positive"),
        ("rpn_match_threshold", 0 <= self.rpn_match_threshold <= 1,
         "in [0, 1]"),
        ("rpn_unmatched_threshold",
         0 <= self.rpn_unmatched_threshold <= self.rpn_match_threshold,
         f"in [0, rpn_match_threshold ({self.rpn_match_threshold})]"),
        ("rpn_batch_size_per_im", is_int(self.rpn_batch_size_per_im) and
         self.rpn_batch_size_per_im >= 1, "an integer >= 1"),
        ("rpn_fg_fraction", 0 < self.rpn_fg_fraction <= 1, "in (0, 1]"),
    )
    for field, valid, requirement in checks:
      if not valid:
        raise ValueError(f"AnchorSpec.{field} must be {requirement}, got "
                         f"{getattr(self, field)!r}")

  @property
  def num_anchors_per_location(self) -> int:
    """Anchors per feature map position: scales x aspect ratios."""
    return self.num_scales * len(self.aspect_ratios)

  def anchor_args(self) -> Dict[str, Any]:
    """The geometry as Model Garden's anchor generators and model take it."""
    return dict(min_level=self.min_level, max_level=self.max_level,
                num_scales=self.num_scales,
                aspect_ratios=list(self.aspect_ratios),
                anchor_size=self.anchor_size)

  def to_config(self) -> Dict[str, Any]:
    """Every field as plain JSON-able data, what `from_config` takes."""
    return dict(dataclasses.asdict(self),
                aspect_ratios=list(self.aspect_ratios))

  @classmethod
  def from_config(cls, config: Mapping[str, Any]) -> "AnchorSpec":
    return cls(**config)
