"""The MegDet training objective: L = (1/N) sum_i l(x_i, w) + (lambda/2)|w|^2.

l = RPN classification + RPN box regression + Fast R-CNN classification + Fast
R-CNN box regression, each computed by Model Garden's `maskrcnn_losses`:

- RPN objectness: sigmoid cross entropy over the anchors the parser sampled,
  divided by the number it samples per image (`AnchorSpec`'s
  `rpn_batch_size_per_im`, 256, Detectron's normalizer; Model Garden's task
  passes the RoI count instead);
- RPN boxes: Huber (delta 1/9, Detectron's smooth-L1 beta) over positive
  anchors, divided by the number of positives averaged over replicas;
- Fast R-CNN classes: softmax cross entropy averaged over the sampled RoIs;
- Fast R-CNN boxes: Huber (delta 1) on the ground-truth class's deltas of
  the foreground RoIs, divided by their count averaged over replicas.

Weight decay `(lambda/2) * sum w^2` (lambda = 1e-4, the paper's) covers, by
default, conv and dense *kernels* only (`weight_decay_on='kernels'`): decaying
normalization scales/offsets pulls them towards 0 rather than towards their
identity values, and biases carry no scale to regularize; this is Model
Garden's choice (its L2 regularizer is attached to kernels only) and
Detectron2's for norms. `'all'` decays every trainable variable, the paper's
formula read literally. Only the variables passed in are candidates: pass
`model.trainable_variables`, so frozen layers are never decayed.

All terms are per replica: a replicated step divides the total by the number
of replicas before summing gradients, so the l2 term counts once overall.
"""
from typing import Dict, Iterable, Mapping, Optional

import gin
import tensorflow as tf

from official.vision.losses import maskrcnn_losses

from megdet_tf.ops.anchor_spec import AnchorSpec

WEIGHT_DECAY_ON = ("kernels", "all")


def decayed_variables(variables: Iterable[tf.Variable],
                      weight_decay_on: str = "kernels") -> list:
  """The variables among `variables` that `FasterRCNNLoss` decays."""
  if weight_decay_on not in WEIGHT_DECAY_ON:
    raise ValueError(f"FasterRCNNLoss.weight_decay_on must be one of "
                     f"{WEIGHT_DECAY_ON}, got {weight_decay_on!r}")
  return [v for v in variables if weight_decay_on == "all" or
          v.name.split("/")[-1].startswith("kernel")]


@gin.configurable
class FasterRCNNLoss:
  """Computes every loss term of a Faster R-CNN training step."""

  # The terms `__call__` returns, in order.
  KEYS = ("rpn_score_loss", "rpn_box_loss", "frcnn_cls_loss", "frcnn_box_loss",
          "model_loss", "l2_loss", "total_loss")

  def __init__(self,
               anchor_spec: Optional[AnchorSpec] = None,
               rpn_huber_loss_delta: float = 1.0 / 9.0,
               frcnn_huber_loss_delta: float = 1.0,
               weight_decay: float = 1e-4,
               weight_decay_on: str = "kernels"):
    """Configures the loss.

    Args:
      anchor_spec: its `rpn_batch_size_per_im` divides the RPN
        classification loss; Gin's `AnchorSpec` (the parser's) if None.
      rpn_huber_loss_delta: Huber delta of the RPN box loss.
      frcnn_huber_loss_delta: Huber delta of the Fast R-CNN box loss.
      weight_decay: lambda of (lambda/2)|w|^2.
      weight_decay_on: `kernels` (conv/dense kernels) or `all` (every
        trainable variable).
    """
    decayed_variables([], weight_decay_on)  # Validates the choice.
    self._rpn_score_loss = maskrcnn_losses.RpnScoreLoss(
        (anchor_spec or AnchorSpec()).rpn_batch_size_per_im)
    self._rpn_box_loss = maskrcnn_losses.RpnBoxLoss(rpn_huber_loss_delta)
    self._frcnn_class_loss = maskrcnn_losses.FastrcnnClassLoss()
    self._frcnn_box_loss = maskrcnn_losses.FastrcnnBoxLoss(
        frcnn_huber_loss_delta)
    self._weight_decay = weight_decay
    self._weight_decay_on = weight_decay_on

  def __call__(self, outputs: Mapping[str, tf.Tensor],
               labels: Mapping[str, tf.Tensor],
               variables: Iterable[tf.Variable]) -> Dict[str, tf.Tensor]:
    """Returns each term, their sum `model_loss` and `total_loss`.

    Args:
      outputs: the model's training outputs.
      labels: the parser's training labels.
      variables: the model's trainable variables (weight decay candidates).
    """
    to_float = lambda x: tf.cast(x, tf.float32)
    outputs = tf.nest.map_structure(to_float, {
        k: outputs[k] for k in ("rpn_scores", "rpn_boxes", "class_outputs",
                                "box_outputs", "class_targets", "box_targets")
    })
    labels = tf.nest.map_structure(to_float, {
        k: labels[k] for k in ("rpn_score_targets", "rpn_box_targets")})
    losses = {
        "rpn_score_loss": self._rpn_score_loss(
            outputs["rpn_scores"], labels["rpn_score_targets"]),
        "rpn_box_loss": self._rpn_box_loss(
            outputs["rpn_boxes"], labels["rpn_box_targets"]),
        "frcnn_cls_loss": self._frcnn_class_loss(
            outputs["class_outputs"], outputs["class_targets"]),
        "frcnn_box_loss": self._frcnn_box_loss(
            outputs["box_outputs"], outputs["class_targets"],
            outputs["box_targets"]),
    }
    losses["model_loss"] = tf.add_n(list(losses.values()))
    decayed = decayed_variables(variables, self._weight_decay_on)
    # tf.nn.l2_loss(w) = |w|^2 / 2 in one kernel; its gradient is one Mul.
    losses["l2_loss"] = self._weight_decay * tf.add_n(
        [tf.nn.l2_loss(tf.cast(v, tf.float32)) for v in decayed]
    ) if decayed else tf.constant(0.0)
    losses["total_loss"] = losses["model_loss"] + losses["l2_loss"]
    return losses
