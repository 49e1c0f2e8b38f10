"""MegDet's custom training loop: `strategy.run` over a tf.data pipeline.

One call of the compiled loop runs `steps_per_loop` steps on every replica:
each replica computes its losses on its own images (cross-replica BN layers
exchange statistics inside the forward pass), scales them by
1/num_replicas so that the sum over replicas is the loss of the global batch,
and the gradients are all-reduced once per step (`gradient_allreduce` in a
profile) before SGD applies them.

Around the loop: checkpoints every `checkpoint_every_steps` and at the end
(resumed automatically; only the chief writes to `model_dir`), a divergence
guard that leaves no diverged checkpoint behind (`divergence.py`), TensorBoard
scalars and a console progress line, and periodic COCO evaluation
(`evaluator.py`).
"""
import functools
import os
import re
import shutil
import time
from typing import Callable, Dict, Optional

from absl import logging
import gin
import tensorflow as tf

from megdet_tf.dataloaders.input_reader import InputReader
from megdet_tf.modeling import checkpoint_fit
from megdet_tf.modeling import faster_rcnn
from megdet_tf.modeling.init_checkpoint import initialize_from_checkpoint
from megdet_tf.modeling.layers import normalization
from megdet_tf.modeling.layers.cross_replica_batch_norm import (
    CrossReplicaBatchNormalization)
from megdet_tf.modeling.losses import FasterRCNNLoss
from megdet_tf.modeling.pretrained import load_keras_applications_resnet
from megdet_tf.optimization import lr_schedule as lr_schedule_lib
from megdet_tf.optimization import optimizer as optimizer_lib
from megdet_tf.training import divergence
from megdet_tf.training import evaluator as evaluator_lib
from megdet_tf.training import peer_errors
from megdet_tf.training import profiling
from megdet_tf.training import strategy as strategy_lib


LOSS_KEYS = FasterRCNNLoss.KEYS + ("gradient_norm",)


# tools/train.py's exit codes for the two ends a job scheduler acts on; 42 is
# TensorFlow's restart code for a preempted job (its Borg default).
EXIT_DIVERGED = 3
EXIT_PREEMPTED = 42


class PreemptedError(RuntimeError):
  """A worker got SIGTERM; every worker saved the same step and stopped."""


def _check_compilable(model: tf.keras.Model, strategy: tf.distribute.Strategy):
  """XLA cannot compile CGBN's group exchange: refuse it before tracing."""
  grouped = [layer for layer in model.submodules
             if isinstance(layer, CrossReplicaBatchNormalization) and
             layer.trainable and layer.resolve_group_size(strategy) > 1]
  if grouped:
    raise ValueError(
        f"DetectorTrainer.jit_compile=True with cross-replica BN in groups of "
        f"{grouped[0].resolve_group_size(strategy)} ({len(grouped)} layers, "
        f"e.g. {grouped[0].name}): XLA cannot compile the group exchange (no "
        "kernel for the collective all-gather, one group key per cluster). "
        "Set DetectorTrainer.jit_compile=False, or use build_norm.norm "
        "'bn'/'frozen' or build_norm.group_size=1.")


@gin.configurable(denylist=["strategy", "model_dir", "train_reader",
                             "eval_reader"])
class DetectorTrainer:
  """Trains and evaluates the detector under a distribution strategy."""

  def __init__(self,
               strategy: tf.distribute.Strategy,
               model_dir: str,
               train_reader: InputReader,
               eval_reader: InputReader,
               steps_per_loop: int = 20,
               checkpoint_every_steps: int = 1000,
               keep_checkpoints: int = 5,
               eval_every_steps: int = 0,
               log_every_seconds: float = 10.0,
               max_loss: float = 1e3,
               jit_compile: bool = False,
               eval_steps: Optional[int] = None,
               num_summary_images: int = 4):
    """Builds model, optimizer, data and checkpointing under `strategy`.

    Args:
      strategy: from `build_strategy`.
      model_dir: checkpoints, summaries and the operative config go here.
      train_reader: the training split's `InputReader`.
      eval_reader: the evaluation split's `InputReader`.
      steps_per_loop: training steps per call of the compiled loop.
      checkpoint_every_steps: checkpoint period (and at the end).
      keep_checkpoints: newest checkpoints kept.
      eval_every_steps: COCO evaluation period in `train_and_eval`; 0 = at the
        end only.
      log_every_seconds: console progress period.
      max_loss: a total loss above this counts as divergence.
      jit_compile: XLA-compile the per-replica step.
      eval_steps: evaluate on this many batches only (None: the whole split).
      num_summary_images: validation images shown with their ground-truth
        and detected boxes in TensorBoard at each evaluation (0: none).
    """
    self.strategy = strategy
    self.model_dir = model_dir
    self.is_chief = strategy_lib.is_chief(strategy.cluster_resolver)
    self._steps_per_loop = steps_per_loop
    self._checkpoint_every_steps = checkpoint_every_steps
    self._eval_every_steps = eval_every_steps
    self._log_every_seconds = log_every_seconds
    self._jit_compile = jit_compile

    self.train_reader = train_reader
    self.eval_reader = eval_reader
    self.category_map = self.train_reader.parser.category_map
    self.global_batch_size = self.train_reader.global_batch_size
    self.schedule = lr_schedule_lib.build_lr_schedule(
        global_batch_size=self.global_batch_size)
    self.total_steps = self.schedule.total_steps

    with strategy.scope():
      self.model = faster_rcnn.build_faster_rcnn(
          num_classes=self.category_map.num_classes)
      # ImageNet weights (if Gin names a file); a checkpoint restored later
      # replaces them.
      load_keras_applications_resnet(self.model.backbone)
      self.optimizer = optimizer_lib.build_training_optimizer(self.schedule)
      # The dtype policy is the process's (experiment.configure_process).
      if tf.keras.mixed_precision.global_policy().name == "mixed_float16":
        self.optimizer = tf.keras.mixed_precision.LossScaleOptimizer(
            self.optimizer)
      self.checkpoint = tf.train.Checkpoint(model=self.model,
                                            optimizer=self.optimizer)
    if jit_compile:
      _check_compilable(self.model, strategy)
    directory = model_dir if self.is_chief else os.path.join(
        model_dir, f".worker_{strategy.cluster_resolver.task_id}")
    self.checkpoint_manager = tf.train.CheckpointManager(
        self.checkpoint, directory, max_to_keep=keep_checkpoints,
        step_counter=self.optimizer.iterations)
    self.loss_fn = FasterRCNNLoss()
    self._divergence = divergence.DivergenceGuard(
        model_dir, self.checkpoint_manager, self.schedule, max_loss,
        self.is_chief)
    self._evaluator = evaluator_lib.DetectorEvaluator(
        strategy, self.model, eval_reader, self.category_map, eval_steps,
        num_summary_images)
    self._summary_dir = model_dir if self.is_chief else directory
    self._profile_window = profiling.ProfileWindow(model_dir,
                                                   capture=self.is_chief)
    self._train_loop = None
    self._started = False
    self._resumed_from = None

  @functools.cached_property
  def _summary_writer(self):
    # Made on first use: creating it writes an event file, and nothing may
    # change in model_dir before the checkpoint to resume is known to fit.
    return tf.summary.create_file_writer(self._summary_dir)

  @property
  def step(self) -> int:
    return int(self.optimizer.iterations.numpy())

  @peer_errors.names_lost_peers
  def restore(self, checkpoint_path: Optional[str] = None) -> Optional[str]:
    """Restores `checkpoint_path`, or the chief's latest in model_dir.

    Every worker reads the chief's checkpoints (model_dir must be on a file
    system all workers share, as for any multi-worker TensorFlow job). A
    checkpoint of another model configuration is refused before anything is
    restored (`checkpoint_fit.check_fits`), and workers that did not restore
    the same step stop with an error.
    """
    path = checkpoint_path or tf.train.latest_checkpoint(self.model_dir)
    # Before restoring: a restore on some workers only would leave the
    # workers' collectives out of step.
    self._check_workers_agree(path)
    if path:
      checkpoint_fit.check_fits(self.model, path)
      self.checkpoint.restore(path).expect_partial()
      logging.info("Restored %s (step %d)", path, self.step)
    return path

  def resume_or_initialize(self) -> Optional[str]:
    """Restores model_dir's latest checkpoint, or starts a fresh run from
    `initialize_from_checkpoint`'s (when Gin names one); once per trainer.

    Returns the restored checkpoint, if any.
    """
    if not self._started:
      self._started = True
      self._resumed_from = self.restore()
      if not self._resumed_from:
        initialize_from_checkpoint(self.model)
    return self._resumed_from

  def _check_workers_agree(self, path: Optional[str]):
    """All workers are about to restore the same step (one all-gather)."""
    resolver = self.strategy.cluster_resolver
    num_workers = resolver and sum(
        len(tasks) for tasks in resolver.cluster_spec().as_dict().values())
    if not num_workers or num_workers == 1:
      return
    match = re.fullmatch(r".*-(\d+)", path or "")
    step = int(match.group(1)) if match else (-1 if path else 0)
    steps = self._gather(tf.constant(step, tf.float32)).numpy()
    if len(set(steps.tolist())) == 1:
      return
    per_worker = len(steps) // num_workers
    raise RuntimeError(
        "Workers resumed from different steps: " + ", ".join(
            f"worker {w}: step {int(steps[w * per_worker])}"
            for w in range(num_workers)) +
        f" (this is {resolver.task_type} {resolver.task_id}, which found "
        f"{path or 'no checkpoint'}). Every worker must see the chief's "
        f"model_dir {self.model_dir} on a shared file system.")

  @tf.function
  def _gather(self, value: tf.Tensor) -> tf.Tensor:
    """`value` of every replica, in replica order."""
    def replica_fn():
      return tf.distribute.get_replica_context().all_gather(
          tf.reshape(value, [1]), axis=0)
    return self.strategy.experimental_local_results(
        self.strategy.run(replica_fn))[0]

  @functools.cached_property
  def _preemption(self):
    """TensorFlow's preemption handler over the trainer's checkpoints.

    On SIGTERM to any worker, all workers agree on a step, save it with
    `_save` and raise `PreemptedError`. Made after `resume_or_initialize`:
    the handler restores the latest checkpoint when made, which must not
    happen before that checkpoint is known to fit the model.
    """
    def exit_fn():
      raise PreemptedError(
          f"Preempted (SIGTERM): saved step {self.step} in {self.model_dir}; "
          "run the same command again to resume from it.")
    with self.strategy.scope():
      return tf.distribute.experimental.PreemptionCheckpointHandler(
          self.strategy.cluster_resolver, self.checkpoint_manager,
          termination_config=tf.distribute.experimental.TerminationConfig(
              exit_fn=exit_fn, save_fn=self._save))

  def _save(self):
    self.checkpoint_manager.save(checkpoint_number=self.step)
    if not self.is_chief:
      shutil.rmtree(self.checkpoint_manager.directory, ignore_errors=True)

  # --- The compiled training loop -------------------------------------------

  def _replica_step(self, images, labels):
    """Forward, losses, gradient all-reduce and update on one replica."""
    with tf.GradientTape() as tape:
      outputs = self.model.call_with_labels(images, labels, training=True)
      losses = self.loss_fn(outputs, labels, self.model.trainable_variables)
      scaled = losses["total_loss"] / self.strategy.num_replicas_in_sync
      if isinstance(self.optimizer, tf.keras.mixed_precision.LossScaleOptimizer):
        scaled = self.optimizer.get_scaled_loss(scaled)
    variables = self.model.trainable_variables
    grads = tape.gradient(scaled, variables)
    with tf.name_scope("gradient_allreduce"):
      grads = tf.distribute.get_replica_context().all_reduce(
          tf.distribute.ReduceOp.SUM, grads)
    if isinstance(self.optimizer, tf.keras.mixed_precision.LossScaleOptimizer):
      grads = self.optimizer.get_unscaled_gradients(grads)
    losses["gradient_norm"] = tf.linalg.global_norm(grads)
    self.optimizer.apply_gradients(zip(grads, variables),
                                   skip_gradients_aggregation=True)
    return losses

  def _build_train_loop(self) -> Callable:
    # Traced inline unless XLA compiles it: the collectives' call-time
    # instance keys must be captured by the outer function (tf.function
    # nesting would leave them unfed inside the loop).
    replica_step = (tf.function(self._replica_step, jit_compile=True)
                    if self._jit_compile else self._replica_step)

    @tf.function
    def train_loop(iterator, num_steps):
      """Runs up to `num_steps` steps; stops after a diverging one."""
      losses = {k: tf.constant(0.0) for k in LOSS_KEYS}
      steps = tf.constant(0)
      for _ in tf.range(num_steps):
        with tf.name_scope("input_wait"):  # Findable in a profile.
          batch = next(iterator)
        losses = self._reduce(self.strategy.run(replica_step, args=batch))
        steps += 1
        if not self._divergence.is_healthy(losses["total_loss"]):
          break
      return losses, steps

    return train_loop

  def _reduce(self, per_replica_losses: Dict[str, tf.Tensor]):
    """Mean over replicas of each loss term."""
    return {k: self.strategy.reduce(tf.distribute.ReduceOp.MEAN, v, axis=None)
            for k, v in per_replica_losses.items()}

  # --- Public entry points --------------------------------------------------

  @peer_errors.names_lost_peers
  def train(self, max_steps: Optional[int] = None,
            evaluate: bool = False) -> Dict[str, float]:
    """Trains to `total_steps` (or `max_steps`), resuming from model_dir.

    See `resume_or_initialize` for where it starts.
    """
    self.resume_or_initialize()
    preemption = self._preemption  # Watches SIGTERM from here on.
    self._divergence.clear()
    end = min(self.total_steps, max_steps or self.total_steps)
    if self._train_loop is None:
      self._train_loop = self._build_train_loop()
    if self.step < end:
      self._log_setup(end)
    iterator = iter(self.train_reader.distribute(self.strategy, self.step))
    last_log, losses, traced = 0.0, {}, True
    while self.step < end:
      start = time.time()
      num_steps = self._steps_until_boundary(end)
      with self._profile_window.loop(self.step, num_steps, end):
        losses, steps = self._train_loop(iterator, tf.constant(num_steps))
        losses = {k: float(v) for k, v in losses.items()}
      self._divergence.check(losses, self.step,
                             first_step_of_loop=int(steps) == 1)
      elapsed = time.time() - start
      self._write_train_summaries(losses, int(steps), elapsed, traced)
      if time.time() - last_log >= self._log_every_seconds or self.step >= end:
        last_log = time.time()
        self._log_progress(losses, int(steps), elapsed, end, traced)
      traced = False
      if self.step % self._checkpoint_every_steps == 0 or self.step >= end:
        self._save()
      preemption.save_checkpoint_if_preempted()
      if (evaluate and self._eval_every_steps and self.step < end and
          self.step % self._eval_every_steps == 0):
        self.evaluate()
    self._summary_writer.flush()
    return losses

  def _steps_until_boundary(self, end: int) -> int:
    """Loop length that stops on checkpoint, evaluation, profile, end steps."""
    periods = [self._checkpoint_every_steps, self._steps_per_loop]
    if self._eval_every_steps:
      periods.append(self._eval_every_steps)
    step = self.step
    boundaries = [step + p - step % p for p in periods]
    boundaries += self._profile_window.boundaries_after(step)
    return min(min(boundaries), end) - step

  def _write_train_summaries(self, losses, steps, elapsed, traced):
    with self._summary_writer.as_default(step=self.step):
      for name, value in losses.items():
        tf.summary.scalar(f"train/{name}", value)
      tf.summary.scalar("train/learning_rate",
                        float(self.schedule(self.step - 1)))
      # Records of this worker's input that do not decode (each counted once).
      tf.summary.scalar("train/skipped_records",
                        self.train_reader.skipped_records)
      if traced:
        return
      tf.summary.scalar("train/images_per_second",
                        steps * self.global_batch_size / elapsed)
      tf.summary.scalar("train/step_time_seconds", elapsed / steps)

  def _log_setup(self, end):
    """What the run trains: the batch's split, the BN size, the LR ramp."""
    replicas = self.strategy.num_replicas_in_sync
    per_replica = self.global_batch_size // replicas
    logging.info(
        "Training steps %d-%d: %d replicas x %d images, BN size %d; LR %.4g "
        "rising to %.4g over %d steps", self.step + 1, end, replicas,
        per_replica, normalization.bn_size(
            per_replica, len(self.strategy.extended.worker_devices)),
        self.schedule.warmup_start_learning_rate,
        self.schedule.peak_learning_rate, self.schedule.warmup_steps)

  def _log_progress(self, losses, steps, elapsed, end, traced):
    """One console line; the loop that traced the step has no fair rate."""
    eta = time.strftime("%H:%M:%S",
                        time.gmtime((end - self.step) * elapsed / steps))
    skipped = self.train_reader.skipped_records
    logging.info(
        "step %d/%d  loss %.4f  lr %.4g  %s%s", self.step, end,
        losses["total_loss"], float(self.schedule(self.step - 1)),
        f"traced and ran in {elapsed:.0f} s" if traced else
        f"{steps * self.global_batch_size / elapsed:.1f} img/s  ETA {eta}",
        f"  skipped {skipped} undecodable records" if skipped else "")

  @peer_errors.names_lost_peers
  def evaluate(self) -> Dict[str, float]:
    """COCO metrics of the current weights on the eval split."""
    return self._evaluator.evaluate(self.step, self._summary_writer,
                                    self.model_dir if self.is_chief else None)
