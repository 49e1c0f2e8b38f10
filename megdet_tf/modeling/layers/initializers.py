"""Detectron2's weight initializers, as Keras initializers.

One place for the fills that the backbone, FPN and box head share with
Detectron2 (its `c2_msra_fill` and `c2_xavier_fill`).
"""
import tensorflow as tf


def msra_fill() -> tf.keras.initializers.Initializer:
  """`c2_msra_fill`: He init over the fan-out."""
  return tf.keras.initializers.VarianceScaling(2.0, "fan_out",
                                               "untruncated_normal")


def xavier_fill() -> tf.keras.initializers.Initializer:
  """`c2_xavier_fill`: kaiming_uniform with a=1, over the fan-in."""
  return tf.keras.initializers.VarianceScaling(1.0, "fan_in", "uniform")
