r"""The paper's experiments at small scale: Table 2, Table 3 and Figure 4.

  python tools/study.py --study=all --output_dir=docs/study \
      --work_dir=runs/study
  python tools/study.py --study=all --output_dir=docs/study --report_only

Pretrains a backbone once, then trains every run of the chosen studies with
`tools/train.py` on 8 logical CPU replicas (see megdet_tf/study/grid.py),
writes a JSON record per run to `<output_dir>/records/` and, from the records
alone, `<study>.md` tables and `<study>.png` figures. Run it again to resume:
recorded runs are skipped, an interrupted run continues from its checkpoint
in `--work_dir`. `--dry_run` prints the plan (realisation, rates, steps).
"""
import re
import sys

from absl import app
from absl import flags

import megdet_tf  # noqa: F401  pylint: disable=unused-import
from megdet_tf.study import grid
from megdet_tf.study import report
from megdet_tf.study import runner as runner_lib

flags.DEFINE_enum("study", "all", grid.STUDIES + ("all",), "What to run.")
flags.DEFINE_string("output_dir", "docs/study",
                    "Run records, tables and figures.")
flags.DEFINE_string("work_dir", None, "Checkpoints, logs and generated data "
                    "(default: <output_dir>/work).")
flags.DEFINE_bool("report_only", False,
                  "Only rewrite the tables and figures from the records.")
flags.DEFINE_bool("dry_run", False, "Print the plan; train nothing.")
flags.DEFINE_bool("retry_errors", False,
                  "Train again the runs recorded as `error`.")
flags.DEFINE_string("only", None,
                    "Regular expression: train only the runs it matches.")
flags.DEFINE_integer("replicas", grid.REPLICAS,
                     "Logical CPU replicas of a run that does not set them.")
flags.DEFINE_multi_string("gin_param", [],
                          "Gin bindings added to every run (repeatable).")
FLAGS = flags.FLAGS


def _selected_runs(studies):
  runs = {}
  for study in studies:
    for run in grid.study_runs(study):
      if FLAGS.only is None or re.search(FLAGS.only, run.name):
        runs.setdefault(run.name, run)
  return list(runs.values())


def main(argv):
  del argv
  studies = grid.STUDIES if FLAGS.study == "all" else (FLAGS.study,)
  if not FLAGS.report_only:
    runner = runner_lib.StudyRunner(
        FLAGS.output_dir, FLAGS.work_dir or f"{FLAGS.output_dir}/work",
        FLAGS.gin_param, FLAGS.replicas)
    runs = _selected_runs(studies)
    if FLAGS.dry_run:
      for plan in [runner.plan(None)] + [runner.plan(r) for r in runs]:
        print(plan.name, plan.realisation, plan.schedule)
      return
    finished = runner_lib.train_grid(
        runner, runs, add_table2_seeds="table2" in studies and not FLAGS.only,
        retry_errors=FLAGS.retry_errors)
    if not finished:
      sys.exit(1)
  for path in report.write_report(FLAGS.output_dir, studies):
    print(f"wrote {path}")


if __name__ == "__main__":
  app.run(main)
