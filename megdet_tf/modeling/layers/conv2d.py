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
channels-first) is Keras' own.
"""
import tensorflow as tf


@tf.keras.utils.register_keras_serializable(package="megdet_tf")
class Conv2D(tf.keras.layers.Conv2D):
  """Keras' Conv2D; 1x1 stride-1 convs by `tf.matmul` over the channels."""

  @property
  def is_pointwise(self) -> bool:
    return (self.kernel_size == (1, 1) and self.strides == (1, 1) and
            self.dilation_rate == (1, 1) and self.groups == 1 and
            self.data_format == "channels_last")

  def convolution_op(self, inputs, kernel):
    if not self.is_pointwise:
      return super().convolution_op(inputs, kernel)
    channels, filters = kernel.shape[-2:]
    outputs = tf.matmul(tf.reshape(inputs, [-1, channels]),
                        tf.reshape(kernel, [channels, filters]))
    return tf.reshape(outputs,
                      tf.concat([tf.shape(inputs)[:-1], [filters]], axis=0))
