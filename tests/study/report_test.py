"""The study's tables from run records: outcomes, seeds, realisations."""
import json
import os

import pytest

from megdet_tf.study import grid
from megdet_tf.study import report


def _record(run, status="converged", ap=0.5, failed_step=None, attempts=1):
  per_epoch = 4608 // run.batch
  realised = run.realise()
  history = [dict(step=11 * per_epoch, epoch=11.0, AP=ap, AP50=ap + 0.2)]
  record = dict(
      name=run.name, spec=dict(batch=run.batch, bn_size=run.bn_size,
                               peak_scale=run.peak_scale, seed=run.seed,
                               policy=run.policy),
      realisation=realised, status=status, wall_seconds=600.0,
      attempts=attempts,
      commit="a" * 40, modified=False, machine="test CPU, 2 cores",
      loss_curve=[[1, 2.0], [per_epoch, 1.0]],
      schedule=dict(steps_per_epoch=per_epoch, total_steps=11 * per_epoch,
                    peak_learning_rate=0.02 * run.batch / 16 * run.peak_scale,
                    warmup_steps=per_epoch // 2,
                    boundaries=[8 * per_epoch, 10 * per_epoch]),
      eval_history=history if status == "converged" else [])
  if status == "converged":
    record["metrics"] = history[-1]
  else:
    record["failed_step"] = failed_step
  return record


@pytest.fixture
def output_dir(tmp_path):
  records = [
      _record(grid.Run(16, 0), ap=0.40),
      _record(grid.Run(64, 0, seed=0), "failed", failed_step=40),
      _record(grid.Run(64, 0, seed=1), ap=0.30),
      # The seeds disagree, so the grid added seed 2: Table 2's alone.
      _record(grid.Run(64, 0, seed=2), "failed", failed_step=30),
      _record(grid.Run(16, 8), ap=0.45, attempts=3),  # Resumed twice.
      _record(grid.Run(256, 32), ap=0.47),
  ]
  os.makedirs(tmp_path / "records")
  for record in records:
    with open(tmp_path / "records" / f"{record['name']}.json", "w") as f:
      json.dump(record, f)
  return tmp_path


def test_tables_show_outcomes_seeds_and_realisations(output_dir):
  written = report.write_report(str(output_dir), grid.STUDIES)
  assert sorted(os.path.basename(p) for p in written) == sorted(
      f"{s}.{e}" for s in grid.STUDIES for e in ("md", "png"))
  table2 = (output_dir / "table2.md").read_text()
  assert ("| 64 | linearly scaled | 0.08 | 36 | 0, 1, 2 | 1/3 converged; "
          "seed 0 failed at step 40 of 792; seed 2 failed at step 30 of 792 "
          "| – / 0.300 / – |") in table2
  assert "Runs: 4, trained at commit" in table2
  assert "| 16 | linearly scaled | 0.02 | 144 | 0 | 1/1 converged |" in table2
  table3 = (output_dir / "table3.md").read_text()
  assert ("| 16 | 8 | 8 x 2, groups of 4 | 0.02 | 0.450 | 0.650 | "
          "10.0 min (3 attempts) |") in table3
  assert "| 256 | 32 | 8 x 32, groups of 1 | 0.32 | 0.470 |" in table3
  hours = report.projected_hours()  # benchmarks/results.json's model.
  assert f"| 10.0 min | {hours[256]:.1f} h on 128 GPUs |" in table3
  assert ("Runs: 3, trained at commit aaaaaaaaaa on test CPU, 2 cores"
          in table3)
  assert "No run recorded yet." in (output_dir / "fig4.md").read_text()


def test_report_is_reproducible_from_the_records(output_dir):
  report.write_report(str(output_dir), grid.STUDIES)
  first = {p.name: p.read_bytes() for p in output_dir.iterdir()
           if p.is_file()}
  report.write_report(str(output_dir), grid.STUDIES)
  assert first == {p.name: p.read_bytes() for p in output_dir.iterdir()
                   if p.is_file()}
