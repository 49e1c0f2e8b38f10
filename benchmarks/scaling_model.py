r"""A model, not a measurement: MegDet's step time and scaling on 8-128 GPUs.

  python benchmarks/scaling_model.py [--gin_file=gin/megdet_bs256.gin]

Predicts the training time of the paper's detector, data parallel at
`--images_per_gpu` images per GPU on machines of `--gpus_per_machine` GPUs,
cross-GPU BN inside each machine:

  T(N) = T_compute + T_grad(N) + T_cgbn                 (seconds per step)

- T_compute: one GPU's forward and backward pass on its images, the same for
  every N. A CPU cannot measure a GPU's, so it is calibrated on the paper's
  baseline (8 GPUs, batch 16, frozen BN: 33.2 h for the normal schedule):
  T_compute = 33.2 h / steps - T_grad(8). `--compute_seconds` sets it.
- T_grad(N): one ring all-reduce of the gradients per step, after the
  backward pass (our trainer does not overlap it with computation):
  latency + 2 (N-1)/N S / B. S is the bytes of the detector's trainable
  variables as built from the Gin files (the `gradient_bytes`
  tools/profile_allreduce.py measures); B is NCCL's bus bandwidth over
  NVLink inside one machine, over the network once the ring spans machines.
- T_cgbn: per trainable CGBN layer (frozen stages use moving statistics), a
  forward all-gather of the group's [G, 3C] float32 rows and a backward
  all-reduce of [2C] float32, inside one machine (G GPUs):
  2 latencies + (G-1)/G (12 G C + 2 * 8 C) / B_nvlink.

Assumptions, all flags: NVLink 130 GB/s (nccl-tests all_reduce bus bandwidth
of an 8 x V100 DGX-1), network 11 GB/s (one 100 Gb/s InfiniBand EDR port per
machine), 20 us per collective inside a machine and 50 us across machines,
perfect load balance, an input pipeline that never waits, and the step
counts of gin/schedule/normal.gin. Prints a Markdown table, then one JSON
line per GPU count.
"""
import json
import os

from absl import app
from absl import flags
import gin

import megdet_tf  # noqa: F401  pylint: disable=unused-import
from megdet_tf.dataloaders.category_map import CategoryMap
from megdet_tf.modeling import faster_rcnn
from megdet_tf.modeling.layers import cross_replica_batch_norm
from megdet_tf.optimization import lr_schedule
from megdet_tf.training import strategy  # noqa: F401  pylint: disable=unused-import
from megdet_tf.training import trainer  # noqa: F401  pylint: disable=unused-import

flags.DEFINE_multi_string("gin_file", ["gin/megdet_bs256.gin"],
                          "Gin files of the detector and schedule.")
flags.DEFINE_multi_string("gin_param", [], "Gin bindings.")
flags.DEFINE_list("gpus", ["8", "16", "32", "64", "128", "256"],
                  "GPU counts.")
flags.DEFINE_integer("images_per_gpu", 2, "Images per GPU and step.")
flags.DEFINE_integer("gpus_per_machine", 8, "GPUs per machine = CGBN group.")
flags.DEFINE_float("nvlink_gb_per_s", 130.0,
                   "NCCL all-reduce bus bandwidth inside a machine, GB/s.")
flags.DEFINE_float("network_gb_per_s", 11.0,
                   "NCCL all-reduce bus bandwidth across machines, GB/s.")
flags.DEFINE_float("machine_latency_us", 20.0,
                   "Latency of one collective inside a machine.")
flags.DEFINE_float("network_latency_us", 50.0,
                   "Latency of one collective across machines.")
flags.DEFINE_float("compute_seconds", None,
                   "Per-step compute; default: calibrated on the paper.")
FLAGS = flags.FLAGS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The paper's Table 3: (GPUs, batch, hours).
PAPER_BASELINE = (8, 16, 33.2)  # Frozen BN.
PAPER_MEGDET = (128, 256, 4.1)  # CGBN.


def detector_collectives():
  """(gradient bytes, widths of the trainable CGBN layers) from Gin."""
  model = faster_rcnn.build_faster_rcnn(num_classes=CategoryMap().num_classes)
  widths = [layer.moving_mean.shape[0] for layer in model.submodules
            if isinstance(layer, cross_replica_batch_norm
                          .CrossReplicaBatchNormalization) and layer.trainable]
  gradient_bytes = sum(v.shape.num_elements() * v.dtype.size
                       for v in model.trainable_variables)
  return gradient_bytes, widths


def allreduce_seconds(num_bytes, gpus):
  """Ring all-reduce time of `num_bytes` over `gpus` GPUs."""
  if gpus == 1:
    return 0.0
  if gpus <= FLAGS.gpus_per_machine:
    latency, bandwidth = FLAGS.machine_latency_us, FLAGS.nvlink_gb_per_s
  else:
    latency, bandwidth = FLAGS.network_latency_us, FLAGS.network_gb_per_s
  return latency * 1e-6 + 2 * (gpus - 1) / gpus * num_bytes / (bandwidth * 1e9)


def cgbn_seconds(widths, group):
  """Forward all-gather + backward all-reduce of every CGBN layer."""
  if group == 1:
    return 0.0
  moved = (group - 1) / group * sum(12 * group * c + 2 * 8 * c
                                    for c in widths)
  return (2 * len(widths) * FLAGS.machine_latency_us * 1e-6 +
          moved / (FLAGS.nvlink_gb_per_s * 1e9))


def total_steps(batch):
  return lr_schedule.build_lr_schedule(global_batch_size=batch).total_steps


def predict(gradient_bytes, widths):
  """One row per GPU count, plus the calibrated compute time."""
  gpus, batch, hours = PAPER_BASELINE
  compute = FLAGS.compute_seconds
  if compute is None:
    compute = (hours * 3600 / total_steps(batch) -
               allreduce_seconds(gradient_bytes, gpus))
  rows = []
  for n in (int(g) for g in FLAGS.gpus):
    group = min(n, FLAGS.gpus_per_machine)
    grad = allreduce_seconds(gradient_bytes, n)
    cgbn = cgbn_seconds(widths, group)
    step = compute + grad + cgbn
    rows.append({
        "benchmark": "scaling_model", "gpus": n,
        "batch": n * FLAGS.images_per_gpu,
        "bn_size": group * FLAGS.images_per_gpu,
        "step_s": round(step, 4), "compute_s": round(compute, 4),
        "grad_allreduce_ms": round(grad * 1e3, 2),
        "cgbn_ms": round(cgbn * 1e3, 2),
        "hours": round(
            total_steps(n * FLAGS.images_per_gpu) * step / 3600, 2)})
  for row in rows:
    row["efficiency"] = round(rows[0]["step_s"] / row["step_s"], 3)
  return rows


def paper_comparison(rows):
  """What the paper's 4.1 h implies against the model's 128-GPU row."""
  gpus, batch, hours = PAPER_MEGDET
  base_gpus, _, base_hours = PAPER_BASELINE
  paper_step = hours * 3600 / total_steps(batch)
  speedup = base_hours / hours
  lines = [f"Paper: {base_hours} h on {base_gpus} GPUs -> {hours} h on "
           f"{gpus} GPUs: {speedup:.1f}x on {gpus // base_gpus}x the GPUs, "
           f"{speedup / (gpus / base_gpus):.0%} efficiency, "
           f"{paper_step:.2f} s per step."]
  row = next((r for r in rows if r["gpus"] == gpus), None)
  if row:
    gradient_seconds = paper_step - row["compute_s"] - row["cgbn_ms"] / 1e3
    bus_bytes = 2 * (gpus - 1) / gpus * row["gradient_bytes"]
    lines.append(
        f"Model at {gpus} GPUs: {row['hours']} h, {row['step_s']:.2f} s per "
        f"step. The paper's system spent {paper_step - row['step_s']:.2f} s "
        "more per step than these collectives explain, as if its gradient "
        f"all-reduce ran at {bus_bytes / gradient_seconds / 1e9:.2f} GB/s.")
  return lines


def markdown(rows):
  header = ("| GPUs | batch | BN size | step s | grad all-reduce ms | CGBN ms "
            f"| efficiency vs {rows[0]['gpus']} GPUs | hours (model) |\n"
            "|---:|---:|---:|---:|---:|---:|---:|---:|")
  return "\n".join([header] + [
      f"| {r['gpus']} | {r['batch']} | {r['bn_size']} | {r['step_s']:.3f} | "
      f"{r['grad_allreduce_ms']:.1f} | {r['cgbn_ms']:.1f} | "
      f"{r['efficiency']:.0%} | {r['hours']:.1f} |" for r in rows])


def main(argv):
  del argv
  gin.add_config_file_search_path(REPO)
  gin.parse_config_files_and_bindings(FLAGS.gin_file, FLAGS.gin_param)
  gradient_bytes, widths = detector_collectives()
  rows = [dict(row, gradient_bytes=gradient_bytes, cgbn_layers=len(widths))
          for row in predict(gradient_bytes, widths)]
  print(f"Gradients: {gradient_bytes / 2**20:.1f} MiB; {len(widths)} CGBN "
        f"layers, {sum(widths)} channels.")
  print(markdown(rows))
  print("\n".join(paper_comparison(rows)))
  for row in rows:
    print(json.dumps(row))


if __name__ == "__main__":
  app.run(main)
