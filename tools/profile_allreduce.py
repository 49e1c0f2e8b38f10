r"""What gradient all-reduce and cross-replica BN cost, per CGBN group size.

  python tools/profile_allreduce.py --gin_file=gin/demo.gin \
      --group_sizes=1,2,4 --output_dir=runs/allreduce

For each group size K (`build_norm.group_size=K`) a fresh process
(tools/profile_allreduce_worker.py) builds the trainer as tools/train.py
does, trains `--warmup_steps` steps (the first one traces the loop) and
profiles `--profile_steps` more with `ProfileWindow`. The captured trace is
read back with xprof's converter (`megdet_tf.training.allreduce_report`):
per step, wall time, time with at least one collective in flight, the shares
of CGBN and of the gradient all-reduce in it, and the number of collectives
and bytes per replica.

Output: a Markdown table on stdout, the same table as TensorBoard text in
output_dir, each setting's figures as TensorBoard scalars (`allreduce/*`)
beside its profile in output_dir/group_size_K (replaced on every run), and
output_dir/allreduce_report.json. Group sizes that do not divide the number
of replicas are skipped. Needs the `profile` extra (xprof). On logical CPU
replicas, CGBN groups of one process share their statistics inside the
traced graph, with no collective to profile; add
`--gin_param="build_norm.exchange='collective'"` to profile the collectives
that GPUs run.
"""
import json
import os
import shutil
import subprocess
import sys

from absl import app
from absl import flags
from absl import logging

import megdet_tf  # noqa: F401  pylint: disable=unused-import
from megdet_tf import result_line
from megdet_tf.training import allreduce_report

flags.DEFINE_multi_string("gin_file", [], "Gin config files (repeatable).")
flags.DEFINE_multi_string("gin_param", [], "Gin bindings (repeatable).")
flags.DEFINE_list("group_sizes", ["1", "2", "4", "8"],
                  "CGBN group sizes (replicas per BN group) to profile.")
flags.DEFINE_string("output_dir", "runs/allreduce",
                    "Reports and one run directory per group size.")
flags.DEFINE_integer("warmup_steps", 2,
                     "Steps before the profile (the first one traces).")
flags.DEFINE_integer("profile_steps", 5, "Profiled steps per setting.")
FLAGS = flags.FLAGS

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                      "profile_allreduce_worker.py")


def profile_setting(group_size: int) -> dict:
  """Runs the worker for one group size; returns its report."""
  run_dir = os.path.join(FLAGS.output_dir, f"group_size_{group_size}")
  shutil.rmtree(run_dir, ignore_errors=True)  # A fresh run, not a resume.
  os.makedirs(run_dir)
  log_path = os.path.join(run_dir, "worker.log")
  first = FLAGS.warmup_steps + 1
  setting = {"run_dir": run_dir, "group_size": group_size,
             "profile_steps": [first, first + FLAGS.profile_steps - 1],
             "gin_files": FLAGS.gin_file, "gin_params": FLAGS.gin_param}
  logging.info("Profiling group size %d (log: %s)", group_size, log_path)
  with open(log_path, "w") as log:
    process = subprocess.run([sys.executable, WORKER, json.dumps(setting)],
                             stdout=subprocess.PIPE, stderr=log, text=True,
                             check=False)
  result = result_line.read_result(process.stdout)
  if process.returncode or result is None:
    with open(log_path) as log:
      raise RuntimeError(f"Profiling group size {group_size} failed (exit "
                         f"{process.returncode}); end of {log_path}:\n"
                         f"{log.read()[-3000:]}")
  return result


def main(argv):
  del argv
  if FLAGS.warmup_steps < 1 or FLAGS.profile_steps < 1:
    raise app.UsageError("--warmup_steps and --profile_steps must be >= 1 "
                         "(the first step traces the loop).")
  rows = []
  for group_size in (int(k) for k in FLAGS.group_sizes):
    row = profile_setting(group_size)
    if "skipped" in row:
      logging.warning("Skipped: %s", row["skipped"])
    else:
      rows.append(row)
  table = allreduce_report.format_table(rows)
  print(table)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  with tf.summary.create_file_writer(FLAGS.output_dir).as_default(step=0):
    tf.summary.text("allreduce/report", table)
  with open(os.path.join(FLAGS.output_dir, "allreduce_report.json"), "w") as f:
    json.dump({"command": sys.argv, "settings": rows}, f, indent=1)


if __name__ == "__main__":
  app.run(main)
