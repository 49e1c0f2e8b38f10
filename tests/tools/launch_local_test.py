"""tools/launch_local.py: workers on 127.0.0.1, one failure stops them all."""
import os
import signal
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
LAUNCH = os.path.join(REPO, "tools", "launch_local.py")


def test_a_failing_worker_is_named_and_its_code_returned(tmp_path):
  result = subprocess.run(
      [sys.executable, LAUNCH, "--num_workers=2", "--",
       "--gin_file=gin/demo.gin", "--gin_param=DetectorTrainer.stepz=1",
       f"--model_dir={tmp_path}"],
      cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 1, result.stderr[-3000:]
  assert "exited with code 1; stopping the other workers" in result.stderr


@pytest.mark.slow
def test_a_killed_worker_stops_the_job_within_seconds(tmp_path):
  """kill -9 of a training worker: launch_local names it and ends the other
  worker, which would otherwise wait for it in a collective."""
  data = tmp_path / "data"
  process = subprocess.Popen(  # pylint: disable=consider-using-with
      [sys.executable, LAUNCH, "--num_workers=2", "--",
       "--gin_file=gin/demo.gin", f"--model_dir={tmp_path / 'run'}",
       "--mode=train",
       "--gin_param=build_strategy.kind='multi_worker'",
       f"--gin_param=prepare_shapes_dataset.data_dir='{data}'",
       "--gin_param=prepare_shapes_dataset.num_train=16",
       "--gin_param=prepare_shapes_dataset.num_val=4",
       "--gin_param=prepare_shapes_dataset.image_size=64",
       f"--gin_param=train/InputReader.file_pattern='{data}/tfrecord/train-*'",
       f"--gin_param=eval/InputReader.file_pattern='{data}/tfrecord/val-*'",
       "--gin_param=COCOEvaluator.annotations_file="
       f"'{data}/annotations/instances_val.json'",
       "--gin_param=DetectionParser.short_side=64",
       "--gin_param=DetectionParser.long_side=64",
       "--gin_param=ResNet.width_multiplier=0.125",
       "--gin_param=GLOBAL_BATCH_SIZE=8",  # 2 images per replica (#19 item 11)
       "--gin_param=NUM_TRAIN_IMAGES=4000",
       "--gin_param=DetectorTrainer.steps_per_loop=1",
       "--gin_param=DetectorTrainer.log_every_seconds=0"],
      cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  lines = []
  deadline = time.time() + 600
  pids = {}
  for line in process.stderr:
    lines.append(line)
    if "launch_local.py" in line and ": pid " in line:
      worker, pid = line.split("worker ")[-1].split(": pid ")
      pids[int(worker)] = int(pid)
    if "step 3/" in line:
      break
    assert time.time() < deadline, "".join(lines[-50:])
  else:
    pytest.fail("The job ended before step 3:\n" + "".join(lines[-50:]))
  os.kill(pids[1], signal.SIGKILL)
  killed_at = time.time()
  rest = process.communicate(timeout=120)[1]
  assert time.time() - killed_at < 30
  assert process.returncode == 128 + signal.SIGKILL, rest[-3000:]
  assert "worker 1 was killed by SIGKILL; stopping the other workers" in rest
  with pytest.raises(ProcessLookupError):
    os.kill(pids[0], 0)
