"""One CGBN training step under a strategy, and its reference (test helper).

Shared by cross_replica_batch_norm_test.py (MirroredStrategy in process) and
cross_replica_batch_norm_multiworker_test.py, which runs this file as a
MultiWorkerMirroredStrategy worker:

  TF_CONFIG=... python _cgbn_check.py REPLICAS_PER_WORKER OUT.json GROUP...

(GROUP is an int or "none", optionally with ":collective" for the layer's
`exchange`). The worker checks its local replicas against the
reference and writes the largest errors and its BN collectives to OUT.json.
"""
import json
import sys

import megdet_tf  # noqa: F401  (Keras 2 before TensorFlow)
import numpy as np
import tensorflow as tf

from megdet_tf.modeling.layers import cross_replica_batch_norm
from megdet_tf.ops import group_exchange
from megdet_tf.training import multi_worker_devices

CHANNELS = 4
SPATIAL = (3, 2)
MOMENTUM = 0.75
EPSILON = 1e-3
# Uneven per-replica batches; replica 2 is empty.
BATCH_SIZES = (2, 3, 0, 1, 4, 2, 1, 3)
INITIAL_MOVING = (0.0, 1.0)  # Keras' moving mean / variance initializers.
# The workers' strategy timeout: BN group collectives must take it too (and a
# worker left waiting by a failed peer ends).
COLLECTIVE_TIMEOUT_SECONDS = 120.0


def make_inputs(num_replicas, seed=0, mean=2.0, std=3.0, spatial=SPATIAL):
  """Per-replica inputs, upstream gradients, gamma and beta (numpy, float32).

  Inputs are [N, *spatial, C]: images by default, () for fc features.
  """
  rng = np.random.default_rng(seed)
  shift = mean + rng.normal(size=CHANNELS)  # Channels differ.
  batches, upstream = [], []
  for r in range(num_replicas):
    shape = (BATCH_SIZES[r % len(BATCH_SIZES)],) + spatial + (CHANNELS,)
    batches.append((shift + std * rng.normal(size=shape)).astype(np.float32))
    upstream.append(rng.normal(size=shape).astype(np.float32))
  gamma = rng.uniform(0.5, 1.5, CHANNELS).astype(np.float32)
  beta = rng.normal(size=CHANNELS).astype(np.float32)
  return batches, upstream, gamma, beta


def make_layer(strategy, group_size, batches, upstream, gamma, beta,
               **kwargs):
  """A built layer with `gamma` and `beta`, and the per-replica x and w."""
  with strategy.scope():
    layer = cross_replica_batch_norm.CrossReplicaBatchNormalization(
        group_size=group_size, momentum=MOMENTUM, epsilon=EPSILON, **kwargs)
    layer.build((None,) + batches[0].shape[1:])
  layer.gamma.assign(gamma)
  layer.beta.assign(beta)
  x, w = strategy.experimental_distribute_values_from_function(
      lambda ctx: (tf.constant(batches[ctx.replica_id_in_sync_group]),
                   tf.constant(upstream[ctx.replica_id_in_sync_group])))
  return layer, x, w


def run_step(strategy, group_size, batches, upstream, gamma, beta,
             eager=False, **kwargs):
  """One training step of a fresh layer; returns per-local-replica results.

  The results include the cross-replica reads of the moving statistics. Also
  returns the traced step function (None if `eager`) and the layer.
  """
  layer, x, w = make_layer(strategy, group_size, batches, upstream, gamma,
                           beta, **kwargs)

  def replica_step(x, w):
    x = tf.cast(x, layer.compute_dtype)
    with tf.GradientTape() as tape:
      tape.watch(x)
      y = layer(x, training=True)
      loss = tf.reduce_sum(tf.cast(y, tf.float32) * w)
    dx, dgamma, dbeta = tape.gradient(loss, [x, layer.gamma, layer.beta])
    return y, dx, dgamma, dbeta

  step = lambda x, w: strategy.run(replica_step, args=(x, w))
  if not eager:
    step = tf.function(step)
  outputs = step(x, w)
  local = lambda v: [t.numpy() for t in strategy.experimental_local_results(v)]
  result = dict(zip(("y", "dx", "dgamma", "dbeta"), map(local, outputs)))
  result["moving_mean"] = local(layer.moving_mean)
  result["moving_variance"] = local(layer.moving_variance)
  result["moving_mean_read"] = layer.moving_mean.numpy()
  result["moving_variance_read"] = layer.moving_variance.numpy()
  return result, None if eager else step.get_concrete_function(x, w), layer


def reference(group_size, batches, upstream, gamma, beta):
  """Plain non-fused BN on each group's concatenated inputs, per replica.

  In float64, so that the layer's float32 results are compared with exact
  values (a float32 reference is itself off by ~1e-5 where a small
  variance scales x up).
  """
  expected = {k: [] for k in ("y", "dx", "dgamma", "dbeta", "moving_mean",
                              "moving_variance")}
  for start in range(0, len(batches), group_size):
    members = range(start, start + group_size)
    sizes = [len(batches[r]) for r in members]
    bounds = np.cumsum([0] + sizes)
    bn = tf.keras.layers.BatchNormalization(
        fused=False, momentum=MOMENTUM, epsilon=EPSILON, dtype="float64")
    bn.build((None,) + batches[0].shape[1:])
    bn.gamma.assign(gamma)
    bn.beta.assign(beta)
    x = tf.constant(np.concatenate([batches[r] for r in members]), tf.float64)
    w = tf.constant(np.concatenate([upstream[r] for r in members]), tf.float64)
    if sum(sizes):
      with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        y = bn(x, training=True)
        parts = [tf.reduce_sum(y[a:b] * w[a:b])
                 for a, b in zip(bounds[:-1], bounds[1:])]
        loss = tf.add_n(parts)
      dx = tape.gradient(loss, x)
    else:  # An empty group: empty outputs, moving statistics unchanged.
      y, dx, parts, tape = x, x, [None] * group_size, None
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
      expected["y"].append(y[a:b].numpy())
      expected["dx"].append(dx[a:b].numpy())
      grads = (tape.gradient(parts[i], [bn.gamma, bn.beta]) if tape
               else [tf.zeros(CHANNELS, tf.float64)] * 2)
      expected["dgamma"].append(grads[0].numpy())
      expected["dbeta"].append(grads[1].numpy())
      expected["moving_mean"].append(bn.moving_mean.numpy())
      expected["moving_variance"].append(bn.moving_variance.numpy())
  expected["moving_mean_read"] = np.mean(expected["moving_mean"], axis=0)
  expected["moving_variance_read"] = np.mean(expected["moving_variance"], 0)
  return expected


def max_errors(result, expected, replica_ids):
  """Largest |result - expected| per quantity over the given global replicas."""
  errors = {}
  for key, values in result.items():
    if key.endswith("_read"):
      pairs = [(values, expected[key])]
    else:
      pairs = [(v, expected[key][r]) for v, r in zip(values, replica_ids)]
    errors[key] = 0.0
    for got, want in pairs:
      if np.shape(got) != np.shape(want):
        raise AssertionError(f"{key}: shape {np.shape(got)} != "
                             f"{np.shape(want)}")
      if np.size(got):
        errors[key] = max(errors[key], float(np.max(np.abs(
            np.asarray(got, np.float64) - want))))
  return errors


def bn_collectives(concrete_function):
  """(op type, group size, group key, device, timeout) of the BN collectives
  traced."""
  found = []
  for op in concrete_function.graph.get_operations():
    if op.type in ("CollectiveGatherV2", "CollectiveReduceV2"):
      group_size, group_key = (int(tf.get_static_value(t))
                               for t in op.inputs[1:3])
      if group_key >= group_exchange.GROUP_KEY_BASE:
        found.append((op.type, group_size, group_key, op.device,
                      op.get_attr("timeout_seconds")))
  return found


def kernel_ops(concrete_function):
  """Types of the traced ops from megdet_tf.ops.group_norm_kernels, sorted."""
  return sorted(op.type for op in concrete_function.graph.get_operations()
                if op.type.startswith("Megdet"))


def _worker_main(replicas_per_worker, out_path, groups):
  strategy = multi_worker_devices.multi_worker_strategy_with_local_replicas(
      replicas_per_worker,
      communication_options=tf.distribute.experimental.CommunicationOptions(
          timeout_seconds=COLLECTIVE_TIMEOUT_SECONDS))
  task = strategy.cluster_resolver.task_id
  num_replicas = strategy.num_replicas_in_sync
  replica_ids = [task * replicas_per_worker + i
                 for i in range(replicas_per_worker)]
  inputs = make_inputs(num_replicas)
  report = {"num_replicas": num_replicas, "scenarios": {}}
  for scenario in groups:
    group, _, exchange = scenario.partition(":")
    group_size = None if group == "none" else int(group)
    result, step, _ = run_step(strategy, group_size, *inputs,
                               exchange=exchange or "auto")
    expected = reference(group_size or replicas_per_worker, *inputs)
    report["scenarios"][scenario] = {
        "errors": max_errors(result, expected, replica_ids),
        "collectives": bn_collectives(step),
    }
  with open(out_path, "w") as f:
    json.dump(report, f)


if __name__ == "__main__":
  _worker_main(int(sys.argv[1]), sys.argv[2], sys.argv[3:])
