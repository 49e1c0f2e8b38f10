"""A lost worker, told apart from TensorFlow's errors and named.

A multi-worker step that loses a peer fails deep in TensorFlow with an error
that says which op failed, not why. `names_lost_peers` turns the two errors a
lost peer causes into `PeerLostError` with a message a user can act on.
"""
import functools
import re

import tensorflow as tf

from megdet_tf.training import strategy as strategy_lib


class PeerLostError(RuntimeError):
  """Another worker is dead or stalled: this one's collectives cannot end."""


# TensorFlow's words for a peer that its coordination service lost, and for
# the op that failed.
_UNHEALTHY_TASKS = re.compile(
    r"stopped sending heartbeats\):\s*((?:/job:\w+/replica:\d+/task:\d+\s*)+)")
_FAILED_NODE = re.compile(r"\[\[\{\{node ([^}]+)\}\}\]\]")


def _failed_node(error: tf.errors.OpError) -> str:
  """' (TensorFlow: <node>)' naming the op that `error` reports, or ''."""
  node = _FAILED_NODE.search(error.message)
  return f" (TensorFlow: {node.group(1)})" if node else ""


def names_lost_peers(method):
  """Makes a trainer's `method`, which runs collectives, raise
  `PeerLostError` saying what a lost peer looks like from here, instead of
  TensorFlow's error.

  A collective that waited longer than the strategy's timeout fails with
  DeadlineExceeded: a peer stopped taking part but still runs (its input or
  step hangs). A peer that stopped as a whole (dead, stopped, its machine
  hung) misses its heartbeats first, and TensorFlow's coordination service
  aborts the collectives with Unavailable. Other errors pass unchanged.
  """
  @functools.wraps(method)
  def wrapper(self, *args, **kwargs):
    try:
      return method(self, *args, **kwargs)
    except tf.errors.DeadlineExceededError as e:
      if "Collective has timed out" not in e.message:
        raise
      raise PeerLostError(
          "A collective waited more than "
          f"{strategy_lib.collective_timeout(self.strategy):g} s "
          "(build_strategy.collective_timeout_seconds) for the other "
          "workers: one of them is stalled (its input or its step hangs), "
          "or far slower than this one. See the other workers' logs"
          f"{_failed_node(e)}.") from e
    except tf.errors.UnavailableError as e:
      unhealthy = _UNHEALTHY_TASKS.search(e.message)
      if not unhealthy:
        raise
      peers = ", ".join(
          f"{job} {task}" for job, task in re.findall(
              r"/job:(\w+)/replica:\d+/task:(\d+)", unhealthy.group(1)))
      raise PeerLostError(
          f"{peers} stopped sending heartbeats to TensorFlow's coordination "
          "service, which aborted this worker's collectives: it is dead or "
          "stalled as a whole (killed, stopped, out of memory, its machine "
          f"hung). See its log{_failed_node(e)}.") from e
  return wrapper
