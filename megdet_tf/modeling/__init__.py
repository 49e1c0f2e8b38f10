"""The detector: ResNet + FPN Faster R-CNN, its loss and ImageNet loading."""
from megdet_tf.modeling.backbones.resnet import ResNet
from megdet_tf.modeling.decoders.fpn import FPN
from megdet_tf.modeling.faster_rcnn import build_faster_rcnn
from megdet_tf.modeling.faster_rcnn import build_variables
from megdet_tf.modeling.faster_rcnn import FasterRCNN
from megdet_tf.modeling.heads.box_head import BoxHead
from megdet_tf.modeling.heads.rpn_head import RPNHead
from megdet_tf.modeling.losses import FasterRCNNLoss
from megdet_tf.modeling.pretrained import load_keras_applications_resnet
