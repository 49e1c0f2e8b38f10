"""Learning-rate policy (linear scaling + warmup + step decay) and optimizer."""
from megdet_tf.optimization.lr_schedule import build_lr_schedule
from megdet_tf.optimization.lr_schedule import DecayPolicy
from megdet_tf.optimization.lr_schedule import policy_steps
from megdet_tf.optimization.lr_schedule import POLICIES
from megdet_tf.optimization.lr_schedule import steps_per_epoch
from megdet_tf.optimization.lr_schedule import WarmupLinearScaling
from megdet_tf.optimization.optimizer import build_training_optimizer
from megdet_tf.optimization.optimizer import MomentumSGD
