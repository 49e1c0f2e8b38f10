r"""Step time of group BN against per-replica and Keras synchronized BN.

Times forward + backward (gradients computed, not all-reduced or applied) of a
small conv net, [conv3x3 -> norm -> relu] x layers, on logical CPU replicas
(MirroredStrategy), for:

  bn         tf.keras BatchNormalization (fused), per replica;
  keras_sync BatchNormalization(synchronized=True), global;
  cgbn_gK    CrossReplicaBatchNormalization(group_size=K) for K in
             --group_sizes (1 = our layer without communication).

Prints one JSON line per norm with the median step time of its best round and
the ratio to `bn`. The CPU is shared, so rounds interleave the norms.

  python benchmarks/cgbn_overhead.py --replicas=8
"""
import json
import os
import time

from absl import app
from absl import flags

from megdet_tf.training import multi_worker_devices

_REPLICAS = flags.DEFINE_integer("replicas", 8, "Logical CPU replicas.")
_GROUP_SIZES = flags.DEFINE_list("group_sizes", ["1", "2", "4", "8"],
                                 "CrossReplicaBatchNormalization group sizes.")
_BATCH = flags.DEFINE_integer("batch", 2, "Images per replica.")
_SIZE = flags.DEFINE_integer("size", 32, "Image height and width.")
_CHANNELS = flags.DEFINE_integer("channels", 64, "Conv filters.")
_LAYERS = flags.DEFINE_integer("layers", 4, "conv + norm blocks.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps per round.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Interleaved rounds.")


def _make_norm(kind):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from megdet_tf.modeling import layers  # pylint: disable=g-import-not-at-top
  if kind == "bn":
    return tf.keras.layers.BatchNormalization()
  if kind == "keras_sync":
    return tf.keras.layers.BatchNormalization(synchronized=True)
  return layers.CrossReplicaBatchNormalization(
      group_size=int(kind.removeprefix("cgbn_g")))


def _build_step(strategy, kind):
  """A tf.function running one forward + backward pass on every replica."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  with strategy.scope():
    blocks = [tf.keras.Sequential([
        tf.keras.layers.Conv2D(_CHANNELS.value, 3, padding="same",
                               use_bias=False),
        _make_norm(kind),
        tf.keras.layers.ReLU()]) for _ in range(_LAYERS.value)]
    model = tf.keras.Sequential(blocks)
    model.build((None, _SIZE.value, _SIZE.value, 3))
  images = tf.random.stateless_normal(
      (_BATCH.value, _SIZE.value, _SIZE.value, 3), seed=(1, 2))

  def replica_step():
    with tf.GradientTape() as tape:
      loss = tf.reduce_mean(tf.square(model(images, training=True)))
    grads = tape.gradient(loss, model.trainable_variables)
    return tf.add_n([tf.reduce_sum(g) for g in grads])

  return tf.function(lambda: strategy.run(replica_step))


def main(argv):
  del argv
  multi_worker_devices.split_cpu(_REPLICAS.value)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  strategy = tf.distribute.MirroredStrategy(
      [f"/cpu:{i}" for i in range(_REPLICAS.value)])
  kinds = ["bn", "keras_sync"] + [f"cgbn_g{k}" for k in _GROUP_SIZES.value]
  steps = {}
  for kind in kinds:
    steps[kind] = _build_step(strategy, kind)
    for _ in range(3):  # Trace and warm up.
      strategy.experimental_local_results(steps[kind]())[0].numpy()
  best = {kind: float("inf") for kind in kinds}
  for _ in range(_ROUNDS.value):
    for kind in kinds:
      times = []
      for _ in range(_STEPS.value):
        start = time.perf_counter()
        strategy.experimental_local_results(steps[kind]())[0].numpy()
        times.append(time.perf_counter() - start)
      best[kind] = min(best[kind], sorted(times)[len(times) // 2])
  for kind in kinds:
    print(json.dumps({
        "norm": kind, "replicas": _REPLICAS.value, "batch": _BATCH.value,
        "size": _SIZE.value, "channels": _CHANNELS.value,
        "layers": _LAYERS.value, "step_ms": round(best[kind] * 1e3, 2),
        "ratio_to_bn": round(best[kind] / best["bn"], 3)}), flush=True)
  os._exit(0)  # Skips the slow teardown of the traced graphs.


if __name__ == "__main__":
  app.run(main)
