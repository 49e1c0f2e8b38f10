"""Tests of the profile window and of profiling a real training run.

The end-to-end test runs tools/profile_allreduce.py (a fresh process per
setting) on the tiny 4-replica model of train_test.py and checks the report
against the model: CGBN layers and their widths, trainable bytes.
"""
import glob
import json
import os
import subprocess
import sys

import gin
from megdet_tf.modeling import faster_rcnn
from megdet_tf.modeling.layers import cross_replica_batch_norm
from megdet_tf.training import allreduce_report
from megdet_tf.training import profiling
import pytest
import tensorflow as tf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_test import REPO, tiny_params  # pylint: disable=g-import-not-at-top,g-bad-import-order

PROFILE_ALLREDUCE = os.path.join(REPO, "tools", "profile_allreduce.py")


@pytest.mark.parametrize("steps", [(0, 2), (3, 2), (1,), (1.0, 2), "1,2"])
def test_window_must_be_first_and_last_step(steps):
  with pytest.raises(ValueError, match="ProfileWindow.profile_steps"):
    profiling.ProfileWindow("/tmp", profile_steps=steps)


def test_loops_stop_before_the_first_and_after_the_last_step():
  window = profiling.ProfileWindow("/tmp", profile_steps=(3, 5))
  assert window.boundaries_after(0) == [2, 5]
  assert window.boundaries_after(2) == [5]
  assert window.boundaries_after(5) == []
  assert profiling.ProfileWindow("/tmp").boundaries_after(0) == []


def _train_events(logdir):
  runs = glob.glob(os.path.join(logdir, "plugins", "profile", "*"))
  assert len(runs) == 1, runs
  return [e for e in allreduce_report.trace_events(
      allreduce_report.latest_profile(logdir))
          if allreduce_report.is_train_event(e)]


def test_only_the_window_is_profiled(tmp_path):
  square = tf.function(lambda x: tf.reduce_sum(x * x))
  window = profiling.ProfileWindow(str(tmp_path), profile_steps=(3, 4))
  for step in range(6):
    with window.loop(step, 1, end=6):
      square(tf.ones([8])).numpy()
  steps = sorted(int(e["args"]["step_num"]) for e in _train_events(tmp_path))
  assert steps == [3, 4]
  tf.profiler.experimental.start(str(tmp_path / "again"))  # Was stopped.
  tf.profiler.experimental.stop()


def test_window_past_the_end_of_training_stops_at_the_end(tmp_path):
  window = profiling.ProfileWindow(str(tmp_path), profile_steps=(2, 50))
  for step in range(3):
    with window.loop(step, 1, end=3):
      tf.reduce_sum(tf.ones([8])).numpy()
  assert len(_train_events(tmp_path)) == 2
  tf.profiler.experimental.start(str(tmp_path / "again"))
  tf.profiler.experimental.stop()


def test_a_failing_loop_stops_the_profiler_and_keeps_the_trace(tmp_path):
  window = profiling.ProfileWindow(str(tmp_path), profile_steps=(1, 4))
  with pytest.raises(RuntimeError, match="diverged"):
    with window.loop(0, 4, end=10):
      tf.reduce_sum(tf.ones([8])).numpy()
      raise RuntimeError("diverged")
  assert len(_train_events(tmp_path)) == 1
  tf.profiler.experimental.start(str(tmp_path / "again"))
  tf.profiler.experimental.stop()


def _tiny_model_facts(params):
  """CGBN layer names and widths and trainable bytes of the tiny detector."""
  from megdet_tf.training import experiment  # pylint: disable=g-import-not-at-top
  experiment.parse_gin(["gin/demo.gin"], params)
  try:
    num_classes = len(gin.query_parameter("CategoryMap.category_ids")) + 1
    model = faster_rcnn.build_faster_rcnn(num_classes=num_classes)
  finally:
    gin.clear_config()
  cgbn = [layer for layer in model.submodules if isinstance(
      layer, cross_replica_batch_norm.CrossReplicaBatchNormalization)]
  trainable_bytes = sum(v.shape.num_elements() * v.dtype.size
                        for v in model.trainable_variables)
  return ({layer.name for layer in cgbn},
          [layer.moving_mean.shape[0] for layer in cgbn], trainable_bytes)


@pytest.mark.slow
def test_profiled_window_on_four_replicas_reports_cgbn_and_gradients(
    tmp_path):
  replicas, group_size = 4, 4
  params = tiny_params(str(tmp_path / "data"), replicas=replicas, **{
      "DetectorTrainer.steps_per_loop": 4,
      "DetectorTrainer.checkpoint_every_steps": 100,
      "NUM_TRAIN_IMAGES": 400,  # A schedule long enough for any decay policy.
      # CPU replicas of one process share CGBN rows in the graph by default;
      # profile the collectives that GPUs run instead.
      "build_norm.exchange": "'collective'"})
  output_dir = tmp_path / "out"
  result = subprocess.run(
      [sys.executable, PROFILE_ALLREDUCE, "--gin_file=gin/demo.gin",
       f"--output_dir={output_dir}", f"--group_sizes={group_size},3",
       "--warmup_steps=1", "--profile_steps=2"] +
      [f"--gin_param={p}" for p in params],
      cwd=REPO, capture_output=True, text=True, timeout=900, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "group size 3 does not divide 4 replicas" in result.stderr

  with open(output_dir / "allreduce_report.json") as f:
    (row,) = json.load(f)["settings"]
  # Steps 2..3 ran in one loop call: the trainer stopped its loop of 4 steps
  # after step 1 and after step 3.
  assert row["profile_steps"] == [2, 3]
  assert row["steps"] == 2 and row["loop_calls"] == 1
  assert row["num_replicas"] == replicas

  layer_names, widths, trainable_bytes = _tiny_model_facts(params)
  assert len(widths) > 10  # ResNet-18's BN layers at least.
  run_dir = output_dir / f"group_size_{group_size}"
  events = allreduce_report.trace_events(
      allreduce_report.latest_profile(str(run_dir)))
  collectives = [e["args"]["long_name"] for e in events
                 if e["name"] in allreduce_report.COLLECTIVE_OPS]
  # In the trace, under each layer's name: one all-gather forward and one
  # all-reduce backward per CGBN layer, replica and step.
  for passed in ("cgbn_forward", "cgbn_backward"):
    names = [n for n in collectives if allreduce_report.kind_of(n) == passed]
    assert len(names) == len(widths) * row["steps"] * replicas
    assert {n.split("/group_batch_norm/")[0].split("/")[-1]
            for n in names} == layer_names
    assert row[f"{passed}_count"] == len(widths)
  # Float32 payloads: forward, the group's (count, mean, M2) rows; backward,
  # the sums of dy and dy * x_hat.
  assert row["cgbn_forward_bytes"] == sum(group_size * 3 * c * 4
                                          for c in widths)
  assert row["cgbn_backward_bytes"] == sum(2 * c * 4 for c in widths)
  # Every trainable weight's gradient is all-reduced once per step.
  assert row["gradient_count"] >= 1
  assert row["gradient_bytes"] == trainable_bytes
  # The input pipeline's wait is named too.
  assert any("input_wait/" in value for e in events
             for value in e.get("args", {}).values())

  # Times add up: unions are at most sums, shares within [0, 1].
  kinds_ms = [row[f"{k}_ms"] for k in allreduce_report.KINDS]
  assert max(kinds_ms) <= row["collective_ms"] <= sum(kinds_ms) + 1e-9
  assert 0 < row["collective_ms"] < row["step_ms"]
  assert row["cgbn_ms"] <= (row["cgbn_forward_ms"] + row["cgbn_backward_ms"] +
                            1e-9)
  for group in allreduce_report.GROUPS:
    assert 0 <= row[f"{group}_share"] <= 1
  assert row["cgbn_share"] > 0 and row["gradient_share"] > 0

  # The table on stdout, TensorBoard's profile, scalars and text.
  assert f"| {group_size} | {row['step_ms']:.1f} |" in result.stdout
  assert glob.glob(str(run_dir / "plugins/profile/*/*.xplane.pb"))
  tags = {value.tag
          for path in glob.glob(str(run_dir / "events.out.tfevents.*"))
          for event in tf.compat.v1.train.summary_iterator(path)
          for value in event.summary.value}
  assert {"allreduce/collective_ms", "allreduce/cgbn_share",
          "train/total_loss"} <= tags
  assert glob.glob(str(output_dir / "events.out.tfevents.*"))
