r"""1x1 convolutions: Keras' Conv2D kernels against our matmul (conv2d.py).

Times forward + both gradients (input and kernel) of one 1x1 stride-1 conv
at the shapes ResNet-50 + FPN has on a 256x256 image, batch 2, for Keras'
`Conv2D` and `megdet_tf.modeling.layers.Conv2D` (same kernel variable), each
in its own `tf.function`, alternating. Prints a JSON line per shape and
dtype: milliseconds per call, their ratio, and the largest difference of the
kernel gradients relative to their largest magnitude.

  python benchmarks/pointwise_conv.py [--dtypes=bfloat16,float32] [--calls=20]
"""
import json
import statistics
import time

from absl import app
from absl import flags

import megdet_tf  # noqa: F401  pylint: disable=unused-import
import tensorflow as tf

from megdet_tf.modeling.layers import conv2d

# (feature size, input channels, output channels): C2-C5 bottleneck 1x1s
# (reduce, expand) and the FPN laterals, at 1/4 ... 1/32 of 256 px.
SHAPES = [(64, 256, 64), (64, 64, 256), (32, 512, 128), (32, 128, 512),
          (16, 1024, 256), (16, 256, 1024), (8, 2048, 512), (8, 512, 2048),
          (64, 256, 256), (8, 2048, 256)]

flags.DEFINE_list("dtypes", ["bfloat16", "float32"], "Compute dtypes.")
flags.DEFINE_integer("batch", 2, "Images.")
flags.DEFINE_integer("calls", 20, "Timed calls per layer and round.")
flags.DEFINE_integer("rounds", 3, "Alternating rounds per layer.")
FLAGS = flags.FLAGS


def _step(layer, x):
  """forward + gradients w.r.t. input and kernel, as a training step does."""

  @tf.function
  def step():
    with tf.GradientTape() as tape:
      tape.watch(x)
      y = layer(x)
    return tape.gradient(y, [x, layer.kernel], output_gradients=y)

  return step


def _milliseconds(step):
  start = time.perf_counter()
  for _ in range(FLAGS.calls):
    step()
  return (time.perf_counter() - start) / FLAGS.calls * 1e3


def measure(dtype, size, channels, filters):
  x = tf.cast(tf.random.normal([FLAGS.batch, size, size, channels]), dtype)
  keras = tf.keras.layers.Conv2D(filters, 1, use_bias=False, dtype=dtype)
  ours = conv2d.Conv2D(filters, 1, use_bias=False, dtype=dtype)
  keras.build(x.shape)
  ours.build(x.shape)
  ours.kernel.assign(keras.kernel)
  steps = {"keras": _step(keras, x), "matmul": _step(ours, x)}
  grads = {name: step()[1] for name, step in steps.items()}  # Traces.
  times = {name: [] for name in steps}
  for _ in range(FLAGS.rounds):
    for name, step in steps.items():
      times[name].append(_milliseconds(step))
  keras_ms, matmul_ms = (statistics.median(times[n]) for n in steps)
  reference = tf.cast(grads["keras"], tf.float32)
  error = tf.reduce_max(tf.abs(tf.cast(grads["matmul"], tf.float32) -
                               reference)) / tf.reduce_max(tf.abs(reference))
  return {"benchmark": "pointwise_conv", "dtype": dtype, "size": size,
          "channels": channels, "filters": filters, "batch": FLAGS.batch,
          "keras_ms": round(keras_ms, 3), "matmul_ms": round(matmul_ms, 3),
          "speedup": round(keras_ms / matmul_ms, 3),
          "kernel_grad_rel_diff": float(f"{float(error):.2e}")}


def main(argv):
  del argv
  for dtype in FLAGS.dtypes:
    for shape in SHAPES:
      print(json.dumps(measure(dtype, *shape)), flush=True)


if __name__ == "__main__":
  app.run(main)
