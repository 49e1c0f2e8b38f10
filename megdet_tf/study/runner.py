"""Trains the study's runs through `tools/train.py`, resumably, one record each.

Every run is one `tools/train.py --mode=train_and_eval` process on its own
Gin file (`<work_dir>/runs/<name>/run.gin`: gin/study/finetune.gin plus the
run's batch, normalization, rate variant and seed), so the study exercises the
trainer, schedule, CGBN layer and evaluator a COCO run uses. When the process
ends, the run's outcome, metrics and curves are written to
`<output_dir>/records/<name>.json`:

- a run with a record is never redone;
- an interrupted run (no record) resumes from its latest checkpoint, written
  every epoch, and its wall time adds up over the attempts (kept on disk
  while a run trains, so an attempt that ends with the runner still counts);
- a divergence stop (exit 3, `diverged.json`) is recorded as `failed` with
  its step; any other error as `error` with the log's tail (retried only when
  asked); a process ended by a signal leaves no record, so it resumes.

The pretraining run comes first; the others initialise their backbone from
its checkpoint, whose digest its record keeps, so a grid never mixes two
pretrained backbones.
"""
import dataclasses
import datetime
import glob
import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import time
from typing import IO, Callable, Dict, List, Optional, Sequence, Tuple

import gin
import tensorflow as tf

from megdet_tf.optimization import lr_schedule as lr_schedule_lib
from megdet_tf.study import grid
from megdet_tf.training import divergence
from megdet_tf.training import experiment
from megdet_tf.training import trainer as trainer_lib

PRETRAIN = "pretrain"
REPO_ROOT = experiment.REPO_ROOT
FINISHED = ("converged", "failed")
_CURVE_POINTS = 200  # Loss curve points kept in a record.


def _git(*args: str) -> str:
  result = subprocess.run(["git", "-C", REPO_ROOT, *args], capture_output=True,
                          text=True, check=False)
  return result.stdout.strip() if result.returncode == 0 else ""


def code_version() -> Dict[str, object]:
  """The commit the runs train with, and whether its code was modified."""
  return dict(commit=_git("rev-parse", "HEAD") or "unknown",
              modified=bool(_git("status", "--porcelain", "--", "megdet_tf",
                                 "gin", "tools")))


def _cpu_name() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def checkpoint_digest(model_dir: str) -> str:
  """sha256 of the latest checkpoint's files in `model_dir`."""
  prefix = tf.train.latest_checkpoint(model_dir)
  if not prefix:
    raise FileNotFoundError(f"No checkpoint in {model_dir}")
  digest = hashlib.sha256()
  for path in sorted(glob.glob(prefix + ".*")):
    with open(path, "rb") as f:
      digest.update(f.read())
  return digest.hexdigest()


def read_scalars(model_dir: str) -> Dict[str, Dict[int, float]]:
  """TensorBoard scalars of `model_dir` by tag and step (last write wins)."""
  scalars: Dict[str, Dict[int, float]] = {}
  files = sorted(glob.glob(os.path.join(model_dir, "events.out.tfevents.*")),
                 key=os.path.getmtime)
  for record in tf.data.TFRecordDataset(files):
    event = tf.compat.v1.Event.FromString(record.numpy())
    for value in event.summary.value:
      if value.metadata.plugin_data.plugin_name != "scalars":
        continue  # Images, text.
      number = float(tf.make_ndarray(value.tensor))
      scalars.setdefault(value.tag, {})[int(event.step)] = number
  return scalars


def _finite(value: float) -> Optional[float]:
  """Rounded; None for COCO's -1/NaN of an absent object size (valid JSON)."""
  return round(value, 4) if math.isfinite(value) and value >= 0 else None


def _thin(points: Dict[int, float], n: int) -> List[List[float]]:
  steps = sorted(points)
  stride = max(1, -(-len(steps) // n))
  kept = steps[::stride] + ([steps[-1]] if (len(steps) - 1) % stride else [])
  return [[s, round(points[s], 5)] for s in kept]


@dataclasses.dataclass
class Plan:
  """A run with its Gin file and what the schedule derives from it."""
  name: str
  run: Optional[grid.Run]  # None for the pretraining run.
  gin_text: str
  schedule: Dict[str, object]
  realisation: Dict[str, Optional[int]]


class StudyRunner:
  """Plans, trains and records the study's runs."""

  def __init__(self, output_dir: str, work_dir: str,
               gin_params: Sequence[str] = (),
               replicas: int = grid.REPLICAS,
               log: Callable[[str], None] = print):
    self.records_dir = os.path.join(output_dir, "records")
    self.work_dir = os.path.abspath(work_dir)
    self.gin_params = list(gin_params)
    self.replicas = replicas
    self.log = log

  # --- Records ---------------------------------------------------------------

  def record_path(self, name: str) -> str:
    return os.path.join(self.records_dir, f"{name}.json")

  def load_record(self, name: str) -> Optional[dict]:
    if not os.path.exists(self.record_path(name)):
      return None
    with open(self.record_path(name)) as f:
      return json.load(f)

  def _write_record(self, record: dict):
    os.makedirs(self.records_dir, exist_ok=True)
    path = self.record_path(record["name"])
    with open(path + ".tmp", "w") as f:
      json.dump(record, f, indent=1, sort_keys=True)
      f.write("\n")
    os.replace(path + ".tmp", path)

  def outcomes(self) -> Dict[str, str]:
    records = (self.load_record(os.path.basename(p)[:-5]) for p in
               glob.glob(os.path.join(self.records_dir, "*.json")))
    return {r["name"]: r["status"] for r in records if r}

  # --- Planning --------------------------------------------------------------

  def run_dir(self, name: str) -> str:
    """The run's Gin file, log, wall time and `model/` directory."""
    return os.path.join(self.work_dir, "runs", name)

  def model_dir(self, name: str) -> str:
    return os.path.join(self.run_dir(name), "model")

  def images_to_train(self, plan: Plan) -> int:
    """Images the run has still to train: all but its checkpoint's steps."""
    latest = tf.train.latest_checkpoint(self.model_dir(plan.name))
    trained = int(latest.rsplit("-", 1)[1]) if latest else 0
    schedule = plan.schedule
    return (schedule["total_steps"] - trained) * schedule["global_batch_size"]

  def _gin_text(self, run: Optional[grid.Run]) -> str:
    if run is None:
      return "include 'gin/study/pretrain.gin'\n"
    realised = run.realise(self.replicas)
    norm = "frozen" if run.bn_size == 0 else "cgbn"
    lines = [
        "include 'gin/study/finetune.gin'",
        f"include 'gin/norm/{norm}.gin'",
        f"GLOBAL_BATCH_SIZE = {run.batch}",
        f"build_strategy.num_cpu_replicas = {realised['replicas']}",
        f"build_lr_schedule.policy = '{run.policy}'",
        f"build_lr_schedule.peak_scale = {run.peak_scale}",
        f"configure_process.seed = {run.seed}",
        f"train/InputReader.seed = {run.seed}",
        "initialize_from_checkpoint.init_checkpoint = "
        f"'{self.model_dir(PRETRAIN)}'",
    ]
    if realised["group_size"]:
      lines.append(f"build_norm.group_size = {realised['group_size']}")
    if run.warmup_epochs is not None:
      lines.append(f"build_lr_schedule.warmup_epochs = {run.warmup_epochs}")
    if run.norm_in_heads:
      lines += ["FPN.use_norm = True", "RPNHead.use_norm = True",
                "BoxHead.fc_norm = True"]
    return "\n".join(lines) + "\n"

  def plan(self, run: Optional[grid.Run]) -> Plan:
    """The run's Gin file and its schedule, derived as the trainer will."""
    text = self._gin_text(run)
    gin.clear_config()
    try:
      experiment.parse_gin([], [text] + self.gin_params)
      batch = gin.query_parameter("%GLOBAL_BATCH_SIZE")
      schedule = lr_schedule_lib.build_lr_schedule(global_batch_size=batch)
      num_images = gin.query_parameter("%NUM_TRAIN_IMAGES")
    finally:
      gin.clear_config()
    per_epoch = lr_schedule_lib.steps_per_epoch(num_images, batch)
    periods = [f"DetectorTrainer.checkpoint_every_steps = {per_epoch}"]
    if run is not None and run.eval_every_epoch:
      periods.append(f"DetectorTrainer.eval_every_steps = {per_epoch}")
    derived = dict(
        global_batch_size=batch, num_train_images=num_images,
        steps_per_epoch=per_epoch, total_steps=schedule.total_steps,
        peak_learning_rate=round(schedule.peak_learning_rate, 6),
        warmup_start_learning_rate=schedule.warmup_start_learning_rate,
        warmup_steps=schedule.warmup_steps,
        boundaries=list(schedule.boundaries),
        multipliers=list(schedule.multipliers))
    realisation = (run.realise(self.replicas) if run else
                   dict(replicas=None, per_replica=None, group_size=None))
    return Plan(name=run.name if run else PRETRAIN, run=run,
                gin_text=text + "\n".join(periods) + "\n",
                schedule=derived, realisation=realisation)

  # --- Training --------------------------------------------------------------

  def _check_pretrained(self):
    """The pretrained checkpoint is the one the finished runs started from."""
    want = (self.load_record(PRETRAIN) or {}).get("checkpoint_sha256")
    if want is None:
      raise RuntimeError(
          "The pretraining run has not finished (see "
          f"{self.record_path(PRETRAIN)} and {self.run_dir(PRETRAIN)}/"
          "train.log); the study runs start from its backbone")
    try:
      have = checkpoint_digest(self.model_dir(PRETRAIN))
    except FileNotFoundError as e:
      raise RuntimeError(
          f"The pretrained checkpoint is gone from {self.model_dir(PRETRAIN)} "
          f"but {self.record_path(PRETRAIN)} says it was trained. Restore "
          "that directory, or delete the records to start the grid over "
          "(runs from two pretrained backbones do not compare).") from e
    if have != want:
      raise RuntimeError(
          f"The checkpoint in {self.model_dir(PRETRAIN)} is not the one "
          f"{self.record_path(PRETRAIN)} recorded (sha256 {want[:12]}, found "
          f"{have[:12]}); the grid cannot mix pretrained backbones")

  def train(self, plan: Plan, retry_errors: bool = False) -> Optional[dict]:
    """Trains one run unless it has a record; returns its record.

    Returns None when the process was ended by a signal (it resumes on the
    next call).
    """
    record = self.load_record(plan.name)
    if record and (record["status"] in FINISHED or not retry_errors):
      return record
    if plan.run is not None:
      self._check_pretrained()
    run_dir = self.run_dir(plan.name)
    model_dir = self.model_dir(plan.name)
    os.makedirs(model_dir, exist_ok=True)
    gin_file = os.path.join(run_dir, "run.gin")
    with open(gin_file, "w") as f:
      f.write(plan.gin_text)
    command = [sys.executable, os.path.join(REPO_ROOT, "tools", "train.py"),
               f"--gin_file={gin_file}", f"--model_dir={model_dir}",
               "--mode=train_and_eval"] + [
                   f"--gin_param={p}" for p in self.gin_params]
    env = dict(os.environ, PYTHONPATH=REPO_ROOT)
    with open(os.path.join(run_dir, "train.log"), "a") as log:
      returncode, timing = run_timed(
          command, log, os.path.join(run_dir, "wall_seconds.json"),
          cwd=self.work_dir, env=env)
    if returncode < 0 or returncode == trainer_lib.EXIT_PREEMPTED:
      how = ("preempted" if returncode > 0 else
             f"ended by signal {-returncode}")
      self.log(f"{plan.name}: {how}; it resumes from its checkpoint next "
               "time")
      return None
    record = self._record(plan, model_dir, returncode, timing, command)
    self._write_record(record)
    return record

  def _record(self, plan: Plan, model_dir: str, returncode: int,
              timing: dict, command: List[str]) -> dict:
    scalars = read_scalars(model_dir)
    evals = scalars.get("eval/AP", {})
    per_epoch = plan.schedule["steps_per_epoch"]
    record = dict(
        name=plan.name, spec=dataclasses.asdict(plan.run) if plan.run else None,
        realisation=plan.realisation, schedule=plan.schedule,
        gin_config=plan.gin_text, gin_params=self.gin_params,
        command=" ".join(command[1:]), wall_seconds=timing["seconds"],
        attempts=timing["attempts"],
        date=datetime.datetime.now().isoformat(timespec="seconds"),
        machine=f"{_cpu_name()}, {os.cpu_count()} cores",
        returncode=returncode, **code_version(),
        loss_curve=_thin(scalars.get("train/total_loss", {}), _CURVE_POINTS),
        eval_history=[
            dict(step=s, epoch=round(s / per_epoch, 3),
                 **{k[5:]: _finite(scalars[k][s]) for k in sorted(scalars)
                    if k.startswith("eval/") and s in scalars[k]})
            for s in sorted(evals)])
    if returncode == 0:
      record.update(status="converged", metrics=record["eval_history"][-1])
      if plan.run is None:
        record["checkpoint_sha256"] = checkpoint_digest(model_dir)
    elif returncode == trainer_lib.EXIT_DIVERGED:
      with open(os.path.join(model_dir, divergence.DIVERGED_FILE)) as f:
        diverged = json.load(f)
      record.update(status="failed", failed_step=diverged["step"],
                    failed_learning_rate=diverged["learning_rate"],
                    failed_terms=diverged["bad_terms"])
    else:
      with open(os.path.join(os.path.dirname(model_dir), "train.log")) as f:
        tail = f.read()[-2000:]
      record.update(status="error", log_tail=tail)
    return record


def run_timed(command: Sequence[str], log: IO[str], wall_path: str,
              tick_seconds: float = 10.0, **popen_args) -> Tuple[int, dict]:
  """Runs `command` as one more attempt of a run timed at `wall_path`.

  `wall_path` holds the run's `seconds` and `attempts` so far; it is
  rewritten when the command starts and every `tick_seconds` while it runs,
  not only at its end, so an attempt ended together with this process (a
  session's end, a preemption) still counts, its time to within a tick.
  Returns the command's exit code and the run's totals.
  """
  before = {"seconds": 0.0, "attempts": 0}
  if os.path.exists(wall_path):
    with open(wall_path) as f:
      before = json.load(f)
  start = time.time()

  def write_totals() -> dict:
    totals = {"seconds": round(before["seconds"] + time.time() - start, 1),
              "attempts": before["attempts"] + 1}
    with open(wall_path + ".tmp", "w") as f:
      json.dump(totals, f)
    os.replace(wall_path + ".tmp", wall_path)
    return totals

  process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                             **popen_args)
  write_totals()
  while True:
    try:
      returncode = process.wait(timeout=tick_seconds)
      return returncode, write_totals()
    except subprocess.TimeoutExpired:
      write_totals()


def _clock(seconds: float) -> str:
  return time.strftime("%H:%M:%S", time.gmtime(seconds))


def train_grid(runner: StudyRunner, runs: Sequence[grid.Run],
               add_table2_seeds: bool, retry_errors: bool = False) -> bool:
  """Pretrains, then trains `runs` (and Table 2's extra seeds) in order.

  Every run is planned first, so an impossible one fails before any
  training. Prints a line per run with its place in the grid and the ETA
  from this invocation's images per second. Returns False if a run was
  interrupted.
  """
  plans = [runner.plan(None)] + [runner.plan(r) for r in runs]
  done_images, done_seconds = 0, 0.0
  index = 0
  while index < len(plans):
    plan = plans[index]
    index += 1
    images = [runner.images_to_train(p) for p in plans[index - 1:]
              if (runner.load_record(p.name) or {}).get("status")
              not in FINISHED]
    eta = (_clock(sum(images) * done_seconds / done_images) if done_images
           else "after the first run")
    realised = plan.realisation
    how = (f"{realised['replicas']} x {realised['per_replica']} images, "
           f"groups of {realised['group_size'] or '-'}" if plan.run else
           "backbone pretraining")
    runner.log(f"[{index}/{len(plans)}] {plan.name} ({how}; peak LR "
               f"{plan.schedule['peak_learning_rate']:g}, "
               f"{plan.schedule['total_steps']} steps); grid ETA {eta}")
    record = runner.load_record(plan.name)
    if record and (record["status"] in FINISHED or not retry_errors):
      runner.log(f"{plan.name}: recorded ({record['status']}), skipped")
      continue
    start = time.time()
    record = runner.train(plan, retry_errors=retry_errors)
    if record is None:
      return False
    done_images += images[0] if images else 0
    done_seconds += time.time() - start
    runner.log(f"{plan.name}: {record['status']}" + (
        f", AP {record['metrics']['AP']:.3f}" if record.get("metrics") else
        f" at step {record.get('failed_step')}" if record["status"] == "failed"
        else "") + f", {_clock(record['wall_seconds'])}")
    if add_table2_seeds and index == len(plans):
      planned = {p.name for p in plans}
      plans += [runner.plan(r) for r in grid.table2_extra_seeds(
          runner.outcomes()) if r.name not in planned]
  return True
