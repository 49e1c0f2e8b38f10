"""Tests of the collective cost report on real and constructed traces."""
from megdet_tf.training import allreduce_report
from megdet_tf.training import profiling
import pytest
import tensorflow as tf
from tensorflow.python.distribute import collective_util
from tensorflow.python.distribute import cross_device_utils


def _event(name, ts, dur, **args):
  return {"ph": "X", "name": name, "ts": ts, "dur": dur, "args": args}


def _collective(scope, ts, dur, op="CollectiveReduceV2"):
  return _event(op, ts, dur, long_name=f"replica_1/{scope}/{op}:{op}")


def test_kinds_follow_the_name_scopes():
  assert allreduce_report.kind_of(
      "while/body/_8/faster_rcnn/res_net/conv1_bn/group_moments/"
      "cgbn_allgather/CollectiveGatherV2:CollectiveGatherV2") == "cgbn_forward"
  assert allreduce_report.kind_of(
      "replica_3/faster_rcnn/res_net/conv1_bn/group_moments/"
      "cgbn_grad_allreduce/CollectiveReduceV2") == "cgbn_backward"
  assert allreduce_report.kind_of(
      "gradient_allreduce/CollectiveReduceV2_3") == "gradient"
  assert allreduce_report.kind_of(
      "rpn_loss_1/rpn_box_loss/CollectiveReduceV2") == "other"
  # A layer merely named like a scope is not that scope.
  assert allreduce_report.kind_of(
      "my_gradient_allreduce_layer/CollectiveReduceV2") == "other"


def test_overlapping_collectives_count_once_and_outside_ops_not_at_all():
  events = [
      # Two loop calls: steps 1-2 in [0, 2000) and step 3 in [5000, 6000).
      _event(profiling.TRAIN_EVENT, 0, 2000, step_num="1", num_steps="2"),
      _event(profiling.TRAIN_EVENT, 5000, 1000, step_num="3", num_steps="1"),
      # Two replicas' CGBN gathers overlapping on [100, 400): 300 us.
      _collective("cgbn_allgather", 100, 200, "CollectiveGatherV2"),
      _collective("cgbn_allgather", 150, 250, "CollectiveGatherV2"),
      # Backward CGBN [900, 1000) inside the gradient all-reduce [800, 1400).
      _collective("cgbn_grad_allreduce", 900, 100),
      _collective("gradient_allreduce", 800, 600),
      # Crosses the end of the second call: only [5900, 6000) counts.
      _collective("gradient_allreduce", 5900, 500),
      # Outside both calls: ignored.
      _collective("gradient_allreduce", 3000, 100),
      _event("Conv2D", 0, 2000),
  ]
  report = allreduce_report.summarize(events, num_replicas=2)
  assert report["steps"] == 3 and report["loop_calls"] == 2
  assert report["step_ms"] == pytest.approx(3000 / 3 / 1e3)
  union_us = 300 + 600 + 100
  assert report["collective_ms"] == pytest.approx(union_us / 3 / 1e3)
  assert report["cgbn_forward_ms"] == pytest.approx(300 / 3 / 1e3)
  assert report["cgbn_ms"] == pytest.approx(400 / 3 / 1e3)
  assert report["gradient_share"] == pytest.approx(700 / union_us)
  assert report["cgbn_share"] + report["gradient_share"] > 1  # Overlap.
  assert report["gradient_count"] == pytest.approx(2 / (3 * 2))
  assert report["cgbn_count"] == pytest.approx(3 / (3 * 2))
  assert "gradient_bytes" not in report
  table = allreduce_report.format_table([dict(report, group_size=2)])
  assert table.splitlines()[2].startswith("| 2 | 1.0 | 0.3 | 33% |")


def test_a_trace_without_train_events_is_rejected():
  with pytest.raises(ValueError, match="ProfileWindow"):
    allreduce_report.summarize([_collective("gradient_allreduce", 0, 1)], 1)


def test_profiled_loop_reports_collectives_and_payloads_of_loop_bodies(
    tmp_path):
  """A trainer-shaped loop: steps in a while loop that may break."""
  keys = cross_device_utils.CollectiveKeys(group_key_start=4242)
  keys.get_group_key(["/cpu:0"])
  launcher = cross_device_utils.CollectiveReplicaLauncher(
      4242, 1, keys, "/cpu:0", collective_util.Options())
  gradient = tf.ones([10])
  statistics = tf.ones([2, 3], tf.float64)

  def step():
    with tf.name_scope("gradient_allreduce"):
      g = launcher.all_reduce(gradient)
    with tf.name_scope("cgbn_grad_allreduce"):
      s = launcher.all_reduce(statistics)
    return tf.reduce_sum(g) + tf.cast(tf.reduce_sum(s), tf.float32)

  @tf.function
  def train_loop(num_steps):
    total = tf.constant(0.0)
    for _ in tf.range(num_steps):
      total += step()
      if total > 1e30:
        break
    return total

  train_loop(tf.constant(2))  # Traces outside the window.
  window = profiling.ProfileWindow(str(tmp_path), profile_steps=(1, 3))
  with window.loop(0, 3, end=3):
    train_loop(tf.constant(3)).numpy()

  payloads = allreduce_report.collective_payloads(
      train_loop.get_concrete_function(tf.constant(3)))
  assert sorted(payloads.values()) == [10 * 4, 6 * 8]
  report = allreduce_report.report(str(tmp_path), 1, payloads)
  assert report["steps"] == 3 and report["loop_calls"] == 1
  assert report["gradient_count"] == 1 and report["cgbn_backward_count"] == 1
  assert report["gradient_bytes"] == 10 * 4
  assert report["cgbn_backward_bytes"] == 6 * 8
  assert 0 < report["collective_ms"] <= report["step_ms"]
