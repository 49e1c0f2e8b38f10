"""Layers of the detector: normalization chosen in one place; RoI layers."""
from megdet_tf.modeling.layers.conv2d import Conv2D
from megdet_tf.modeling.layers.cross_replica_batch_norm import (
    CrossReplicaBatchNormalization)
from megdet_tf.modeling.layers.normalization import bn_size
from megdet_tf.modeling.layers.normalization import build_norm
from megdet_tf.modeling.layers.normalization import FrozenBatchNormalization
from megdet_tf.modeling.layers.roi_aligner import MultilevelROIAligner
from megdet_tf.modeling.layers.roi_generator import MultilevelROIGenerator
