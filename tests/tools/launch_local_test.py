"""tools/launch_local.py: workers on 127.0.0.1, one failure stops them all."""
import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import tensorflow as tf

from megdet_tf.training import trainer

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


@contextlib.contextmanager
def _job_at_step_3(tmp_path, *gin_params):
  """Starts 2 training workers of a tiny model through launch_local.

  Yields the launcher's process and the workers' pids once the job logged
  step 3; then kills whatever is left of the job (its own process group).
  """
  data = tmp_path / "data"
  params = [
      "build_strategy.kind='multi_worker'",
      f"prepare_shapes_dataset.data_dir='{data}'",
      "prepare_shapes_dataset.num_train=16",
      "prepare_shapes_dataset.num_val=4",
      "prepare_shapes_dataset.image_size=64",
      f"train/InputReader.file_pattern='{data}/tfrecord/train-*'",
      f"eval/InputReader.file_pattern='{data}/tfrecord/val-*'",
      f"COCOEvaluator.annotations_file='{data}/annotations/instances_val.json'",
      "DetectionParser.short_side=64",
      "DetectionParser.long_side=64",
      "ResNet.width_multiplier=0.125",
      "GLOBAL_BATCH_SIZE=8",  # 2 images per replica (#19 item 11)
      "NUM_TRAIN_IMAGES=4000",
      "DetectorTrainer.steps_per_loop=1",
      "DetectorTrainer.log_every_seconds=0"] + list(gin_params)
  process = subprocess.Popen(  # pylint: disable=consider-using-with
      [sys.executable, LAUNCH, "--num_workers=2", "--",
       "--gin_file=gin/demo.gin", f"--model_dir={tmp_path / 'run'}",
       "--mode=train"] + [f"--gin_param={p}" for p in params],
      cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
      start_new_session=True)
  try:
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
    yield process, pids
  finally:
    with contextlib.suppress(ProcessLookupError):
      os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@pytest.mark.slow
def test_a_killed_worker_stops_the_job_within_seconds(tmp_path):
  """kill -9 of a training worker: launch_local names it and ends the other
  worker, which would otherwise wait for it in a collective."""
  with _job_at_step_3(tmp_path) as (process, pids):
    os.kill(pids[1], signal.SIGKILL)
    killed_at = time.time()
    rest = process.communicate(timeout=120)[1]
    assert time.time() - killed_at < 30
    assert process.returncode == 128 + signal.SIGKILL, rest[-3000:]
    assert "worker 1 was killed by SIGKILL; stopping the other workers" in rest
    with pytest.raises(ProcessLookupError):
      os.kill(pids[0], 0)


@pytest.mark.slow
def test_a_preempted_worker_has_all_workers_save_the_same_step(tmp_path):
  """SIGTERM to one worker: both save one agreed step and exit 42, which
  launch_local passes on instead of stopping the other as failed."""
  never = "DetectorTrainer.checkpoint_every_steps=1000"
  with _job_at_step_3(tmp_path, never) as (process, pids):
    os.kill(pids[1], signal.SIGTERM)
    rest = process.communicate(timeout=300)[1]
  assert process.returncode == 42, rest[-3000:]
  assert "stopping the other workers" not in rest
  assert "Preempted: the workers saved the same step" in rest
  saved = tf.train.latest_checkpoint(str(tmp_path / "run"))
  assert saved and int(saved.rsplit("-", 1)[1]) > 3, saved


def test_preempted_exit_code_is_the_trainers():
  sys.path.insert(0, os.path.join(REPO, "tools"))
  import launch_local  # pylint: disable=g-import-not-at-top
  assert launch_local.EXIT_PREEMPTED == trainer.EXIT_PREEMPTED


def _freeze_main_thread(pid):
  """Stops the main thread of process `pid` and no other (by ptrace).

  Its training steps stop, but TensorFlow's threads run on: it still sends
  heartbeats to the coordination service, as a worker whose input or step
  hangs does. This process, its tracer, reaps it when it dies (its parent
  could not see it end otherwise).
  """
  ptrace_seize, ptrace_interrupt, wait_all = 0x4206, 0x4207, 0x40000000
  libc = ctypes.CDLL(None, use_errno=True)
  libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p,
                          ctypes.c_void_p]
  for request in (ptrace_seize, ptrace_interrupt):
    if libc.ptrace(request, pid, None, None):
      pytest.skip("freezing one thread of a worker needs ptrace, which this "
                  f"system refuses: {os.strerror(ctypes.get_errno())}")

  def reap():
    while True:
      _, status = os.waitpid(pid, wait_all)
      if os.WIFEXITED(status) or os.WIFSIGNALED(status):
        return

  threading.Thread(target=reap, daemon=True).start()


@pytest.mark.slow
@pytest.mark.parametrize("stall, message", [
    # SIGSTOP: the whole process stops, its heartbeats too.
    ("process", "worker 1 stopped sending heartbeats to TensorFlow's "
     "coordination service"),
    # Its steps stop, its heartbeats go on: only the timeout can tell.
    ("main_thread", "A collective waited more than 30 s "
     "(build_strategy.collective_timeout_seconds)")])
def test_a_stalled_worker_makes_the_other_fail_saying_so(tmp_path, stall,
                                                         message):
  """A worker that neither fails nor answers: the other worker exits with an
  error that names the problem, within a bound instead of waiting forever.
  A BN group spans both workers, so that its collectives wait too."""
  timeout = 30
  with _job_at_step_3(
      tmp_path, f"build_strategy.collective_timeout_seconds={timeout}",
      "build_norm.group_size=4") as (process, pids):
    if stall == "process":
      os.kill(pids[1], signal.SIGSTOP)  # The job's end kills it.
    else:
      _freeze_main_thread(pids[1])
    rest = process.communicate(timeout=timeout + 60)[1]
  assert process.returncode == 1, rest[-3000:]
  assert "worker 0 exited with code 1; stopping the other workers" in rest
  assert message in rest, rest[-3000:]
