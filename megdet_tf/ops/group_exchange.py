"""How the replicas of one BN group share per-channel rows in a training step.

Three transports, the same results:
- in the graph: a group of CPU replicas of one worker lives in one process's
  memory, so each member concatenates or adds its group's tensors in a
  `merge_call` (cheaper than TensorFlow's CPU collectives);
- collectives over the group's devices only: own group keys, and the
  strategy's implementation (NCCL on GPUs), timeout and per-device ordering
  token, so a device runs its BN and gradient collectives in one program
  order (two unordered NCCL collectives on one stream can deadlock, as
  TensorFlow's SyncBatchNormalization did in tensorflow#42111) and a dead or
  stalled peer ends a BN exchange as it ends a gradient all-reduce;
- eagerly (replicas run one at a time, for debugging): a global all-reduce in
  which each replica fills its own row.
"""
import threading
import weakref

import tensorflow as tf

from megdet_tf.ops import private_tf_api

# "auto": in the graph where the group allows, else collectives;
# "collective": always collectives (as on GPUs).
EXCHANGES = ("auto", "collective")

# Group keys identify a set of devices across the whole cluster. The
# strategies' own keys count up from 1; ours live far above them and encode
# (group size, group index), so every process derives the same key for a group.
GROUP_KEY_BASE = 1 << 28
MAX_GROUPS = 1 << 16

# Group launchers by the strategy launcher they follow, then (group key,
# group size); shared by all BN layers, they live as long as the strategy's.
_launchers = weakref.WeakKeyDictionary()
# MirroredStrategy traces its replicas in threads.
_launchers_lock = threading.Lock()


def on_cpus(strategy: tf.distribute.Strategy) -> bool:
  """Whether this worker's replicas all run on CPUs."""
  return all("CPU" in device.upper()
             for device in strategy.extended.worker_devices)


def _launcher(group_key: int, group_size: int,
              follow: private_tf_api.CollectiveLauncher):
  with _launchers_lock:
    launchers = _launchers.setdefault(follow, {})
    key = (group_key, group_size)
    if key not in launchers:
      launchers[key] = private_tf_api.group_launcher(group_key, group_size,
                                                     follow)
    return launchers[key]


def _share_in_graph(strategy: tf.distribute.Strategy, value, group_size: int,
                    combine):
  """Each local replica's `combine` of its group's values, on its device.

  A `merge_call` function: `value` holds every local replica's tensor (the
  other arguments must be the same objects in every replica).
  """
  values = strategy.experimental_local_results(value)
  shared = []
  for index, device in enumerate(strategy.extended.worker_devices):
    first = index // group_size * group_size
    with tf.device(device):
      shared.append(combine(list(values[first:first + group_size])))
  return private_tf_api.regroup(tuple(shared))


def _concatenate(values):
  return tf.concat(values, 0)


class GroupExchange:
  """The calling replica's group: gathers and sums rows over its members.

  Groups are contiguous blocks of `group_size` global replica ids. `mode` is
  one of `EXCHANGES`; `owner` names the layer in errors.
  """

  def __init__(self, replica_ctx: tf.distribute.ReplicaContext,
               group_size: int, mode: str, owner: str):
    self._ctx = replica_ctx
    self._strategy = replica_ctx.strategy
    self._group_size = group_size
    self._owner = owner
    local_devices = len(self._strategy.extended.worker_devices)
    self._in_graph = (mode == "auto" and on_cpus(self._strategy) and
                      local_devices % group_size == 0)

  @property
  def group_size(self) -> int:
    return self._group_size

  def _member(self):
    """(global replica id, group index) of the calling replica."""
    replica_id = tf.get_static_value(self._ctx.replica_id_in_sync_group)
    if replica_id is None:
      raise ValueError(f"{self._owner}: {type(self._strategy).__name__} has "
                       "no static replica ids; use MirroredStrategy or "
                       "MultiWorkerMirroredStrategy.")
    group_index = int(replica_id) // self._group_size
    if group_index >= MAX_GROUPS:
      raise ValueError(f"{self._owner}: more than {MAX_GROUPS} BN groups.")
    return int(replica_id), group_index

  def gather(self, rows: tf.Tensor) -> tf.Tensor:
    """All members' `rows` [1, D] as [group_size, D], in replica order."""
    if tf.executing_eagerly():
      # Eager MirroredStrategy runs its replicas one at a time, so a group
      # collective would wait forever for its peers; Keras' all-reduce meets
      # them in a merge_call.
      replica_id, group_index = self._member()
      size = self._group_size
      everyone = tf.scatter_nd([[replica_id]], rows,
                               [self._ctx.num_replicas_in_sync, rows.shape[1]])
      return self._ctx.all_reduce(tf.distribute.ReduceOp.SUM, everyone)[
          group_index * size:(group_index + 1) * size]
    with tf.name_scope("cgbn_allgather"):
      if self._in_graph:
        return self._ctx.merge_call(
            _share_in_graph, args=(rows, self._group_size, _concatenate))
      return private_tf_api.all_gather(self._collective_launcher(), rows)

  def sum(self, values: tf.Tensor, scope: str) -> tf.Tensor:
    """The members' sum of `values` [D], named after name scope `scope`."""
    if tf.executing_eagerly():
      return tf.reduce_sum(self.gather(values[tf.newaxis]), 0)
    # A name ending in "/" re-enters `scope` from wherever backprop runs.
    with tf.name_scope(f"{scope}/cgbn_grad_allreduce/" if scope else
                       "cgbn_grad_allreduce"):
      if self._in_graph:
        return self._ctx.merge_call(
            _share_in_graph, args=(values, self._group_size, tf.add_n))
      return self._collective_launcher().all_reduce(values)

  def _collective_launcher(self):
    replica_id, group_index = self._member()
    local_index = replica_id % len(self._strategy.extended.worker_devices)
    return _launcher(
        GROUP_KEY_BASE + self._group_size * MAX_GROUPS + group_index,
        self._group_size,
        private_tf_api.strategy_launcher(self._strategy, local_index))
