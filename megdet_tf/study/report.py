"""The study's tables and figures, made from its run records alone.

`write_report(output_dir, studies)` reads `<output_dir>/records/*.json` and
writes `<study>.md` and `<study>.png` for each study, so a user re-plots
without retraining (`tools/study.py --report_only`). The projected GPU hours
come from the scaling model's recorded rows in `benchmarks/results.json`.
"""
import collections
import glob
import json
import os
from typing import Dict, List, Sequence

import matplotlib
import matplotlib.ticker
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from megdet_tf.study import grid  # noqa: E402
from megdet_tf.study import runner as runner_lib  # noqa: E402

SCALING_MODEL = os.path.join(runner_lib.REPO_ROOT, "benchmarks",
                             "results.json")
_TITLES = {
    "table2": "Table 2 at small scale: BN frozen, linear scaling + warmup",
    "table3": "Table 3 at small scale: cross-replica BN (CGBN)",
    "fig4": ("Figure 4 at small scale: AP per epoch, long policy, norm in "
             "the FPN and heads too"),
    "ablation": "Beyond the paper: what large batches lack at this scale",
}


def load_records(output_dir: str) -> Dict[str, dict]:
  records = {}
  for path in sorted(glob.glob(os.path.join(output_dir, "records", "*.json"))):
    with open(path) as f:
      record = json.load(f)
    records[record["name"]] = record
  return records


def projected_hours() -> Dict[int, float]:
  """Batch -> hours of the paper's R50-FPN at 2 images per GPU (the model)."""
  if not os.path.exists(SCALING_MODEL):
    return {}
  with open(SCALING_MODEL) as f:
    rows = json.load(f).get("scaling_model", {}).get("figures", [])
  return {row["batch"]: row["hours"] for row in rows}


def _wall_time(record: dict) -> str:
  """Minutes, and the number of attempts when interruptions split the run."""
  attempts = record.get("attempts", 1)
  return f"{record['wall_seconds'] / 60:.1f} min" + (
      f" ({attempts} attempts)" if attempts > 1 else "")


def _ap(record: dict, key: str = "AP") -> str:
  metrics = record.get("metrics")
  return f"{metrics[key]:.3f}" if metrics else "–"


def _outcome(record: dict) -> str:
  if record["status"] == "failed":
    return (f"failed at step {record['failed_step']} of "
            f"{record['schedule']['total_steps']}")
  return record["status"]


def _provenance(records: Sequence[dict]) -> str:
  commits = collections.Counter(
      r["commit"][:10] + (" (modified)" if r["modified"] else "")
      for r in records)
  machines = sorted({r["machine"] for r in records})
  return (f"Runs: {len(records)}, trained at commit "
          + ", ".join(f"{c} ({n})" if len(commits) > 1 else c
                      for c, n in sorted(commits.items()))
          + f" on {'; '.join(machines)}.")


def _realised(record: dict) -> str:
  realised = record["realisation"]
  groups = realised["group_size"]
  return (f"{realised['replicas']} x {realised['per_replica']}"
          + (f", groups of {groups}" if groups else ""))


def _rows(records: Dict[str, dict], runs: List[grid.Run]) -> List[dict]:
  return [records[r.name] for r in runs if r.name in records]


def _runs_of(study: str, records: Dict[str, dict]) -> List[grid.Run]:
  """The study's runs; for Table 2, with the extra seeds its records call for."""
  runs = grid.study_runs(study)
  if study != "table2":
    return runs
  return runs + grid.table2_extra_seeds(
      {n: r["status"] for n, r in records.items()})


def _table2(records: Dict[str, dict]) -> List[str]:
  runs = _runs_of("table2", records)
  by_row = collections.defaultdict(list)
  for record in _rows(records, runs):
    spec = record["spec"]
    by_row[(spec["batch"], spec["peak_scale"])].append(record)
  lines = ["| batch | LR | peak LR | warmup steps | seeds | outcome | AP | "
           "AP50 | wall time |", "|---:|---|---:|---:|---|---|---|---|---|"]
  for (batch, scale), rows in sorted(by_row.items()):
    first = rows[0]["schedule"]
    converged = sum(r["status"] == "converged" for r in rows)
    lines.append(
        f"| {batch} | {'half of ' if scale != 1 else ''}linearly scaled | "
        f"{first['peak_learning_rate']:g} | {first['warmup_steps']} | "
        f"{', '.join(str(r['spec']['seed']) for r in rows)} | "
        f"{converged}/{len(rows)} converged"
        + "".join(f"; seed {r['spec']['seed']} {_outcome(r)}" for r in rows
                  if r["status"] != "converged") + " | "
        + " / ".join(_ap(r) for r in rows) + " | "
        + " / ".join(_ap(r, "AP50") for r in rows) + " | "
        + " / ".join(_wall_time(r) for r in rows) + " |")
  return lines


def _table3(records: Dict[str, dict]) -> List[str]:
  hours = projected_hours()
  lines = ["| batch | BN size | realised as (replicas x images, group) | "
           "peak LR | AP | AP50 | wall time | projected GPU time, paper's "
           "R50-FPN |", "|---:|---:|---|---:|---|---|---|---|"]
  for record in _rows(records, grid.study_runs("table3")):
    spec = record["spec"]
    bn = spec["bn_size"] or "0 (frozen)"
    beyond = " (beyond the paper)" if spec["batch"] > 256 else ""
    projected = (f"{hours[spec['batch']]:.1f} h on {spec['batch'] // 2} GPUs"
                 if spec["batch"] in hours else "–")
    ap = _ap(record) if record["status"] == "converged" else _outcome(record)
    lines.append(
        f"| {spec['batch']}{beyond} | {bn} | {_realised(record)} | "
        f"{record['schedule']['peak_learning_rate']:g} | {ap} | "
        f"{_ap(record, 'AP50')} | {_wall_time(record)} | "
        f"{projected} |")
  return lines


def _ablation(records: Dict[str, dict]) -> List[str]:
  lines = ["| batch | BN size | norm in FPN and heads | peak LR | warmup steps "
           "| AP | AP50 | wall time |", "|---:|---:|---|---:|---:|---|---|---|"]
  for record in _rows(records, grid.study_runs("ablation")):
    spec, schedule = record["spec"], record["schedule"]
    ap = _ap(record) if record["status"] == "converged" else _outcome(record)
    lines.append(
        f"| {spec['batch']} | {spec['bn_size']} | "
        f"{'yes' if spec.get('norm_in_heads') else 'no'} | "
        f"{schedule['peak_learning_rate']:g} | {schedule['warmup_steps']} | "
        f"{ap} | {_ap(record, 'AP50')} | "
        f"{_wall_time(record)} |")
  return lines


def _fig4(records: Dict[str, dict]) -> List[str]:
  rows = _rows(records, grid.study_runs("fig4"))
  header = "| epoch | " + " | ".join(
      f"AP, batch {r['spec']['batch']} (BN {r['spec']['bn_size']})"
      for r in rows) + " |"
  lines = [header, "|---:|" + "---|" * len(rows)]
  epochs = sorted({round(e["epoch"]) for r in rows for e in r["eval_history"]})
  for epoch in epochs:
    cells = []
    for record in rows:
      ap = [e["AP"] for e in record["eval_history"]
            if round(e["epoch"]) == epoch]
      cells.append(f"{ap[-1]:.3f}" if ap else "–")
    lines.append(f"| {epoch} | " + " | ".join(cells) + " |")
  return lines


def _epochs(record: dict, points: List[List[float]]) -> List[float]:
  per_epoch = record["schedule"]["steps_per_epoch"]
  return [p[0] / per_epoch for p in points]


def _plot_losses(records: Dict[str, dict], runs: List[grid.Run], ax,
                 title: str):
  for record in _rows(records, runs):
    curve = record["loss_curve"]
    if not curve:
      continue
    line, = ax.plot(_epochs(record, curve), [p[1] for p in curve],
                    lw=1, label=record["name"])
    if record["status"] == "failed":
      ax.plot(_epochs(record, curve[-1:]), [curve[-1][1]], "x",
              color=line.get_color(), ms=8)
  ax.set(yscale="log", xlabel="epoch", ylabel="training loss", title=title)
  if ax.lines:
    ax.legend(fontsize=6, ncol=2)


def _plot_table2(records: Dict[str, dict], ax):
  _plot_losses(records, _runs_of("table2", records), ax,
               "BN frozen: training loss (x = divergence stop)")


def _plot_ablation(records: Dict[str, dict], ax):
  _plot_losses(records, grid.study_runs("ablation"), ax,
               "Training loss (x = divergence stop)")


def _plot_batches(ax, series: Dict[str, List[dict]]):
  """AP against batch per series; a diverged run is an x on the floor."""
  aps = [r["metrics"]["AP"] for rows in series.values() for r in rows
         if r.get("metrics")]
  floor = min(aps, default=0.5) - 0.05
  for (label, rows), marker in zip(series.items(), "os^"):
    rows = sorted(rows, key=lambda r: r["spec"]["batch"])
    converged = [r for r in rows if r.get("metrics")]
    line, = ax.plot([r["spec"]["batch"] for r in converged],
                    [r["metrics"]["AP"] for r in converged], marker + "-",
                    label=label)
    failed = [r["spec"]["batch"] for r in rows if r["status"] == "failed"]
    ax.plot(failed, [floor] * len(failed), "x", color=line.get_color(),
            ms=9, mew=2)
  ax.set(xscale="log", xlabel="batch", ylabel="val AP (x = diverged)",
         title="Linear scaling + warmup", ylim=(floor - 0.02, None))
  ax.set_xticks([16, 32, 64, 128, 256, 512])
  ax.set_xticklabels(["16", "32", "64", "128", "256", "512"])
  ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
  if any(series.values()):
    ax.legend(fontsize=8)


def _plot_table3(records: Dict[str, dict], axes):
  rows = _rows(records, grid.study_runs("table3"))
  small = [r for r in rows if r["spec"]["batch"] == 16 and r.get("metrics")]
  axes[0].plot([r["spec"]["bn_size"] for r in small],
               [r["metrics"]["AP"] for r in small], "o-")
  axes[0].set(xlabel="BN size (0 = frozen)", ylabel="val AP",
              title="Batch 16: BN size", xscale="symlog", xticks=[0, 2, 4, 8,
                                                                  16])
  axes[0].set_xticklabels(["0", "2", "4", "8", "16"])
  axes[0].xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
  # Batch 16 enters each series with its largest BN size (16).
  cgbn = [r for r in rows if r["spec"]["bn_size"] and (
      r["spec"]["batch"] > 16 or r["spec"]["bn_size"] == 16)]
  heads = [r for r in _rows(records, grid.study_runs("ablation"))
           if r["spec"].get("norm_in_heads") and
           r["spec"].get("warmup_epochs") is None]
  frozen = [r for r in _rows(records, grid.study_runs("table2"))
            if r["spec"]["peak_scale"] == 1.0 and r["spec"]["seed"] == 0]
  series = {"CGBN in the backbone": cgbn,
            "CGBN in backbone, FPN and heads": heads,
            "BN frozen (seed 0)": frozen}
  _plot_batches(axes[1], {k: v for k, v in series.items() if v})


def _plot_fig4(records: Dict[str, dict], ax):
  rows = _rows(records, grid.study_runs("fig4"))
  for record in rows:
    history = record["eval_history"]
    ax.plot([e["epoch"] for e in history], [e["AP"] for e in history], "o-",
            ms=3, label=f"batch {record['spec']['batch']}, BN "
            f"{record['spec']['bn_size']}")
  if rows:
    schedule = rows[0]["schedule"]
    for boundary in schedule["boundaries"]:
      ax.axvline(boundary / schedule["steps_per_epoch"], color="gray",
                 ls=":", lw=1)
    ax.legend(fontsize=8)
  ax.set(xlabel="epoch", ylabel="val AP",
         title="Long policy (dotted: LR decays)")


def write_report(output_dir: str, studies: Sequence[str]) -> List[str]:
  """Writes `<study>.md` and `<study>.png`; returns the paths written."""
  records = load_records(output_dir)
  written = []
  for study in studies:
    table = {"table2": _table2, "table3": _table3, "fig4": _fig4,
             "ablation": _ablation}[study](records)
    used = _rows(records, _runs_of(study, records))
    pretrain = records.get(runner_lib.PRETRAIN)
    text = [f"# {_TITLES[study]}", "",
            "Made by `tools/study.py` from the run records in `records/`; "
            "see docs/study.md for the setup.", ""] + table + [
                "", _provenance(used) if used else "No run recorded yet."]
    if pretrain and pretrain.get("metrics"):
      text.append(f"Pretrained backbone: AP {_ap(pretrain)} on its own val "
                  f"split, {_wall_time(pretrain)}.")
    path = os.path.join(output_dir, f"{study}.md")
    with open(path, "w") as f:
      f.write("\n".join(text) + "\n")
    written.append(path)
    written.append(_figure(study, records, output_dir))
  return written


def _figure(study: str, records: Dict[str, dict], output_dir: str) -> str:
  columns = 2 if study == "table3" else 1
  fig, axes = plt.subplots(1, columns, figsize=(5.5 * columns, 4))
  {"table2": _plot_table2, "table3": _plot_table3, "fig4": _plot_fig4,
   "ablation": _plot_ablation}[study](records, axes)
  fig.tight_layout()
  path = os.path.join(output_dir, f"{study}.png")
  fig.savefig(path, dpi=100, metadata={"Software": None})
  plt.close(fig)
  return path
