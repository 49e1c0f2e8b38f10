"""Shared pytest fixtures.

`megdet_tf` is imported first so TF_USE_LEGACY_KERAS is set before any test
imports TensorFlow.
"""
import contextlib
import fcntl
import json
import os
import subprocess
import sys
import types

import megdet_tf  # noqa: F401  pylint: disable=unused-import
import gin
import pytest

# Tests read the CPU's memory statistics, which only the BFC allocator keeps:
# TensorFlow's default only while oneDNN is on (TF_ENABLE_ONEDNN_OPTS).
os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")

from megdet_tf.dataloaders import coco_tfrecord
from megdet_tf.dataloaders import shapes_dataset
from megdet_tf.training import multi_worker_devices

# In-process tests see 8 logical CPU devices (for 8-replica MirroredStrategy
# tests): the split must come before TensorFlow's first op, so it is made here,
# once. A test that needs another split runs it in a subprocess.
multi_worker_devices.split_cpu(8)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Enough for a margin: after 200 steps, 1 of 10 seeds (and CI's CPU, once) kept
# a duplicate box scored above 0.5; after 300, 12 of 12 seeds stayed below 0.16.
DEMO_STEPS = 300
DEMO_SIZE = 128


@pytest.fixture(autouse=True)
def clear_gin():
  """Clears Gin's bindings after every test: Gin's config is process-wide."""
  yield
  gin.clear_config()


@pytest.fixture(scope="session")
def tiny_detector_gin() -> str:
  """Gin bindings of a random detector small enough to build in seconds."""
  return """
      ResNet.depth = 18
      ResNet.width_multiplier = 0.125
      ResNet.freeze_at = 0
      FPN.num_filters = 16
      RPNHead.num_filters = 16
      BoxHead.fc_dims = 32
      build_norm.norm = 'cgbn'
      MultilevelROIGenerator.test_pre_nms_top_k = 100
      MultilevelROIGenerator.test_num_proposals = 50
      DetectionGenerator.max_num_detections = 10
  """


@pytest.fixture(scope="session")
def shapes_dataset_dir(tmp_path_factory) -> str:
  """A small shapes dataset, generated once per session; returns its path.

  The directory holds `annotations/instances_{train,val}.json` and
  `{train,val}/*.jpg`: 24 train and 8 val images of 128x128 px, seed 0.
  """
  root = tmp_path_factory.mktemp("shapes")
  shapes_dataset.write_shapes_dataset(str(root), num_train=24, num_val=8,
                                      image_size=128, seed=0)
  return str(root)


def _demo_params(root: str):
  """Bindings over gin/demo.gin that overfit four 128 px images."""
  params = {
      "build_trainer.prepare_data": None,
      "train/InputReader.file_pattern": repr(f"{root}/tfrecord/train-*"),
      "eval/InputReader.file_pattern": repr(f"{root}/tfrecord/train-*"),
      "COCOEvaluator.annotations_file":
          repr(f"{root}/annotations/instances_train.json"),
      "train/InputReader.deterministic": True,
      "train/InputReader.seed": 0,
      "configure_process.seed": 0,
      "DetectionParser.aug_rand_hflip": False,
      "DetectionParser.short_side": DEMO_SIZE,
      "DetectionParser.long_side": DEMO_SIZE,
      "build_strategy.kind": "'mirrored'",
      "build_strategy.num_cpu_replicas": 2,
      "GLOBAL_BATCH_SIZE": 4,
      "NUM_TRAIN_IMAGES": 4,
      "build_lr_schedule.reference_batch_size": 4,
      "build_lr_schedule.warmup_steps": 50,
      "build_lr_schedule.warmup_start_learning_rate": 0.002,
      "DecayPolicy.total_epochs": DEMO_STEPS,
      "DecayPolicy.decay_epochs": [DEMO_STEPS * 4 // 5],
      "DecayPolicy.multipliers": [0.1],
      "DetectorTrainer.steps_per_loop": 50,
      "DetectorTrainer.checkpoint_every_steps": DEMO_STEPS,
  }
  return [f"{k}={v}" for k, v in params.items()]


@contextlib.contextmanager
def _shared_by_test_processes(tmp_path_factory, name):
  """A directory `name` that this session's xdist processes share, locked.

  The first process to enter fills it; the others wait for it, then reuse it.
  Yields (path, whether it still has to be filled).
  """
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent  # The session's directory, above each process's own.
  path = os.path.join(root, name)
  with open(f"{path}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    done = f"{path}.done"
    yield path, not os.path.exists(done)
    open(done, "w").close()


@pytest.fixture(scope="session")
def trained_demo(tmp_path_factory) -> types.SimpleNamespace:
  """A demo detector that detects the shapes of four generated images.

  Trained once per session, shared by the test processes, by
  `tools/train.py --mode=train_and_eval` (2 replicas, cross-replica BN, 300
  steps, about a minute on 2 idle cores), then evaluated on the same images,
  so `model_dir` holds the checkpoint `ckpt-300` and an evaluation's
  TensorBoard events; tests only read them. Attributes: `data_dir`, `params`
  (the Gin bindings over gin/demo.gin), `gin_flags` (`--gin_file`/`--gin_param`
  for the tools), `model_dir`, `console` (what the training printed),
  `steps`, `image_size`, `coco` (the images' annotations) and `files` (their
  JPEGs, in the annotations' order).
  """
  with _shared_by_test_processes(tmp_path_factory, "demo") as (root, fill):
    params = _demo_params(root)
    gin_flags = ["--gin_file=gin/demo.gin"] + [f"--gin_param={p}"
                                               for p in params]
    model_dir = os.path.join(root, "run")
    annotations = os.path.join(root, "annotations", "instances_train.json")
    log = os.path.join(root, "train.log")
    if fill:
      _train_demo(root, annotations, model_dir, gin_flags, log)
  with open(annotations) as f:
    coco = json.load(f)
  with open(log) as f:
    console = f.read()
  return types.SimpleNamespace(
      data_dir=root, params=params, gin_flags=gin_flags, model_dir=model_dir,
      console=console, steps=DEMO_STEPS, image_size=DEMO_SIZE, coco=coco,
      files=[os.path.join(root, "train", image["file_name"])
             for image in coco["images"]])


def _train_demo(root, annotations, model_dir, gin_flags, log):
  shapes_dataset.write_shapes_dataset(root, num_train=4, num_val=0,
                                      image_size=DEMO_SIZE, seed=0,
                                      scale_range=(0.15, 0.7))
  coco_tfrecord.convert_coco(os.path.join(root, "train"), annotations,
                             os.path.join(root, "tfrecord", "train"),
                             num_shards=1)
  trained = subprocess.run(
      [sys.executable, os.path.join(REPO, "tools", "train.py"),
       f"--model_dir={model_dir}", "--mode=train_and_eval"] + gin_flags,
      cwd=REPO, capture_output=True, text=True, timeout=900, check=False)
  assert trained.returncode == 0, trained.stderr[-3000:]
  with open(log, "w") as f:
    f.write(trained.stderr)
