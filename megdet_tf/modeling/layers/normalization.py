"""The one place that decides which normalization the detector uses.

Detectron2's `get_norm` idea: every layer that normalizes asks `build_norm`
for its layer, and Gin (`gin/norm/*.gin`) chooses the kind once for the whole
detector. A layer resolves that choice once into a norm spec (`norm_spec`), a
plain dict it keeps in its config, and builds its norms from the spec alone,
so a model rebuilt from its config has the norms it was trained with whatever
Gin holds then. The kinds:

- `frozen`: affine transform with fixed statistics and fixed scale/offset, the
  paper's "BN 0" baseline that keeps ImageNet statistics;
- `bn`: ordinary per-replica batch normalization;
- `cgbn`: MegDet's cross-GPU BN, statistics over `group_size` replicas.
"""
import inspect
from typing import Any, Dict, Mapping, Optional

import gin
import tensorflow as tf

from megdet_tf.modeling.layers import cross_replica_batch_norm

NORMS = ("frozen", "bn", "cgbn")
# The arguments of `build_norm` a norm spec holds.
SPEC_FIELDS = ("norm", "group_size", "exchange", "momentum", "epsilon")


@tf.keras.utils.register_keras_serializable(package="megdet_tf")
class FrozenBatchNormalization(tf.keras.layers.BatchNormalization):
  """Batch normalization that always uses its moving statistics.

  Its variables are never trainable and a training step never changes them,
  even if a parent layer is later set `trainable=True`.
  """

  def __init__(self, **kwargs):
    kwargs["trainable"] = False
    super().__init__(**kwargs)

  @property
  def trainable(self):
    return False

  @trainable.setter
  def trainable(self, value):
    del value  # Frozen by definition.

  def call(self, inputs, training=None):
    del training
    return super().call(inputs, training=False)


@gin.configurable
def build_norm(norm: str = "frozen",
               group_size: Optional[int] = None,
               exchange: str = "auto",
               momentum: float = 0.9,
               epsilon: float = 1e-5,
               name: Optional[str] = None,
               **kwargs) -> tf.keras.layers.Layer:
  """Returns the normalization layer every detector layer should use.

  Args:
    norm: one of `frozen`, `bn`, `cgbn`.
    group_size: replicas per BN group for `cgbn`; None = the replicas of the
      local worker (the paper's "one machine" rule).
    exchange: how `cgbn` groups share their statistics: "auto" (groups of CPU
      replicas of one worker inside the traced graph, other groups by
      collectives; NCCL on GPUs) or "collective" (always collectives, e.g. to
      profile on CPUs what GPUs run).
    momentum: moving-statistics momentum.
    epsilon: added to the variance.
    name: layer name (kept stable so checkpoints load across norm kinds).
    **kwargs: passed to the layer (e.g. `gamma_initializer`).
  """
  common = dict(momentum=momentum, epsilon=epsilon, name=name, **kwargs)
  if norm == "frozen":
    return FrozenBatchNormalization(**common)
  if norm == "bn":
    return tf.keras.layers.BatchNormalization(**common)
  if norm == "cgbn":
    return cross_replica_batch_norm.CrossReplicaBatchNormalization(
        group_size=group_size, exchange=exchange, **common)
  raise ValueError(f"build_norm.norm must be one of {NORMS}, got {norm!r}")


def norm_spec(norm: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
  """The normalization a layer builds: `norm` if given, else Gin's choice.

  Gin's choice is `build_norm`'s bindings, its defaults where unbound (the
  global scope). A layer passes the spec from its deserialized config as
  `norm`, and builds every norm with `build_norm(name=..., **spec)`.
  """
  if norm is None:
    bound = gin.get_bindings(build_norm)
    defaults = inspect.signature(build_norm).parameters
    norm = {k: bound.get(k, defaults[k].default) for k in SPEC_FIELDS}
  unknown = set(norm) - set(SPEC_FIELDS)
  if unknown:
    raise ValueError(f"A norm spec holds {SPEC_FIELDS}; got {sorted(unknown)}")
  if norm.get("norm", "frozen") not in NORMS:
    raise ValueError(f"build_norm.norm must be one of {NORMS}, got "
                     f"{norm['norm']!r}")
  return dict(norm)


def bn_size(per_replica_batch_size: int, replicas_per_worker: int = 1) -> int:
  """Images whose statistics one BN group shares (the paper's "BN size").

  The norm kind and group size are Gin's choice (`norm_spec`), so a config
  binds them once, e.g. with `gin/norm/cgbn.gin`. 0 for frozen BN, which has
  no batch statistics.

  Args:
    per_replica_batch_size: images per replica and step.
    replicas_per_worker: replicas of one worker, the group when
      `build_norm.group_size` is None.
  """
  spec = norm_spec()
  norm, group_size = spec["norm"], spec["group_size"]
  if norm == "frozen":
    return 0
  if norm == "bn":
    return per_replica_batch_size
  return per_replica_batch_size * (group_size or replicas_per_worker)
