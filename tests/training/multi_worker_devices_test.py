"""multi_worker_devices: several CPU replicas per MultiWorkerMirroredStrategy
worker. Runs in a subprocess, which must split the CPU before TensorFlow
starts. (tests/modeling/layers/cross_replica_batch_norm_multiworker_test.py
runs it with 2 and 4 worker processes.)
"""
import json
import os
import subprocess
import sys

import pytest

from megdet_tf.training import multi_worker_devices

_SCRIPT = """
import json
from megdet_tf.training import multi_worker_devices
import tensorflow as tf

strategy = multi_worker_devices.multi_worker_strategy_with_local_replicas(3)

@tf.function
def replica_ids():
  ctx = tf.distribute.get_replica_context()
  return ctx.all_reduce("sum", ctx.replica_id_in_sync_group + 1)

try:
  multi_worker_devices.split_cpu(2)
  resplit = "no error"
except RuntimeError as e:
  resplit = str(e)
multi_worker_devices.split_cpu(3)  # The split in place is fine.
print(json.dumps({
    "is_mwms": isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy),
    "num_replicas": strategy.num_replicas_in_sync,
    "devices": list(strategy.extended.worker_devices),
    "sums": [int(t) for t in strategy.experimental_local_results(
        strategy.run(replica_ids))],
    "resplit": resplit,
}))
"""


def test_single_worker_gets_one_replica_per_logical_cpu():
  env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
  env["TF_CPP_MIN_LOG_LEVEL"] = "2"
  out = subprocess.run([sys.executable, "-c", _SCRIPT], env=env,
                       capture_output=True, text=True, timeout=180,
                       check=True).stdout
  report = json.loads(out.strip().splitlines()[-1])
  assert report["is_mwms"]
  assert report["num_replicas"] == 3
  assert [d.rsplit("/", 1)[-1] for d in report["devices"]] == [
      "device:CPU:0", "device:CPU:1", "device:CPU:2"]
  assert report["sums"] == [6, 6, 6]  # 1 + 2 + 3 over the three replicas.
  assert "already initialised 3" in report["resplit"]


def test_rejects_fewer_than_one_replica():
  with pytest.raises(ValueError, match="replicas_per_worker"):
    multi_worker_devices.multi_worker_strategy_with_local_replicas(0)
