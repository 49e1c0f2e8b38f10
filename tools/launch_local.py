r"""Starts K MultiWorkerMirroredStrategy workers on this machine.

  python tools/launch_local.py --num_workers=2 -- \
      --gin_file=gin/demo.gin --gin_param="build_strategy.kind='multi_worker'" \
      --model_dir=runs/demo_2workers

Everything after `--` is passed to `tools/train.py` in each worker, whose
`TF_CONFIG` names K free ports on 127.0.0.1; worker 0 is the chief. For
trying multi-worker training on one box; on a cluster, set `TF_CONFIG` per
machine instead (see README). If one worker fails, the others are stopped
and its exit code is returned.
"""
import json
import os
import socket
import subprocess
import sys
import time

from absl import app
from absl import flags

flags.DEFINE_integer("num_workers", 2, "Worker processes to start.")
flags.DEFINE_float("timeout_seconds", None,
                   "Stop all workers after this long (default: no limit).")
FLAGS = flags.FLAGS

TRAIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")


def free_ports(count):
  """Ports the OS reports free on 127.0.0.1 (kept open until all chosen)."""
  sockets = [socket.socket() for _ in range(count)]
  for s in sockets:
    s.bind(("127.0.0.1", 0))
  ports = [s.getsockname()[1] for s in sockets]
  for s in sockets:
    s.close()
  return ports


def tf_config(ports, index):
  return json.dumps({
      "cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
      "task": {"type": "worker", "index": index}})


def launch(num_workers, train_args, timeout_seconds=None):
  """Runs the workers to completion; returns the first non-zero exit code."""
  ports = free_ports(num_workers)
  workers = [subprocess.Popen(  # pylint: disable=consider-using-with
      [sys.executable, TRAIN] + list(train_args),
      env=dict(os.environ, TF_CONFIG=tf_config(ports, i)))
             for i in range(num_workers)]
  deadline = timeout_seconds and time.time() + timeout_seconds
  try:
    while any(w.poll() is None for w in workers):
      failed = [w for w in workers if w.poll() not in (None, 0)]
      if failed or (deadline and time.time() > deadline):
        return failed[0].returncode if failed else 124
      time.sleep(0.5)
    return next((w.returncode for w in workers if w.returncode), 0)
  finally:
    for w in workers:
      if w.poll() is None:
        w.kill()
        w.wait()


def main(argv):
  sys.exit(launch(FLAGS.num_workers, argv[1:], FLAGS.timeout_seconds))


if __name__ == "__main__":
  app.run(main)
