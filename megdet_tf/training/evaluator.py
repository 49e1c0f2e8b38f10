"""COCO evaluation of the detector under its training strategy.

Every replica predicts its share of each eval batch; the replicas' detections
are gathered and scored with pycocotools (`COCOEvaluator`), written as a COCO
results file, and shown in TensorBoard as scalars and annotated images.
"""
import dataclasses
import os
from typing import Dict, Optional

from absl import logging
import tensorflow as tf

from megdet_tf.dataloaders.category_map import CategoryMap
from megdet_tf.dataloaders.input_reader import InputReader
from megdet_tf.evaluation.coco_evaluator import COCOEvaluator
from megdet_tf.evaluation.image_summaries import EvalImageSummaries

DETECTIONS_FILE = "detections_val.json"  # In model_dir, after an evaluation.
DETECTION_KEYS = ("detection_boxes", "detection_scores", "detection_classes",
                  "num_detections")


@dataclasses.dataclass(frozen=True, eq=False)
class DetectorEvaluator:
  """Evaluates a model on an eval split; prediction is traced once per shape."""
  strategy: tf.distribute.Strategy
  model: tf.keras.Model
  reader: InputReader
  category_map: CategoryMap
  eval_steps: Optional[int]  # Batches to evaluate; None: the whole split.
  num_summary_images: int  # Images shown in TensorBoard.

  def evaluate(self, step: int, summary_writer: tf.summary.SummaryWriter,
               model_dir: Optional[str]) -> Dict[str, float]:
    """COCO metrics of the current weights, written as of `step`.

    Writes `DETECTIONS_FILE` into `model_dir` unless it is None (a worker
    other than the chief).
    """
    evaluator = COCOEvaluator(category_map=self.category_map)
    images_summary = EvalImageSummaries(
        evaluator.ground_truth, self.category_map, self.num_summary_images)

    dataset = self.reader.distribute(self.strategy)
    for i, (images, labels) in enumerate(dataset):
      if self.eval_steps is not None and i >= self.eval_steps:
        break
      predictions = tf.nest.map_structure(lambda t: t.numpy(),
                                          self._predict(images, labels))
      evaluator.update(predictions)
      local = self.strategy.experimental_local_results
      images_summary.add(local(images), local(labels["source_id"]),
                         predictions)
    if model_dir is not None:
      evaluator.write_detections(os.path.join(model_dir, DETECTIONS_FILE))
    if (self.eval_steps is None and
        evaluator.num_images < len(evaluator.ground_truth.imgs)):
      logging.warning(
          "Evaluated %d of the %d images of %s: the eval TFRecords "
          "(eval/InputReader.file_pattern) hold only part of that split, so "
          "the metrics are for that part.", evaluator.num_images,
          len(evaluator.ground_truth.imgs), evaluator.annotations_file)
    metrics = evaluator.evaluate()
    with summary_writer.as_default(step=step):
      for name, value in metrics.items():
        tf.summary.scalar(f"eval/{name}", value)
      images_summary.write()
    summary_writer.flush()
    logging.info("step %d COCO metrics: %s", step,
                 "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return metrics

  @tf.function
  def _predict(self, images, labels):
    """Detections of every replica's images (traced once per batch shape)."""
    return self.strategy.experimental_local_results(
        self.strategy.run(self._replica_predict, args=(images, labels)))[0]

  def _replica_predict(self, images, labels):
    """Every replica's outputs, gathered on each replica.

    The replica context's all-gather, not `strategy.gather`: in TF 2.20 the
    latter returns only the first replica's rows under MirroredStrategy on
    logical CPU devices.
    """
    # A short last batch can leave a replica with no image, and the CPU
    # kernels fail on an empty batch: run one blank image instead, keep none.
    count = tf.shape(images)[0]
    pad = tf.cast(tf.equal(count, 0), tf.int32)
    images, model_labels = tf.nest.map_structure(
        lambda t: tf.concat([t, tf.zeros(
            tf.concat([[pad], tf.shape(t)[1:]], 0), t.dtype)], 0),
        (images, {k: labels[k] for k in ("image_info", "anchor_boxes")}))
    outputs = self.model.call_with_labels(images, model_labels,
                                           training=False)
    outputs = {k: outputs[k][:count] for k in DETECTION_KEYS}
    return tf.distribute.get_replica_context().all_gather(
        dict(source_id=labels["source_id"], image_info=labels["image_info"],
             **outputs), axis=0)
