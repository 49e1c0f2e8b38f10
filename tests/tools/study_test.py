"""tools/study.py end to end on a tiny scale: one run of each study.

Real `tools/train.py` processes on 2 logical replicas, a 64 px dataset of 40
images and a tiny detector; the pretraining run's backbone starts every run.
"""
import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
STUDY = os.path.join(REPO, "tools", "study.py")
TIMEOUT = 1800  # A guard against hangs; a loaded 2-core machine needs ~15 min.
TINY = {
    "prepare_shapes_dataset.num_train": 40,
    "prepare_shapes_dataset.num_val": 8,
    "prepare_shapes_dataset.image_size": 64,
    "prepare_shapes_dataset.num_shards": 1,
    "DetectionParser.short_side": 64,
    "DetectionParser.long_side": 64,
    # 2 steps per epoch at batch 16: 22 steps under the normal policy.
    "NUM_TRAIN_IMAGES": 32,
    "eval/InputReader.global_batch_size": 8,
    "ResNet.width_multiplier": 0.125,
    "FPN.num_filters": 16,
    "RPNHead.num_filters": 16,
    "BoxHead.fc_dims": 32,
    "MultilevelROIGenerator.pre_nms_top_k": 100,
    "MultilevelROIGenerator.num_proposals": 50,
    "MultilevelROIGenerator.test_pre_nms_top_k": 100,
    "MultilevelROIGenerator.test_num_proposals": 50,
    "ROISampler.num_sampled_rois": 32,
    # A tenth of the study's rate: this test is about the harness, and a
    # 22-step run on 32 images must not diverge on any machine.
    "build_lr_schedule.base_learning_rate": 0.002,
}
ONE_RUN_EACH = "bs16_frozen_s0|bs32_bn32_s0|bs16_bn16_long_heads_s0"


def study(out, *flags, wait=True):
  command = [sys.executable, STUDY, f"--output_dir={out}", "--replicas=2"] + [
      f"--gin_param={k}={v}" for k, v in TINY.items()] + list(flags)
  if not wait:
    return subprocess.Popen(  # pylint: disable=consider-using-with
        command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True)
  return subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                        timeout=TIMEOUT, check=False)


def records(out):
  found = {}
  for path in glob.glob(os.path.join(out, "records", "*.json")):
    with open(path) as f:
      found[os.path.basename(path)[:-5]] = json.load(f)
  return found


def outputs(out):
  names = [f"{s}.{e}" for s in ("table2", "table3", "fig4")
           for e in ("md", "png")]
  contents = {}
  for name in names:
    with open(os.path.join(out, name), "rb") as f:
      contents[name] = f.read()
  return contents


@pytest.mark.slow
def test_grid_trains_resumes_records_and_reports(tmp_path):
  out = str(tmp_path / "study")
  # An interrupted run resumes from its checkpoint (the next call's).
  interrupted = "bs16_frozen_s0"
  model_dir = os.path.join(out, "work", "runs", interrupted, "model")
  process = study(out, f"--only={interrupted}", wait=False)
  deadline = time.time() + TIMEOUT
  while not os.path.exists(os.path.join(model_dir, "ckpt-2.index")):
    assert process.poll() is None, process.stdout.read()[-3000:]
    assert time.time() < deadline
    time.sleep(0.05)
  os.killpg(process.pid, signal.SIGTERM)
  log = process.communicate(timeout=60)[0]
  assert process.returncode != 0
  assert set(records(out)) == {"pretrain"}, log[-3000:]

  result = study(out, f"--only={ONE_RUN_EACH}")
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  found = records(out)
  assert set(found) == {"pretrain", *ONE_RUN_EACH.split("|")}
  assert all(r["status"] == "converged" for r in found.values()), {
      n: (r["status"], r.get("failed_step"), r.get("failed_terms"))
      for n, r in found.items()}
  pretrained = os.path.join(out, "work", "runs", "pretrain", "model")
  for name in ONE_RUN_EACH.split("|"):
    record = found[name]
    with open(os.path.join(out, "work", "runs", name, "train.log")) as f:
      log = f.read()
    assert f"Initialised backbone from {pretrained}/ckpt-8" in log
    assert ("Restored" in log) == (name == interrupted)
    assert record["eval_history"][-1]["step"] == (
        record["schedule"]["total_steps"])
    assert len(record["commit"]) == 40 and record["wall_seconds"] > 0
    assert record["attempts"] == (2 if name == interrupted else 1)
  assert found[interrupted]["eval_history"][-1]["step"] == 22
  long = found["bs16_bn16_long_heads_s0"]
  assert [e["epoch"] for e in long["eval_history"]] == list(range(1, 19))
  assert found["bs32_bn32_s0"]["realisation"] == dict(
      replicas=2, per_replica=16, group_size=2)
  table3 = outputs(out)["table3.md"].decode()
  assert "| 32 | 32 | 2 x 16, groups of 2 | 0.004 |" in table3
  assert "| 16 | 0 (frozen) | 2 x 8 | 0.002 |" in table3
  assert "1 | " in outputs(out)["fig4.md"].decode()

  # Finished runs are not redone; the report comes from the records alone.
  before = outputs(out)
  again = study(out, f"--only={ONE_RUN_EACH}")
  assert again.returncode == 0, again.stderr[-3000:]
  assert again.stdout.count("recorded (converged), skipped") == 4
  assert records(out) == found
  os.remove(os.path.join(out, "table3.png"))
  report = study(out, "--report_only")
  assert report.returncode == 0, report.stderr[-3000:]
  assert outputs(out) == before


def test_impossible_run_is_refused_before_training(tmp_path):
  result = study(str(tmp_path), "--only=bs256_bn32_s0$", "--study=table3")
  assert result.returncode != 0
  assert "BN size 32 is not a multiple of the 128 images" in result.stderr
  assert not os.path.exists(tmp_path / "work")
