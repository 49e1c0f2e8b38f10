r"""Step time of group BN against per-replica and Keras synchronized BN.

Times forward + backward (gradients computed, not all-reduced or applied) on
logical CPU replicas (MirroredStrategy) of each `--models` entry:

  convnet    a small conv net, [conv3x3 -> norm -> relu] x layers;
  backbone   the demo detector's backbone (gin/model/demo.gin: ResNet-18 at a
             quarter width, all stages trained), norms from `build_norm`;
  r50        the paper's detector backbone (gin/model/r50_fpn.gin: ResNet-50),
             all stages trained (53 norms), norms from `build_norm`;

for each norm:

  bn         tf.keras BatchNormalization (fused), per replica;
  keras_sync BatchNormalization(synchronized=True), global;
  cgbn_gK    CrossReplicaBatchNormalization(group_size=K) for K in
             --group_sizes (1 = our layer without communication).

Prints one JSON line per model and norm with the median step time of its best
round and the ratio to `bn`. The CPU is shared, so rounds interleave the norms.
`--local_only` splits CGBN's cost: its group exchanges become local stand-ins
(each replica's own rows copied for the whole group), so the step keeps every
kernel of CGBN but no collective; the rest over `bn` is the extra passes.

  python benchmarks/cgbn_overhead.py --replicas=8 --models=convnet,backbone
  # The backbone at the demo's per-replica batch and image size:
  python benchmarks/cgbn_overhead.py --models=backbone --batch=8 \
      --backbone_size=256 --steps=8
  # The paper's backbone at its per-GPU batch (2 images), smaller images,
  # then without CGBN's collectives:
  python benchmarks/cgbn_overhead.py --models=r50 --backbone_size=256 \
      --steps=5 [--local_only --group_sizes=2,4,8]
"""
import json
import os
import time

from absl import app
from absl import flags
import gin

from megdet_tf.training import multi_worker_devices

_REPLICAS = flags.DEFINE_integer("replicas", 8, "Logical CPU replicas.")
_GROUP_SIZES = flags.DEFINE_list("group_sizes", ["1", "2", "4", "8"],
                                 "CrossReplicaBatchNormalization group sizes.")
_MODELS = flags.DEFINE_list("models", ["convnet", "backbone"],
                            "Networks to time: convnet, backbone, r50.")
_BATCH = flags.DEFINE_integer("batch", 2, "Images per replica.")
_SIZE = flags.DEFINE_integer("size", 32, "convnet image height and width.")
_BACKBONE_SIZE = flags.DEFINE_integer(
    "backbone_size", 128, "backbone and r50 image height and width.")
_CHANNELS = flags.DEFINE_integer("channels", 64, "convnet conv filters.")
_LAYERS = flags.DEFINE_integer("layers", 4, "convnet conv + norm blocks.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps per round.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Interleaved rounds.")
_LOCAL_ONLY = flags.DEFINE_bool(
    "local_only", False, "CGBN without collectives (see the docstring).")


def _drop_group_exchanges():
  """CGBN's group exchanges become copies of the replica's own contribution."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from megdet_tf.modeling.layers import cross_replica_batch_norm  # pylint: disable=g-import-not-at-top
  layer = cross_replica_batch_norm.CrossReplicaBatchNormalization
  layer._gather_group = (  # pylint: disable=protected-access
      lambda self, packed, replica_ctx, group_size: tf.tile(
          packed, [group_size, 1]))
  layer._sum_group = (  # pylint: disable=protected-access
      lambda self, values, replica_ctx, group_size, scope: values * group_size)


def _norm_bindings(kind):
  """`build_norm` arguments for a norm kind."""
  if kind == "bn":
    return dict(norm="bn")
  if kind == "keras_sync":
    return dict(norm="bn", synchronized=True)
  return dict(norm="cgbn", group_size=int(kind.removeprefix("cgbn_g")))


def _build_model(model, kind):
  """The network to time, built in the strategy's scope by the caller."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from megdet_tf.modeling.backbones import resnet  # pylint: disable=g-import-not-at-top
  from megdet_tf.modeling.layers import normalization  # pylint: disable=g-import-not-at-top
  norm = _norm_bindings(kind)
  with gin.unlock_config():
    gin.clear_config()
    for name, value in norm.items():  # Every `build_norm` call of the network.
      gin.bind_parameter(f"build_norm.{name}", value)
  if model in ("backbone", "r50"):
    network = (resnet.ResNet(depth=18, width_multiplier=0.25, freeze_at=0)
               if model == "backbone" else resnet.ResNet(depth=50, freeze_at=0))
    size = _BACKBONE_SIZE.value
  else:
    network = tf.keras.Sequential([tf.keras.Sequential([
        tf.keras.layers.Conv2D(_CHANNELS.value, 3, padding="same",
                               use_bias=False),
        normalization.build_norm(),
        tf.keras.layers.ReLU()]) for _ in range(_LAYERS.value)])
    size = _SIZE.value
  network(tf.zeros((1, size, size, 3)))
  return network, size


def _build_step(strategy, model, kind):
  """A tf.function running one forward + backward pass on every replica."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  with strategy.scope():
    network, size = _build_model(model, kind)
  images = tf.random.stateless_normal((_BATCH.value, size, size, 3),
                                      seed=(1, 2))

  def replica_step():
    with tf.GradientTape() as tape:
      outputs = tf.nest.flatten(network(images, training=True))
      loss = tf.add_n([tf.reduce_mean(tf.square(o)) for o in outputs])
    grads = tape.gradient(loss, network.trainable_variables)
    return tf.add_n([tf.reduce_sum(g) for g in grads])

  return tf.function(lambda: strategy.run(replica_step))


def _time_norms(strategy, model, kinds):
  """Best-round median step time (s) per norm kind, rounds interleaved."""
  steps = {}
  for kind in kinds:
    steps[kind] = _build_step(strategy, model, kind)
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
  return best


def main(argv):
  del argv
  multi_worker_devices.split_cpu(_REPLICAS.value)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if _LOCAL_ONLY.value:
    _drop_group_exchanges()
  strategy = tf.distribute.MirroredStrategy(
      [f"/cpu:{i}" for i in range(_REPLICAS.value)])
  kinds = ["bn", "keras_sync"] + [f"cgbn_g{k}" for k in _GROUP_SIZES.value]
  for model in _MODELS.value:
    best = _time_norms(strategy, model, kinds)
    for kind in kinds:
      print(json.dumps({
          "benchmark": "cgbn_overhead", "model": model, "norm": kind,
          "replicas": _REPLICAS.value, "batch": _BATCH.value,
          "size": _SIZE.value if model == "convnet" else _BACKBONE_SIZE.value,
          "local_only": _LOCAL_ONLY.value,
          "step_ms": round(best[kind] * 1e3, 2),
          "ratio_to_bn": round(best[kind] / best["bn"], 3)}), flush=True)
  os._exit(0)  # Skips the slow teardown of the traced graphs.


if __name__ == "__main__":
  app.run(main)
