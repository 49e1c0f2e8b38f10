"""What `build_trainer` checks before it builds the strategy and the model."""
import json

import megdet_tf  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TF)
import numpy as np
import pytest
import tensorflow as tf

from official.vision.data import tf_example_builder

from megdet_tf.training import experiment


def test_malformed_eval_annotations_fail_before_the_strategy(tmp_path):
  builder = tf_example_builder.TfExampleBuilder()
  builder.add_image_matrix_feature(np.zeros((8, 8, 3), np.uint8), "PNG", b"1")
  with tf.io.TFRecordWriter(str(tmp_path / "d-0.tfrecord")) as writer:
    writer.write(builder.example.SerializeToString())
  annotation = {"image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 4],
                "area": 16, "iscrowd": 0}
  path = tmp_path / "instances_val.json"
  path.write_text(json.dumps({
      "images": [{"id": 1, "file_name": "1.png", "height": 8, "width": 8}],
      "categories": [{"id": i} for i in (1, 3, 7, 12, 18, 25)],
      "annotations": [dict(annotation, id=5), dict(annotation, id=5)]}))
  experiment.parse_gin(["gin/demo.gin"], [
      "build_trainer.prepare_data = None",
      f"train/InputReader.file_pattern = '{tmp_path}/d-*'",
      f"eval/InputReader.file_pattern = '{tmp_path}/d-*'",
      f"COCOEvaluator.annotations_file = '{path}'"])
  with pytest.raises(ValueError, match=f"{path}: annotation id 5 appears "
                     "twice"):
    experiment.build_trainer(str(tmp_path / "run"), evaluate=True)
