r"""The floor under a detector training step: the kernels its work requires.

  python benchmarks/detector_step_floor.py [--setting r50_256]
      [--precision mixed_bfloat16] [--rounds 3] [--steps 3]

Builds our detector and Model Garden's as benchmarks/detector_step.py does
(its helpers and flags: the same work on one CPU replica), then reads from
each traced training loop the ops of one step that any implementation of
that work runs:

  gemm        convolutions and matmuls: forward, input and kernel gradients;
  batch_norm  the batch norms' training kernels, forward and gradient;
  optimizer   the momentum update of every variable;

as autodiff and the optimizer wrote them (ops whose results nothing reads
are left out: TensorFlow prunes them). Those ops alone, with their
attributes, on random inputs of their shapes (fresh variables for the
update), make a `tf.function` that TensorFlow rewrites to oneDNN's kernels
as it does the step's. It runs them in two schedules: in the step's order,
one after another, each op with every core; and in any order, as the
executor likes (no op waits for another; its choices vary from trace to
trace). The faster is the floor: an implementation of the same work on
TensorFlow's kernels runs at least these, however little the rest of its
step (activations, RoI ops, losses, casts) costs. Each group alone and all
three, in both schedules, and the full step are timed in alternating rounds.

A JSON line per detector gives its op counts, the GEMMs' multiply-adds
(`gmacs`, forward and backward: equal when the work is), each group's time
alone (`gemm_s`, `batch_norm_s`, `optimizer_s`; the faster schedule's), the
floor (`floor_s`) and the step (`step_s`). The last line is `speedup_bound: X`,
Model Garden's step over our floor: the speedup over Model Garden that ours
would have if everything but those kernels were free.
"""
import json
import math
import os
import statistics
import tempfile

from absl import app
from absl import flags

import detector_step  # pylint: disable=g-bad-import-order  # benchmarks/

FLAGS = flags.FLAGS
FLAGS.set_default("setting", "r50_256")
FLAGS.set_default("precision", "mixed_bfloat16")

FLOOR_OPS = {
    "gemm": ("Conv2D", "Conv2DBackpropInput", "Conv2DBackpropFilter",
             "MatMul", "BatchMatMulV2"),
    "batch_norm": ("FusedBatchNormV3", "FusedBatchNormGradV3"),
    "optimizer": ("ResourceApplyKerasMomentum",),
}


def _called_graphs(graph, op):
  """Graphs of the functions `op` runs every time: loop bodies and calls."""
  for attr in ("body", "f"):
    try:
      name = op.get_attr(attr).name
    except ValueError:
      continue
    outer = graph
    while outer is not None:
      function = outer._get_function(name)  # pylint: disable=protected-access
      if function is not None:
        yield function.graph
        break
      outer = getattr(outer, "outer_graph", None)


def step_ops(graph, types):
  """The ops of `types` that `graph` runs and whose results are read."""
  ops = []
  for op in graph.get_operations():
    for called in _called_graphs(graph, op):
      ops += step_ops(called, types)
    if op.type in types and (op.type.startswith("Resource") or
                             any(out.consumers() for out in op.outputs)):
      ops.append(op)
  return ops


def multiply_adds(op) -> int:
  """Multiply-adds of one GEMM op, from its static shapes."""
  shapes = [t.shape for t in op.inputs] + [op.outputs[0].shape]
  if not all(s.is_fully_defined() for s in shapes):
    raise ValueError(f"{op.name} ({op.type}) has unknown shapes {shapes}")
  if op.type.startswith("Conv2D"):
    # The forward conv's output, and its filter [kh, kw, c_in, c_out].
    conv_output = shapes[-1] if op.type == "Conv2D" else shapes[2]
    conv_filter = shapes[-1] if op.type == "Conv2DBackpropFilter" else shapes[1]
    return math.prod(conv_output) * math.prod(conv_filter[:3])
  if op.type == "MatMul":
    columns = shapes[1][0] if op.get_attr("transpose_b") else shapes[1][1]
    return math.prod(shapes[0]) * columns
  columns = shapes[1][-2] if op.get_attr("adj_y") else shapes[1][-1]
  return math.prod(shapes[0]) * columns  # BatchMatMulV2.


def replay(ops, in_order=False):
  """`run()`: the `ops` alone, on random inputs, once per step.

  Args:
    ops: the ops, in the step's graph order.
    in_order: run them one after another in that order, each with every
      core (else TensorFlow runs any of them at any time).
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  random = {}  # One random tensor per shape and dtype.
  calls, inputs = [], []
  for op in ops:
    by_name = dict(zip((arg.name for arg in op.op_def.input_arg), op.inputs))
    arguments = []
    for name, tensor in by_name.items():
      if tensor.dtype == tf.resource:  # A variable or its slot: grad-shaped.
        grad = by_name["grad"]
        arguments.append((name, tf.Variable(tf.zeros(grad.shape, grad.dtype))))
      elif tensor.dtype.is_integer:  # input_sizes/filter_sizes: the output's.
        arguments.append((name, op.outputs[0].shape.as_list()))
      else:
        # The forward batch norm's sixth output, unused and empty on CPUs.
        shape = [0] if name == "reserve_space_3" else tensor.shape
        key = (tuple(shape), tensor.dtype)
        if key not in random:
          random[key] = tf.cast(tf.random.normal(shape), tensor.dtype)
        arguments.append((name, len(inputs)))
        inputs.append(random[key])
    attrs = {a.name: op.get_attr(a.name) for a in op.op_def.attr
             if a.type != "type"}
    calls.append((getattr(tf.raw_ops, op.type), arguments, attrs))

  @tf.function
  def run_ops(*tensors):
    def value(argument):  # An input's index, a variable or a shape.
      if isinstance(argument, int):
        return tensors[argument]
      return argument.handle if isinstance(argument, tf.Variable) else argument

    results = []
    for raw_op, arguments, attrs in calls:
      with tf.control_dependencies(results[-1:] if in_order else []):
        results.append(raw_op(**{name: value(argument)
                                 for name, argument in arguments}, **attrs))
    # Updates return no tensor; tf.function runs them as stateful ops.
    return [r for r in results if not isinstance(r, tf.Operation)]

  run_ops(*inputs)  # Traces.
  return lambda: [run_ops(*inputs) for _ in range(FLAGS.steps)]


def main(argv):
  del argv
  os.chdir(detector_step.REPO)
  from megdet_tf.dataloaders import prepare_shapes  # pylint: disable=g-import-not-at-top
  model_file, size, overrides = detector_step.SETTINGS[FLAGS.setting]
  with tempfile.TemporaryDirectory() as tmp:
    FLAGS.data_dir = prepare_shapes.prepare_shapes_dataset(
        os.path.join(tmp, "data"), num_train=64, num_val=4, image_size=size)
    detectors = {
        "ours": detector_step.build_ours(model_file, size,
                                         os.path.join(tmp, "model")),
        "model_garden": detector_step.build_model_garden(size, overrides)}
    records, runs = {}, {}
    for name, detector in detectors.items():
      floor_ops = step_ops(detector.graph, sum(FLOOR_OPS.values(), ()))
      ops = {group: [op for op in floor_ops if op.type in types]
             for group, types in FLOOR_OPS.items()}
      ops["floor"] = floor_ops
      records[name] = {
          "benchmark": "detector_step_floor", "detector": name,
          "setting": FLAGS.setting, "precision": FLAGS.precision,
          "batch": FLAGS.batch,
          **{f"{group}_ops": len(ops[group]) for group in FLOOR_OPS},
          "gmacs": round(sum(map(multiply_adds, ops["gemm"])) / 1e9, 2)}
      runs[name] = {(group, in_order): replay(group_ops, in_order)
                    for group, group_ops in ops.items()
                    for in_order in (True, False)}
      runs[name]["step"] = detector.run
    times = {(name, kind): [] for name in runs for kind in runs[name]}
    for _ in range(FLAGS.rounds):
      for name in runs:
        for kind, run in runs[name].items():
          times[name, kind].append(detector_step._timed_round(run)[0])  # pylint: disable=protected-access
  median = {key: statistics.median(values) for key, values in times.items()}
  for name, record in records.items():
    for group in [*FLOOR_OPS, "floor"]:  # The faster schedule.
      median[name, group] = min(median[name, (group, True)],
                                median[name, (group, False)])
    record.update({f"{kind}_s": round(median[name, kind], 3)
                   for kind in [*FLOOR_OPS, "floor", "step"]})
    print(json.dumps(record), flush=True)
  bound = median["model_garden", "step"] / median["ours", "floor"]
  print(f"speedup_bound: {bound:.3f}", flush=True)
  os._exit(0)  # pylint: disable=protected-access  # Skip graph teardown.


if __name__ == "__main__":
  app.run(main)
