"""Tests of the training optimizer driven by the MegDet schedule."""
import megdet_tf  # noqa: F401  pylint: disable=unused-import
import numpy as np
import pytest
import tensorflow as tf

from megdet_tf import optimization


def _schedule():
  """0.1 · 2/1 = 0.2 peak, warmup 0.1 -> 0.2 over 2 steps, ×0.1 from step 3."""
  return optimization.WarmupLinearScaling(
      base_learning_rate=0.1, reference_batch_size=1, global_batch_size=2,
      warmup_steps=2, boundaries=(3,), multipliers=(0.1,))


def _train(optimizer, variable, steps, loss_fn):
  """Runs `steps` updates in a tf.function, as the training loop does."""

  @tf.function
  def step():
    with tf.GradientTape() as tape:
      loss = loss_fn(variable)
    optimizer.apply_gradients([(tape.gradient(loss, variable), variable)])

  for _ in range(steps):
    step()


def _quadratic(variable):
  return 0.5 * tf.reduce_sum(tf.square(variable))  # Gradient = variable.


def test_sgd_momentum_update():
  schedule = _schedule()
  optimizer = optimization.build_training_optimizer(schedule)
  assert isinstance(optimizer, optimization.MomentumSGD)
  w0 = np.array([1.0, -2.0])
  variable = tf.Variable(w0, dtype=tf.float32)
  _train(optimizer, variable, 2, _quadratic)
  # Heavy-ball momentum with the rate inside the velocity (as in the
  # paper's Caffe-style SGD): v <- 0.9 v - lr(s) g, w <- w + v.
  lr0, lr1 = 0.1, 0.15  # Warmup: steps 0 and 1 of 0.1 -> 0.2.
  v1 = -lr0 * w0
  w1 = w0 + v1
  w2 = w1 + 0.9 * v1 - lr1 * w1
  np.testing.assert_allclose(variable, w2, rtol=1e-6)
  assert int(optimizer.iterations) == 2


@pytest.mark.parametrize("nesterov", [False, True])
def test_fused_update_follows_keras_sgd_on_mirrored_replicas(nesterov):
  # Gradients summed without collectives: strategies created in one
  # process reuse collective keys and would clash with other tests'.
  devices = [d.name for d in tf.config.list_logical_devices("CPU")]
  strategy = tf.distribute.MirroredStrategy(
      devices, cross_device_ops=tf.distribute.ReductionToOneDevice())
  rng = np.random.default_rng(0)
  initial = [rng.normal(size=shape) for shape in ((3, 4), (4,), (2, 2, 3))]
  trajectories = []
  for optimizer_class in (optimization.MomentumSGD, tf.keras.optimizers.SGD):
    with strategy.scope():
      variables = [tf.Variable(value, dtype=tf.float32) for value in initial]
      optimizer = optimizer_class(_schedule(), momentum=0.9,
                                  nesterov=nesterov)

    def replica_step(variables=variables, optimizer=optimizer):
      replica = tf.cast(
          tf.distribute.get_replica_context().replica_id_in_sync_group + 1,
          tf.float32)
      with tf.GradientTape() as tape:  # Gradients differ between replicas.
        loss = tf.add_n([tf.reduce_sum(tf.sin(replica * v))
                         for v in variables])
      optimizer.apply_gradients(
          zip(tape.gradient(loss, variables), variables))

    step = tf.function(lambda fn=replica_step: strategy.run(fn))
    for _ in range(4):  # Warmup, then the decayed rate.
      step()
    trajectories.append([v.numpy() for v in variables])
    fused_updates = [op for op in step.get_concrete_function().graph
                     .get_operations()
                     if op.type == "ResourceApplyKerasMomentum"]
    assert len(fused_updates) == (
        len(devices) * len(variables)
        if optimizer_class is optimization.MomentumSGD else 0)
  assert not np.allclose(trajectories[0][0], initial[0])
  for fused, keras_sgd in zip(*trajectories):
    np.testing.assert_allclose(fused, keras_sgd, rtol=1e-6, atol=1e-6)


def test_update_at_step_k_uses_schedule_of_k():
  schedule = _schedule()
  optimizer = optimization.build_training_optimizer(schedule, momentum=0.0)
  variable = tf.Variable([0.0])
  positions = [0.0]
  for _ in range(5):
    _train(optimizer, variable, 1, tf.reduce_sum)  # Gradient = 1.
    positions.append(float(variable[0]))
  np.testing.assert_allclose(-np.diff(positions),
                             [float(schedule(k)) for k in range(5)], rtol=1e-6)
  np.testing.assert_allclose(-np.diff(positions), [0.1, 0.15, 0.2, 0.02, 0.02],
                             rtol=1e-6)


def test_resume_from_checkpoint_continues_schedule_and_momentum(tmp_path):
  variable = tf.Variable([1.0, -2.0])
  optimizer = optimization.build_training_optimizer(_schedule())
  _train(optimizer, variable, 2, _quadratic)
  path = tf.train.Checkpoint(variable=variable, optimizer=optimizer).save(
      str(tmp_path / "ckpt"))
  _train(optimizer, variable, 2, _quadratic)

  resumed_variable = tf.Variable([0.0, 0.0])
  resumed = optimization.build_training_optimizer(_schedule())
  tf.train.Checkpoint(variable=resumed_variable, optimizer=resumed).restore(
      path).assert_existing_objects_matched()
  assert int(resumed.iterations) == 2
  _train(resumed, resumed_variable, 2, _quadratic)
  np.testing.assert_allclose(resumed_variable, variable, rtol=1e-6)


def test_config_round_trip_keeps_schedule():
  schedule = _schedule()
  optimizer = optimization.build_training_optimizer(schedule)
  config = optimizer.get_config()
  assert (config["learning_rate"]["registered_name"] ==
          "megdet_tf>WarmupLinearScaling")
  restored = tf.keras.optimizers.SGD.from_config(dict(config))
  assert restored.get_config() == config
  variables = [tf.Variable([1.0, -2.0]) for _ in range(2)]
  for opt, variable in zip((optimizer, restored), variables):
    _train(opt, variable, 3, _quadratic)
  np.testing.assert_allclose(*variables, rtol=1e-6)


def test_global_clipnorm():
  optimizer = optimization.build_training_optimizer(
      1.0, momentum=0.0, global_clipnorm=1.0)
  variable = tf.Variable([3.0, 4.0])
  _train(optimizer, variable, 1, _quadratic)  # Gradient norm 5 -> 1.
  np.testing.assert_allclose(variable, [3.0 - 0.6, 4.0 - 0.8], rtol=1e-6)


def test_loss_scale_optimizer():
  optimizer = tf.keras.mixed_precision.LossScaleOptimizer(
      optimization.build_training_optimizer(_schedule(), momentum=0.0))
  variable = tf.Variable([1.0, -2.0])

  @tf.function
  def step():
    with tf.GradientTape() as tape:
      loss = optimizer.get_scaled_loss(_quadratic(variable))
    grads = optimizer.get_unscaled_gradients(tape.gradient(loss, [variable]))
    optimizer.apply_gradients(zip(grads, [variable]))

  step()
  np.testing.assert_allclose(variable, [1.0 - 0.1, -2.0 + 0.2], rtol=1e-6)


@pytest.mark.parametrize("name", ["lars", "lamb"])
def test_large_batch_optimizers(name):
  optimizer = optimization.build_training_optimizer(_schedule(),
                                                    optimizer=name)
  variable = tf.Variable([1.0, -2.0])
  _train(optimizer, variable, 2, _quadratic)
  # Both shrink a quadratic's weights towards 0 without overshooting here.
  shrunk = np.abs(variable.numpy()) / [1.0, 2.0]
  assert np.all((shrunk >= 0.0) & (shrunk <= 0.9999)), shrunk
  assert int(optimizer.iterations) == 2


def test_invalid_arguments():
  with pytest.raises(ValueError, match="optimizer must be one of"):
    optimization.build_training_optimizer(0.1, optimizer="adam")
  with pytest.raises(ValueError, match="at most one of"):
    optimization.build_training_optimizer(0.1, clipnorm=1.0,
                                          global_clipnorm=1.0)
