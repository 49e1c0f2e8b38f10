"""A TensorBoard profile of training steps a..b, chosen by Gin.

  --gin_param='ProfileWindow.profile_steps=(21, 25)'

Steps count from 1 as in the progress log (step k takes the optimizer from
k - 1 to k iterations); both bounds are included, as in Keras'
`profile_batch`. The trainer stops its compiled loops before step a and after
step b (`boundaries_after`), so the window holds exactly those steps (and,
from a = 2 on, not the tracing of the first call), and `tf.profiler` runs
only around them. The profile lands in
`logdir/plugins/profile/<timestamp>/` (logdir = model_dir): TensorBoard's
Profile tab finds it there when the `profile` extra (xprof) is installed.

Every loop call inside the window is one `train` event (`step_num` = its first
step, `num_steps`; `_r=1` marks it a step for the overview page, which may
rename it "train <step_num>"), so `allreduce_report` can turn the trace into
per-step figures.
"""
import contextlib
import time
from typing import Iterator, List, Optional, Tuple

from absl import logging
import gin
import tensorflow as tf

# The name of the loop-call events in the trace.
TRAIN_EVENT = "train"
_SETTLE_SECONDS = 0.1  # See ProfileWindow._stop.


@gin.configurable(denylist=["logdir", "capture"])
class ProfileWindow:
  """Starts and stops `tf.profiler` around the loop calls of steps a..b."""

  def __init__(self,
               logdir: str,
               capture: bool = True,
               profile_steps: Optional[Tuple[int, int]] = None):
    """Checks the window.

    Args:
      logdir: the TensorBoard log directory (the trainer's model_dir).
      capture: False on workers that keep the same loop boundaries (the
        window is part of the Gin config every worker reads) but do not
        write a profile.
      profile_steps: (a, b), the first and last profiled step; None = off.
    """
    if profile_steps is not None:
      if (len(profile_steps) != 2 or
          not all(isinstance(s, int) for s in profile_steps) or
          not 1 <= profile_steps[0] <= profile_steps[1]):
        raise ValueError(
            "ProfileWindow.profile_steps must be (first, last) steps with "
            f"1 <= first <= last, e.g. (21, 25); got {profile_steps!r}")
      profile_steps = tuple(profile_steps)
    self.logdir = logdir
    self.profile_steps = profile_steps
    self._capture = capture
    self._running = False

  def boundaries_after(self, step: int) -> List[int]:
    """Steps after `step` at which a compiled loop must stop."""
    if self.profile_steps is None:
      return []
    first, last = self.profile_steps
    return [s for s in (first - 1, last) if s > step]

  @contextlib.contextmanager
  def loop(self, step: int, num_steps: int, end: int) -> Iterator[None]:
    """Wraps the loop call that runs steps step+1 .. step+num_steps.

    The profiler starts with the first call inside the window and stops after
    the call that reaches its last step (or `end`, the end of training), or
    when a call raises, keeping what it captured.
    """
    if (not self._capture or self.profile_steps is None or
        not self.profile_steps[0] - 1 <= step < self.profile_steps[1]):
      yield
      return
    if not self._running:
      # Default options: every TensorFlow op, no Python calls. (TF 2.20
      # ignores ProfilerOptions: "host_tracer_level expects an i value".)
      tf.profiler.experimental.start(self.logdir)
      self._running = True
    try:
      with tf.profiler.experimental.Trace(TRAIN_EVENT, step_num=step + 1,
                                          num_steps=num_steps, _r=1):
        yield
    except BaseException:
      self._stop()
      raise
    if step + num_steps >= min(self.profile_steps[1], end):
      self._stop()

  def _stop(self):
    # An async kernel (every collective) records its trace event after it
    # has delivered its outputs, so the loop call can return, and the
    # profiler stop, before the last collective's event is in: let it land.
    time.sleep(_SETTLE_SECONDS)
    tf.profiler.experimental.stop()
    self._running = False
    logging.info("Profile written under %s/plugins/profile", self.logdir)
