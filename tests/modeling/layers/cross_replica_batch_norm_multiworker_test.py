"""CrossReplicaBatchNormalization under MultiWorkerMirroredStrategy.

Starts worker processes on 127.0.0.1 (TF_CONFIG, free ports), each with two
logical CPU replicas, running `_cgbn_check.py`: every worker checks its
replicas against plain BN on each group's concatenated batch and reports its
BN collectives. One set of workers serves all group sizes of a test.
"""
import collections
import json
import os
import socket
import subprocess
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import _cgbn_check  # pylint: disable=g-import-not-at-top,wrong-import-position

REPLICAS_PER_WORKER = 2
TOLERANCE = 1e-5
_WORKER = os.path.join(os.path.dirname(__file__), "_cgbn_check.py")


def _free_ports(count):
  sockets = [socket.socket() for _ in range(count)]
  try:
    for s in sockets:
      s.bind(("127.0.0.1", 0))
    return [s.getsockname()[1] for s in sockets]
  finally:
    for s in sockets:
      s.close()


def _run_workers(tmp_path, num_workers, groups, timeout):
  """Runs the workers to completion; returns their reports by task index."""
  cluster = {"worker": [f"127.0.0.1:{p}" for p in _free_ports(num_workers)]}
  procs, logs = [], []
  try:
    for task in range(num_workers):
      env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", TF_CONFIG=json.dumps(
          {"cluster": cluster, "task": {"type": "worker", "index": task}}))
      logs.append(tmp_path / f"worker{task}.log")
      with open(logs[-1], "w") as log:
        procs.append(subprocess.Popen(
            [sys.executable, _WORKER, str(REPLICAS_PER_WORKER),
             str(tmp_path / f"worker{task}.json")] + groups,
            env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True))
    deadline = time.monotonic() + timeout
    while any(proc.poll() is None for proc in procs):
      failed = [t for t, proc in enumerate(procs) if proc.poll()]
      if failed or time.monotonic() > deadline:
        task = failed[0] if failed else 0
        pytest.fail(f"worker {task} failed or timed out after {timeout} s:\n"
                    + logs[task].read_text()[-3000:])
      time.sleep(0.5)
    for task, proc in enumerate(procs):
      if proc.returncode:
        pytest.fail(f"worker {task} failed:\n" +
                    logs[task].read_text()[-3000:])
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  return [json.loads((tmp_path / f"worker{task}.json").read_text())
          for task in range(num_workers)]


def _check(reports, group, group_size):
  """Exactness on every worker; BN collectives match the group layout.

  A group inside a worker shares its rows in the traced graph, with no BN
  collective at all, unless `group` asks for ":collective".
  """
  workers_of_key = collections.defaultdict(set)
  in_graph = (group_size <= REPLICAS_PER_WORKER and
              not group.endswith(":collective"))
  for task, report in enumerate(reports):
    scenario = report["scenarios"][group]
    errors = scenario["errors"]
    assert errors and max(errors.values()) <= TOLERANCE, (task, errors)
    assert bool(scenario["collectives"]) != in_graph, task
    if in_graph:
      continue
    for _, size, key, device, timeout in scenario["collectives"]:
      assert size == group_size and f"/task:{task}/" in device
      # The strategy's: a dead or stalled peer ends BN exchanges too.
      assert timeout == _cgbn_check.COLLECTIVE_TIMEOUT_SECONDS
      workers_of_key[key].add(task)
  if in_graph:
    return
  # A group spans group_size / REPLICAS_PER_WORKER workers, and only the
  # workers of one group share its collectives' group key.
  spans = max(group_size // REPLICAS_PER_WORKER, 1)
  assert len(workers_of_key) == len(reports) // spans
  assert all(len(tasks) == spans for tasks in workers_of_key.values())


def test_two_workers(tmp_path):
  reports = _run_workers(tmp_path, 2, ["none", "none:collective", "4"],
                         timeout=240)
  assert {r["num_replicas"] for r in reports} == {4}
  # None = the worker's own two replicas: no BN collective leaves a worker
  # (as on GPUs, where groups always run collectives).
  _check(reports, "none", REPLICAS_PER_WORKER)
  _check(reports, "none:collective", REPLICAS_PER_WORKER)
  _check(reports, "4", 4)  # One group over both workers.


def test_four_workers(tmp_path):
  reports = _run_workers(tmp_path, 4, ["none", "none:collective", "4", "8"],
                         timeout=420)
  assert {r["num_replicas"] for r in reports} == {8}
  _check(reports, "none", REPLICAS_PER_WORKER)
  _check(reports, "none:collective", REPLICAS_PER_WORKER)
  _check(reports, "4", 4)  # Two groups, each over two workers.
  _check(reports, "8", 8)  # Global sync BN.
