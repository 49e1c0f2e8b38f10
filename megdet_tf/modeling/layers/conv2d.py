"""`tf.keras.layers.Conv2D` that runs pointwise convolutions as one matmul.

A 1x1 convolution with stride 1 is the matrix product [B*H*W, C_in] x
[C_in, C_out]. On CPUs oneDNN runs that product, forward and backward, up to
1.9 times faster than its convolution kernels at ResNet-50's 1x1 shapes (1.1
to 1.9 in bfloat16, 1.2 in float32; benchmarks/pointwise_conv.py), and about
half of ResNet-50's multiply-adds are in such convs; on GPUs cuBLAS and cuDNN
run it alike. The
kernel variable keeps Keras' [1, 1, C_in, C_out] shape and name, so
checkpoints and pretrained weights load unchanged; results equal Keras' up to
the order of summation. Every other conv (3x3, strided, dilated, grouped,
channels-first) is Keras' own, except a strided 1x1 conv over fewer than 16
channels: oneDNN's weight gradient for it corrupts the heap (below), so it
takes every stride-th pixel and runs as a matmul too.
"""
import tensorflow as tf

# oneDNN's 1x1 backward-weights kernel (TensorFlow 2.20's oneDNN 3.7) writes
# past its workspace for a strided conv over NHWC input with fewer channels
# than its channel block, 16 on AVX-512 (uxlfoundation/oneDNN#6035): the tiny
# test detector's first projection shortcut (8 channels) crashed training at
# 1 image per replica. docs/upstream/onednn_strided_1x1_repro.py shows it.
_MIN_STRIDED_1X1_CHANNELS = 16


@tf.keras.utils.register_keras_serializable(package="megdet_tf")
class Conv2D(tf.keras.layers.Conv2D):
  """Keras' Conv2D; 1x1 stride-1 convs by `tf.matmul` over the channels.

  Strided 1x1 convs over fewer than 16 channels too, on the subsampled input.
  """

  @property
  def is_pointwise(self) -> bool:
    return (self.kernel_size == (1, 1) and self.strides == (1, 1) and
            self.dilation_rate == (1, 1) and self.groups == 1 and
            self.data_format == "channels_last")

  def _subsamples(self, channels: int) -> bool:
    """A strided 1x1 conv that oneDNN's weight gradient would crash on."""
    return (self.kernel_size == (1, 1) and self.strides != (1, 1) and
            self.dilation_rate == (1, 1) and self.groups == 1 and
            self.data_format == "channels_last" and
            channels < _MIN_STRIDED_1X1_CHANNELS)

  def convolution_op(self, inputs, kernel):
    channels, filters = kernel.shape[-2:]
    if self._subsamples(channels):
      # Output pixel i is input pixel i * stride for 'same' and 'valid'
      # padding alike (a 1x1 window needs no padding).
      inputs = inputs[:, ::self.strides[0], ::self.strides[1], :]
    elif not self.is_pointwise:
      return super().convolution_op(inputs, kernel)
    outputs = tf.matmul(tf.reshape(inputs, [-1, channels]),
                        tf.reshape(kernel, [channels, filters]))
    return tf.reshape(outputs,
                      tf.concat([tf.shape(inputs)[:-1], [filters]], axis=0))
