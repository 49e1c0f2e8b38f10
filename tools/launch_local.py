r"""Starts K MultiWorkerMirroredStrategy workers on this machine.

  python tools/launch_local.py --num_workers=2 -- \
      --gin_file=gin/demo.gin --gin_param="build_strategy.kind='multi_worker'" \
      --model_dir=runs/demo_2workers

Everything after `--` is passed to `tools/train.py` in each worker, whose
`TF_CONFIG` names K free ports on 127.0.0.1; worker 0 is the chief. For
trying multi-worker training on one box; on a cluster, set `TF_CONFIG` per
machine instead (see README). If one worker fails, the others are stopped
and its exit code is returned; a preempted worker (SIGTERM, exit code 42)
is not a failure: the others save the same step and exit 42 too.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

from absl import app
from absl import flags
from absl import logging

flags.DEFINE_integer("num_workers", 2, "Worker processes to start.")
# No default limit: a run may legitimately take days. Lost workers are found
# by the workers themselves (build_strategy.collective_timeout_seconds and
# TensorFlow's heartbeats), and a worker that exits stops the others.
flags.DEFINE_float("timeout_seconds", None,
                   "Stop all workers after this long (default: no limit).")
FLAGS = flags.FLAGS

TRAIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")
# tools/train.py's code for a preempted worker (trainer.EXIT_PREEMPTED).
EXIT_PREEMPTED = 42


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


def _describe(returncode):
  if returncode < 0:
    return f"was killed by {signal.Signals(-returncode).name}"
  return f"exited with code {returncode}"


def launch(num_workers, train_args, timeout_seconds=None):
  """Runs the workers to completion; returns the first non-zero exit code.

  When a worker fails (or the timeout passes), says which and stops the
  others: a peer of a dead worker would otherwise wait in a collective.
  """
  ports = free_ports(num_workers)
  workers = [subprocess.Popen(  # pylint: disable=consider-using-with
      [sys.executable, TRAIN] + list(train_args),
      env=dict(os.environ, TF_CONFIG=tf_config(ports, i)))
             for i in range(num_workers)]
  for i, worker in enumerate(workers):
    logging.info("worker %d: pid %d", i, worker.pid)
  deadline = timeout_seconds and time.time() + timeout_seconds
  try:
    while True:
      failed = [(i, w) for i, w in enumerate(workers)
                if w.poll() not in (None, 0, EXIT_PREEMPTED)]
      if failed:
        i, worker = failed[0]
        logging.error("worker %d %s; stopping the other workers", i,
                      _describe(worker.returncode))
        return worker.returncode
      if all(w.returncode == 0 for w in workers):
        return 0
      if all(w.returncode in (0, EXIT_PREEMPTED) for w in workers):
        logging.warning("Preempted: the workers saved the same step; run the "
                        "same command again to resume")
        return EXIT_PREEMPTED
      if deadline and time.time() > deadline:
        logging.error("Timed out after %g s; stopping all workers",
                      timeout_seconds)
        return 124
      time.sleep(0.5)
  finally:
    for w in workers:
      if w.poll() is None:
        w.kill()
        w.wait()


def main(argv):
  code = launch(FLAGS.num_workers, argv[1:], FLAGS.timeout_seconds)
  sys.exit(128 - code if code < 0 else code)  # A shell's code for a signal.


if __name__ == "__main__":
  app.run(main)
