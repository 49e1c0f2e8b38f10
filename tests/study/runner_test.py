"""Planning a study run: its Gin file and the schedule the trainer derives.

Training itself is tested end to end in tests/tools/study_test.py; here,
how a run's wall time is kept.
"""
import json
import os
import sys
import threading
import time

import gin
import pytest
import tensorflow as tf

from megdet_tf.modeling.layers import normalization
from megdet_tf.study import grid
from megdet_tf.study import runner as runner_lib
from megdet_tf.training import experiment

NUM_TRAIN_IMAGES = 4608  # gin/study/data.gin's epoch.


@pytest.fixture
def runner(tmp_path):
  return runner_lib.StudyRunner(str(tmp_path / "out"), str(tmp_path / "work"),
                                log=lambda line: None)


@pytest.mark.parametrize("run", [
    grid.Run(16, 0), grid.Run(16, 4), grid.Run(64, 0, peak_scale=0.5),
    grid.Run(256, 32), grid.Run(512, 32, replicas=16),
    grid.Run(256, 32, policy="long", eval_every_epoch=True)])
def test_schedule_is_the_paper_recipe_scaled_by_the_batch(runner, run):
  schedule = runner.plan(run).schedule
  per_epoch = NUM_TRAIN_IMAGES // run.batch
  epochs, decays = ((11, (8, 10)) if run.policy == "normal" else
                    (18, (11, 14, 17)))
  assert schedule["steps_per_epoch"] == per_epoch
  assert schedule["total_steps"] * run.batch == epochs * NUM_TRAIN_IMAGES
  assert schedule["boundaries"] == [e * per_epoch for e in decays]
  assert schedule["peak_learning_rate"] == pytest.approx(
      0.02 * run.batch / 16 * run.peak_scale)
  assert schedule["warmup_start_learning_rate"] == pytest.approx(0.02)
  assert schedule["warmup_steps"] == round(per_epoch / 2)


@pytest.mark.parametrize("run", [
    grid.Run(16, 0), grid.Run(16, 2), grid.Run(16, 16), grid.Run(128, 32),
    grid.Run(512, 32, replicas=16),
    grid.Run(16, 16, policy="long", eval_every_epoch=True)])
def test_gin_file_realises_the_bn_size_and_periods(runner, run):
  plan = runner.plan(run)
  realised = run.realise()
  experiment.parse_gin([], [plan.gin_text])
  replicas = gin.query_parameter("build_strategy.num_cpu_replicas")
  assert replicas == realised["replicas"]
  assert normalization.bn_size(run.batch // replicas, replicas) == run.bn_size
  assert gin.query_parameter("initialize_from_checkpoint.init_checkpoint") == (
      runner.model_dir(runner_lib.PRETRAIN))
  per_epoch = plan.schedule["steps_per_epoch"]
  assert gin.query_parameter(
      "DetectorTrainer.checkpoint_every_steps") == per_epoch
  evaluates = "DetectorTrainer.eval_every_steps" in plan.gin_text
  assert evaluates == run.eval_every_epoch


def test_the_eta_counts_only_what_a_resumed_run_has_still_to_train(runner):
  plan = runner.plan(grid.Run(32, 0))
  all_images = plan.schedule["total_steps"] * 32
  assert runner.images_to_train(plan) == all_images
  checkpoint = tf.train.Checkpoint(step=tf.Variable(0))
  manager = tf.train.CheckpointManager(
      checkpoint, runner.model_dir(plan.name), max_to_keep=2)
  manager.save(checkpoint_number=144)  # The trainer numbers them by step.
  assert runner.images_to_train(plan) == all_images - 144 * 32


def test_extra_bindings_apply_to_every_run_and_the_pretraining(tmp_path):
  runner = runner_lib.StudyRunner(str(tmp_path), str(tmp_path),
                                  gin_params=["NUM_TRAIN_IMAGES = 64"])
  assert runner.plan(None).schedule["steps_per_epoch"] == 1
  assert runner.plan(grid.Run(32, 32)).schedule["total_steps"] == 22


def test_pretraining_trains_every_norm_on_other_data(runner):
  plan = runner.plan(None)
  experiment.parse_gin([], [plan.gin_text])
  assert gin.query_parameter("build_norm.norm") == "cgbn"
  assert gin.query_parameter("prepare_shapes_dataset.seed") == 1
  gin.clear_config()
  experiment.parse_gin([], [runner.plan(grid.Run(16, 0)).gin_text])
  assert gin.query_parameter("build_norm.norm") == "frozen"
  assert gin.query_parameter("prepare_shapes_dataset.seed") == 0


@pytest.mark.parametrize("run", grid.study_runs("ablation"))
def test_ablation_sets_warmup_and_norm_in_heads_only_where_named(runner, run):
  plan = runner.plan(run)
  experiment.parse_gin([], [plan.gin_text])
  per_epoch = plan.schedule["steps_per_epoch"]
  warmup_epochs = 0.5 if run.warmup_epochs is None else run.warmup_epochs
  assert plan.schedule["warmup_steps"] == round(warmup_epochs * per_epoch)
  for binding in ("FPN.use_norm", "RPNHead.use_norm", "BoxHead.fc_norm"):
    assert gin.query_parameter(binding) == run.norm_in_heads, binding
  assert ("_heads" in run.name) == run.norm_in_heads
  assert ("_wu" in run.name) == (run.warmup_epochs is not None)


def test_wall_time_is_on_disk_while_the_run_trains_and_adds_up(tmp_path):
  wall_path = str(tmp_path / "wall_seconds.json")
  command = [sys.executable, "-c", "import time; time.sleep(1.5)"]
  result = {}

  def attempt():
    with open(tmp_path / "train.log", "a") as log:
      result["returned"] = runner_lib.run_timed(command, log, wall_path,
                                                tick_seconds=0.1)

  thread = threading.Thread(target=attempt)
  thread.start()
  seen_while_running = []  # What a runner ended with its run would leave.
  while thread.is_alive():
    if os.path.exists(wall_path):
      with open(wall_path) as f:
        seen_while_running.append(json.load(f))
    time.sleep(0.05)
  thread.join()
  assert seen_while_running and all(
      seen["attempts"] == 1 for seen in seen_while_running)
  assert any(0 < seen["seconds"] < 1.5 for seen in seen_while_running)
  returncode, first = result["returned"]
  assert returncode == 0 and first["seconds"] >= 1.5

  # The second attempt lasts long enough to show through the 0.1 s rounding.
  failing = "import time; time.sleep(0.5); raise SystemExit(3)"
  with open(tmp_path / "train.log", "a") as log:
    returncode, totals = runner_lib.run_timed(
        [sys.executable, "-c", failing], log, wall_path)
  assert returncode == 3 and totals["attempts"] == 2
  assert first["seconds"] + 0.4 <= totals["seconds"] < first["seconds"] + 30
  with open(wall_path) as f:
    assert json.load(f) == totals
