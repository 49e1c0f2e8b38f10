"""End-to-end tests of tools/train.py and the training loop, in subprocesses.

Each run is a fresh process (logical CPU devices must be configured before
TensorFlow starts) on a tiny model and a tiny generated dataset.
"""
import json
import os
import signal
import subprocess
import sys
import time

import megdet_tf  # noqa: F401  pylint: disable=unused-import
import numpy as np
import pytest
import tensorflow as tf

from megdet_tf import result_line
from megdet_tf.evaluation import coco_evaluator

REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
TRAIN = os.path.join(REPO, "tools", "train.py")
TRAIN_STEPS = os.path.join(REPO, "tests", "training", "train_steps_main.py")
TIMEOUT = 600


def tiny_params(data_dir, replicas=1, **overrides):
  """Bindings over gin/demo.gin: 64 px images, a tiny model, 8 images."""
  params = {
      "prepare_shapes_dataset.data_dir": repr(data_dir),
      "prepare_shapes_dataset.num_train": 8,
      "prepare_shapes_dataset.num_val": 4,
      "prepare_shapes_dataset.image_size": 64,
      "prepare_shapes_dataset.num_shards": 2,
      "train/InputReader.file_pattern": repr(f"{data_dir}/tfrecord/train-*"),
      "eval/InputReader.file_pattern": repr(f"{data_dir}/tfrecord/val-*"),
      "COCOEvaluator.annotations_file":
          repr(f"{data_dir}/annotations/instances_val.json"),
      "train/InputReader.deterministic": True,
      "train/InputReader.seed": 1,
      "configure_process.seed": 1,
      "train/InputReader.drop_images_without_boxes": False,
      "DetectionParser.aug_rand_hflip": False,
      "DetectionParser.short_side": 64,
      "DetectionParser.long_side": 64,
      "ResNet.width_multiplier": 0.125,
      "FPN.num_filters": 16,
      "RPNHead.num_filters": 16,
      "BoxHead.fc_dims": 32,
      "MultilevelROIGenerator.pre_nms_top_k": 100,
      "MultilevelROIGenerator.num_proposals": 50,
      "MultilevelROIGenerator.test_pre_nms_top_k": 100,
      "MultilevelROIGenerator.test_num_proposals": 50,
      # Sampling takes every anchor and RoI candidate, so runs are repeatable
      # although Model Garden's samplers draw from unseeded random ops.
      "AnchorSpec.rpn_batch_size_per_im": 4096,
      "ROISampler.num_sampled_rois": 150,  # 50 proposals + 100 gt slots.
      "GLOBAL_BATCH_SIZE": 2 * replicas,
      # The demo's decay epochs fall inside the run with room to spare.
      "NUM_TRAIN_IMAGES": 400,
      "build_lr_schedule.warmup_steps": 0,
      "build_strategy.kind": repr("mirrored" if replicas > 1 else
                                  "one_device"),
      "build_strategy.num_cpu_replicas": replicas,
      "DetectorTrainer.steps_per_loop": 1,
      "DetectorTrainer.checkpoint_every_steps": 2,
      "DetectorTrainer.log_every_seconds": 0,
  }
  params.update(overrides)
  return [f"{k}={v}" for k, v in params.items()]


def run(args, timeout=TIMEOUT, env=None):
  return subprocess.run([sys.executable] + args, cwd=REPO, timeout=timeout,
                        capture_output=True, text=True, env=env, check=False)


def train_cmd(model_dir, params, *flags):
  return [TRAIN, "--gin_file=gin/demo.gin", f"--model_dir={model_dir}",
          "--mode=train"] + [f"--gin_param={p}" for p in params] + list(flags)


def checkpoint_weights(model_dir):
  path = tf.train.latest_checkpoint(model_dir)
  reader = tf.train.load_checkpoint(path)
  return path, {name: reader.get_tensor(name)
                for name in reader.get_variable_to_shape_map()
                if name.startswith("model/") and "OPTIMIZER_SLOT" not in name}


@pytest.mark.slow
def test_mirrored_steps_lower_the_loss_and_keep_replicas_identical(tmp_path):
  """The detector with CGBN and recomputation, trained on 4 CPU replicas."""
  result = run([TRAIN_STEPS, str(tmp_path / "run"), "6"] +
               tiny_params(str(tmp_path / "data"), replicas=4,
                           **{"ResNet.recompute": True}))
  assert result.returncode == 0, result.stderr[-3000:]
  report = result_line.read_result(result.stdout)
  assert report["num_replicas"] == 4
  assert report["norm_classes"] == ["CrossReplicaBatchNormalization"]
  assert report["norms_moved"] == report["norms"] > 0
  losses = report["losses"]
  assert all(np.isfinite(losses))
  assert losses[-1] < losses[0], losses
  assert report["replica_weight_max_diff"] == 0.0


@pytest.mark.slow
def test_one_image_per_replica_trains(tmp_path):
  """2 replicas x 1 image: batch 1 met a oneDNN heap corruption in the
  8-channel strided shortcut's weight gradient (see layers/conv2d.py)."""
  result = run([TRAIN_STEPS, str(tmp_path / "run"), "3"] +
               tiny_params(str(tmp_path / "data"), replicas=2,
                           GLOBAL_BATCH_SIZE=2))
  assert result.returncode == 0, (result.returncode, result.stderr[-3000:])
  report = result_line.read_result(result.stdout)
  assert report["num_replicas"] == 2
  assert len(report["losses"]) == 3 and all(np.isfinite(report["losses"]))


@pytest.mark.slow
def test_killed_or_preempted_run_resumes_to_the_uninterrupted_weights(
    tmp_path):
  data = str(tmp_path / "data")
  # Model Garden's RoIAlign: its backward pass is bitwise reproducible, so
  # resuming can be compared with an uninterrupted run.
  params = tiny_params(data, **{
      "MultilevelROIAligner.use_crop_and_resize": False})
  steps = "--max_steps=8"
  reference = run(train_cmd(tmp_path / "reference", params, steps))
  assert reference.returncode == 0, reference.stderr[-3000:]

  interrupted = tmp_path / "interrupted"
  log = tmp_path / "interrupted.log"
  with open(log, "w") as stderr:
    process = subprocess.Popen(  # pylint: disable=consider-using-with
        [sys.executable] + train_cmd(interrupted, params, steps), cwd=REPO,
        stdout=subprocess.DEVNULL, stderr=stderr)
  deadline = time.time() + TIMEOUT
  while not (interrupted / "ckpt-4.index").exists():
    assert process.poll() is None, log.read_text()[-3000:]
    assert time.time() < deadline
    time.sleep(0.02)
  process.send_signal(signal.SIGKILL)
  process.wait()
  killed_at, _ = checkpoint_weights(str(interrupted))
  assert not killed_at.endswith("-8")

  resumed = run(train_cmd(interrupted, params, steps))
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "Restored" in resumed.stderr
  path, weights = checkpoint_weights(str(interrupted))
  ref_path, ref_weights = checkpoint_weights(str(tmp_path / "reference"))
  assert path.endswith("ckpt-8") and ref_path.endswith("ckpt-8")
  assert weights.keys() == ref_weights.keys()
  for name, value in ref_weights.items():
    np.testing.assert_allclose(weights[name], value, rtol=1e-4, atol=1e-6,
                               err_msg=name)

  # Preemption: SIGTERM saves the step it reached and exits with 42; the
  # restart continues the schedule and the data order exactly.
  preempted = tmp_path / "preempted"
  never = ["--gin_param=DetectorTrainer.checkpoint_every_steps=100"]
  process = subprocess.Popen(  # pylint: disable=consider-using-with
      [sys.executable] + train_cmd(preempted, params, steps) + never,
      cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  lines = []
  for line in process.stderr:
    lines.append(line)
    if " step 3/" in line:
      process.send_signal(signal.SIGTERM)
      break
  else:
    pytest.fail("The run ended before step 3:\n" + "".join(lines[-50:]))
  rest = process.communicate(timeout=120)[1]
  assert process.returncode == 42, rest[-3000:]
  assert "run the same command again to resume" in rest
  saved_at, _ = checkpoint_weights(str(preempted))
  assert int(saved_at.rsplit("-", 1)[1]) in (4, 5, 6, 7), saved_at
  resumed = run(train_cmd(preempted, params, steps) + never)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"Restored {saved_at}" in resumed.stderr
  _, preempted_weights = checkpoint_weights(str(preempted))
  for name, value in ref_weights.items():
    np.testing.assert_allclose(preempted_weights[name], value, rtol=1e-4,
                               atol=1e-6, err_msg=name)

  # Divergence: an absurd learning rate from the finished run's checkpoint.
  diverged = run(train_cmd(interrupted, params, "--max_steps=12") +
                 ["--gin_param=build_lr_schedule.base_learning_rate=1e9"])
  assert diverged.returncode == 3, diverged.stderr[-3000:]
  assert "Training diverged at step" in diverged.stderr
  assert "is a healthy state" in diverged.stderr
  with open(interrupted / "diverged.json") as f:
    record = json.load(f)
  assert 8 < record["step"] <= 12 and record["learning_rate"] > 1e8
  assert record["losses"].keys() >= {"total_loss", "rpn_score_loss"}
  after_path, after = checkpoint_weights(str(interrupted))
  assert after_path == path
  for name, value in weights.items():
    np.testing.assert_array_equal(after[name], value, err_msg=name)


def test_misspelled_gin_parameter_fails_before_training(tmp_path):
  result = run(train_cmd(tmp_path / "run", [
      "DetectorTrainer.stepz_per_loop=3"]), timeout=120)
  assert result.returncode != 0
  assert "stepz_per_loop" in result.stderr
  assert not (tmp_path / "run" / "checkpoint").exists()


def test_xla_with_grouped_cgbn_is_refused_before_tracing(tmp_path):
  params = tiny_params(str(tmp_path / "data"), replicas=2,
                       **{"DetectorTrainer.jit_compile": True})
  result = run(train_cmd(tmp_path / "run", params), timeout=300)
  assert result.returncode != 0
  assert ("jit_compile=True with cross-replica BN in groups of 2 (35 layers"
          in result.stderr), result.stderr[-3000:]
  assert not (tmp_path / "run" / "checkpoint").exists()


def test_paper_config_without_coco_says_what_to_do(tmp_path):
  result = run([TRAIN, "--gin_file=gin/megdet_bs256.gin",
                f"--model_dir={tmp_path}"], timeout=120)
  assert result.returncode != 0
  for expected in ("COCO 2017 is expected under data/coco",
                   "tools/create_coco_tfrecord.py", "gin/demo.gin"):
    assert expected in result.stderr


def test_foreign_file_in_the_dataset_is_named(tmp_path):
  (tmp_path / "train-0.tfrecord").write_text("not a record")
  params = tiny_params(str(tmp_path / "data"), **{
      "train/InputReader.file_pattern": repr(f"{tmp_path}/train-*")})
  result = run(train_cmd(tmp_path / "run", params), timeout=300)
  assert result.returncode != 0
  assert "train-0.tfrecord" in result.stderr
  assert "is not a TFRecord" in result.stderr


@pytest.mark.slow
def test_two_localhost_workers_train_identical_weights(tmp_path):
  sys.path.insert(0, os.path.join(REPO, "tools"))
  import launch_local  # pylint: disable=g-import-not-at-top
  data = str(tmp_path / "data")
  params = tiny_params(data, **{"build_strategy.kind": "'multi_worker'",
                                "GLOBAL_BATCH_SIZE": 4})
  # Both workers start on a missing dataset: the chief makes it, the other
  # waits for it.
  ports = launch_local.free_ports(2)
  workers = [subprocess.Popen(  # pylint: disable=consider-using-with
      [sys.executable, TRAIN_STEPS, str(tmp_path / "run"), "4"] + params,
      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      env=dict(os.environ, TF_CONFIG=launch_local.tf_config(ports, i)))
             for i in range(2)]
  try:
    outputs = [w.communicate(timeout=TIMEOUT) for w in workers]
  finally:
    for w in workers:
      w.kill()
  for w, (_, stderr) in zip(workers, outputs):
    assert w.returncode == 0, "\n".join(e[-3000:] for _, e in outputs)
  reports = [result_line.read_result(out) for out, _ in outputs]
  assert [r["num_replicas"] for r in reports] == [2, 2]
  assert reports[0]["checksum"] == reports[1]["checksum"]
  assert reports[0]["losses"] == reports[1]["losses"]
  assert all(np.isfinite(reports[0]["losses"]))
  assert (tmp_path / "run" / "checkpoint").exists()
  assert not (tmp_path / "run" / ".worker_1").exists()


def test_a_worker_whose_peer_never_starts_stops_naming_the_timeout(tmp_path):
  """Worker 0 of a 2-worker TF_CONFIG whose worker 1 never starts (as if it
  failed before building its strategy): TensorFlow would wait for it (still
  after 10 minutes, deaf to SIGTERM); the collective timeout bounds it."""
  sys.path.insert(0, os.path.join(REPO, "tools"))
  import launch_local  # pylint: disable=g-import-not-at-top
  params = tiny_params(str(tmp_path / "data"), **{
      "build_strategy.kind": "'multi_worker'",
      "build_strategy.collective_timeout_seconds": 5,
      "GLOBAL_BATCH_SIZE": 4})
  result = run(train_cmd(tmp_path / "run", params), timeout=300, env=dict(
      os.environ, TF_CONFIG=launch_local.tf_config(launch_local.free_ports(2),
                                                   0)))
  assert result.returncode == 1, result.stderr[-3000:]
  assert ("if one has not started its strategy within 5 s "
          "(build_strategy.collective_timeout_seconds), this worker stops."
          in result.stderr)
  # faulthandler's report of where it waited.
  assert "Timeout (0:00:05)!" in result.stderr, result.stderr[-3000:]
  assert "in build_strategy" in result.stderr.split("Timeout (0:00:05)!")[1]


@pytest.mark.slow
def test_divergence_leaves_a_healthy_checkpoint_that_a_sane_restart_trains_on(
    tmp_path):
  """The update that diverges is checkpointed before its loss is seen; the
  guard removes that checkpoint, so a restart with a sane rate trains on."""
  params = tiny_params(str(tmp_path / "data"),
                       **{"DetectorTrainer.checkpoint_every_steps": 1})
  model_dir = tmp_path / "run"
  healthy = run(train_cmd(model_dir, params, "--max_steps=2"))
  assert healthy.returncode == 0, healthy.stderr[-3000:]
  diverged = run(train_cmd(model_dir, params, "--max_steps=6") +
                 ["--gin_param=build_lr_schedule.base_learning_rate=1e9"])
  assert diverged.returncode == 3, diverged.stderr[-3000:]
  assert "Training diverged at step 4" in diverged.stderr
  with open(model_dir / "diverged.json") as f:
    record = json.load(f)
  assert record["removed_checkpoint"] == str(model_dir / "ckpt-3")
  assert tf.train.latest_checkpoint(str(model_dir)).endswith("ckpt-2")
  resumed = run(train_cmd(model_dir, params, "--max_steps=4"))
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "Restored" in resumed.stderr and "ckpt-2" in resumed.stderr
  assert not (model_dir / "diverged.json").exists()
  _, weights = checkpoint_weights(str(model_dir))
  assert all(np.isfinite(w).all() for w in weights.values())


@pytest.mark.slow
def test_another_model_config_is_refused_before_model_dir_changes(tmp_path):
  params = tiny_params(str(tmp_path / "data"))
  model_dir = tmp_path / "run"
  trained = run(train_cmd(model_dir, params, "--max_steps=2"))
  assert trained.returncode == 0, trained.stderr[-3000:]
  before = {p.name: p.read_bytes() for p in model_dir.iterdir()
            if p.is_file()}
  wider = params + ["ResNet.width_multiplier=0.25"]
  for mode in ("train", "eval"):
    refused = run(train_cmd(model_dir, wider, "--max_steps=4") +
                  [f"--mode={mode}"])
    assert refused.returncode != 0
    assert (f"{model_dir}/ckpt-2 does not match this model: model/backbone/"
            in refused.stderr), refused.stderr[-3000:]
    assert "in it but" in refused.stderr
  after = {p.name: p.read_bytes() for p in model_dir.iterdir() if p.is_file()}
  assert after == before


@pytest.mark.slow
def test_workers_that_restored_different_steps_stop_naming_them(tmp_path):
  """Worker 1 reads another model_dir (no shared file system): no step 2."""
  sys.path.insert(0, os.path.join(REPO, "tools"))
  import launch_local  # pylint: disable=g-import-not-at-top
  params = tiny_params(str(tmp_path / "data"))
  trained = run(train_cmd(tmp_path / "run", params, "--max_steps=2"))
  assert trained.returncode == 0, trained.stderr[-3000:]
  params = tiny_params(str(tmp_path / "data"),
                       **{"build_strategy.kind": "'multi_worker'",
                          "GLOBAL_BATCH_SIZE": 4})
  ports = launch_local.free_ports(2)
  workers = [subprocess.Popen(  # pylint: disable=consider-using-with
      [sys.executable] + train_cmd(tmp_path / d, params, "--max_steps=4"),
      cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
      env=dict(os.environ, TF_CONFIG=launch_local.tf_config(ports, i)))
             for i, d in enumerate(("run", "elsewhere"))]
  try:
    errors = [w.communicate(timeout=TIMEOUT)[1] for w in workers]
  finally:
    for w in workers:
      w.kill()
  for worker, stderr in zip(workers, errors):
    assert worker.returncode != 0
    assert ("Workers resumed from different steps: worker 0: step 2, "
            "worker 1: step 0" in stderr), stderr[-3000:]
  assert tf.train.latest_checkpoint(str(tmp_path / "run")).endswith("ckpt-2")


@pytest.mark.slow
def test_the_console_says_what_it_trains_and_where_the_outputs_are(trained_demo):
  model_dir = trained_demo.model_dir
  assert trained_demo.console.rstrip().endswith("\n".join([
      f"Outputs in {model_dir}:",
      f"  checkpoint   {model_dir}/ckpt-{trained_demo.steps}",
      f"  config       {model_dir}/operative_config.gin",
      f"  detections   {model_dir}/detections_val.json",
      f"  TensorBoard  tensorboard --logdir={model_dir}"])), (
          trained_demo.console[-2000:])
  assert trained_demo.console.count("Outputs in") == 1
  # And begins saying what it trains (demo: cgbn over the worker's replicas).
  assert (f"Training steps 1-{trained_demo.steps}: 2 replicas x 2 images, "
          "BN size 4; LR 0.002 rising to 0.08 over 50 steps"
          in trained_demo.console), trained_demo.console[:3000]


@pytest.mark.slow
def test_demo_learns_and_its_evaluation_scores_every_image(trained_demo):
  """The session's demo: 4 images overfit in 300 steps, then evaluated.

  Learning: COCO AP above 0.9 on them, scored by the project's COCO metrics
  from the detections the trainer's evaluation wrote.
  Evaluation at batch 8 on 2 replicas leaves replica 1 without images; all
  four must still be scored.
  """
  with open(os.path.join(trained_demo.model_dir, "detections_val.json")) as f:
    detections = json.load(f)
  image_ids = {image["id"] for image in trained_demo.coco["images"]}
  assert {d["image_id"] for d in detections} == image_ids
  ground_truth = coco_evaluator.load_ground_truth(os.path.join(
      trained_demo.data_dir, "annotations", "instances_train.json"))
  metrics = coco_evaluator.coco_box_metrics(ground_truth, detections)
  assert metrics["AP"] > 0.9, metrics
