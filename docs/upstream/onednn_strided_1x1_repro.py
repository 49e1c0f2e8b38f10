"""oneDNN corrupts the heap in the weight gradient of a strided 1x1 conv.

Plain TensorFlow, no project code. With TensorFlow 2.20's oneDNN (v3.7.3,
TF_ENABLE_ONEDNN_OPTS on, the default on x86) on an AVX-512 CPU, this dies
within a few iterations with SIGSEGV or a glibc `malloc(): ...corrupted`
abort; with TF_ENABLE_ONEDNN_OPTS=0 it prints "no crash".

The op is Conv2DBackpropFilter of a 1x1, stride-2 conv over 8 input channels
in NHWC, i.e. the weight gradient of a ResNet projection shortcut at
width_multiplier 0.125. ONEDNN_VERBOSE=1 shows oneDNN's
`jit_1x1:avx512_core,backward_weights` with src `acdb` (NHWC), which copies
the strided input into a per-thread "reduce to unit stride" workspace: for
NHWC input with fewer channels than its 16-channel block it writes past that
workspace (uxlfoundation/oneDNN#6035, open). Measured on 2 cores: crashes at
batch 1, 3 and 5 with 2 or 4 threads, not with 1 thread; batch 2, 4 and 8
survive (the overflow stays inside slack); 4, 8 and 12 input channels crash,
16, 24, 32 and 40 do not; stride 1 (no workspace) does not.

  python docs/upstream/onednn_strided_1x1_repro.py
"""
import numpy as np
import tensorflow as tf

tf.config.threading.set_intra_op_parallelism_threads(2)
rng = np.random.default_rng(0)
x = rng.standard_normal((1, 16, 16, 8), np.float32)  # batch 1, 8 channels.
dy = rng.standard_normal((1, 8, 8, 16), np.float32)  # stride-2 output.
for _ in range(30):
  tf.raw_ops.Conv2DBackpropFilter(
      input=x, filter_sizes=[1, 1, 8, 16], out_backprop=dy,
      strides=[1, 2, 2, 1], padding="VALID")
  # Heap traffic, so that glibc meets the corrupted chunks.
  _ = [np.ones(100 * i) for i in range(50)]
print("no crash")
