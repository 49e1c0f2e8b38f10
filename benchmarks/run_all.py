r"""Runs the benchmarks and writes benchmarks/RESULTS.md.

  python benchmarks/run_all.py                   # every benchmark (long)
  python benchmarks/run_all.py --only=cgbn_overhead,scaling_model
  python benchmarks/run_all.py --only=cgbn_overhead \
      --benchmark_args='cgbn_overhead=--replicas=4 --rounds=1'

Runs every `benchmarks/*.py` but this one, one at a time, each in its own
process with its default flags (or `--benchmark_args`), and keeps the JSON
lines each prints as its figures. Results accumulate in
benchmarks/results.json, one record per benchmark and flags (date, machine,
command, seconds, figures), so a partial run updates its benchmarks and keeps
the others; RESULTS.md is rewritten from all records as one table per benchmark.
"""
import datetime
import glob
import importlib.metadata
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time

from absl import app
from absl import flags
from absl import logging

BENCHMARKS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCHMARKS)

flags.DEFINE_list("only", [], "Benchmark names to run (default: all).")
flags.DEFINE_multi_string("benchmark_args", [],
                          "NAME=ARGS: flags for one benchmark (repeatable).")
flags.DEFINE_string("results_json", os.path.join(BENCHMARKS, "results.json"),
                    "Records of every benchmark run so far.")
flags.DEFINE_string("output", os.path.join(BENCHMARKS, "RESULTS.md"),
                    "The Markdown table written from the records.")
flags.DEFINE_float("timeout_seconds", 4 * 3600, "Per benchmark.")
FLAGS = flags.FLAGS


def benchmark_names():
  return sorted(os.path.splitext(os.path.basename(p))[0]
                for p in glob.glob(os.path.join(BENCHMARKS, "*.py"))
                if os.path.basename(p) != os.path.basename(__file__))


def machine():
  """CPU count and model, memory, GPUs and versions, from the OS."""
  model = platform.processor() or "unknown CPU"
  with open("/proc/cpuinfo") as f:
    for line in f:
      if line.startswith("model name"):
        model = line.split(":", 1)[1].strip()
        break
  with open("/proc/meminfo") as f:
    kib = next(int(line.split()[1]) for line in f
               if line.startswith("MemTotal"))
  gpus = "none"
  if shutil.which("nvidia-smi"):
    query = subprocess.run(["nvidia-smi", "--query-gpu=name",
                            "--format=csv,noheader"], capture_output=True,
                           text=True, check=False)
    gpus = ", ".join(query.stdout.split("\n")).strip(", ") or gpus
  return (f"{os.cpu_count()} x {model}, {kib / 2**20:.1f} GiB, GPUs: {gpus}; "
          f"Python {platform.python_version()}, TensorFlow "
          f"{importlib.metadata.version('tensorflow')}")


def run_benchmark(name, args):
  """Runs one benchmark; returns its record."""
  command = [sys.executable, os.path.join("benchmarks", f"{name}.py")] + args
  logging.info("Running %s", shlex.join(command))
  start = time.time()
  try:
    process = subprocess.run(command, cwd=REPO, capture_output=True,
                             text=True, timeout=FLAGS.timeout_seconds,
                             check=False)
    returncode, stdout, stderr = (process.returncode, process.stdout,
                                  process.stderr)
  except subprocess.TimeoutExpired as e:
    returncode, stdout, stderr = "timeout", e.stdout or "", e.stderr or ""
    stdout = stdout.decode() if isinstance(stdout, bytes) else stdout
    stderr = stderr.decode() if isinstance(stderr, bytes) else stderr
  figures = []
  for line in stdout.splitlines():
    if line.startswith("{"):
      try:
        figures.append(json.loads(line))
      except json.JSONDecodeError:
        pass  # Not a figure line.
  record = {"date": datetime.datetime.now().astimezone().isoformat(
      timespec="seconds"), "machine": machine(),
            "command": "python " + shlex.join(command[1:]),
            "seconds": round(time.time() - start, 1), "figures": figures}
  if returncode != 0:
    record["error"] = f"exit {returncode}: {stderr[-2000:]}"
  return record


def table(figures):
  """A Markdown table of JSON figures; columns in order of appearance."""
  columns = list(dict.fromkeys(k for row in figures for k in row
                               if k != "benchmark"))  # The section's name.
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |"
            for row in figures]
  return "\n".join(lines)


def markdown(records):
  lines = ["# Benchmark results", "",
           "Written by `python benchmarks/run_all.py` from "
           "`benchmarks/results.json`; each section says when, where and "
           "how it was measured.", ""]
  for name, record in sorted(records.items()):
    lines += [f"## {name}", "",
              f"- Date: {record['date']} ({record['seconds']:g} s)",
              f"- Machine: {record['machine']}",
              f"- Command: `{record['command']}`", ""]
    if record["figures"]:
      lines += [table(record["figures"]), ""]
    if "error" in record:
      lines += ["Failed:", "", "```", record["error"].strip(), "```", ""]
  return "\n".join(lines)


def main(argv):
  del argv
  names = benchmark_names()
  unknown = set(FLAGS.only) - set(names)
  if unknown:
    raise app.UsageError(f"--only: no benchmarks/{sorted(unknown)[0]}.py; "
                         f"choose from {', '.join(names)}")
  args = {}
  for item in FLAGS.benchmark_args:
    name, _, value = item.partition("=")
    if name not in names:
      raise app.UsageError(f"--benchmark_args={item!r}: expected NAME=ARGS "
                           f"with NAME one of {', '.join(names)}")
    args[name] = shlex.split(value)
  records = {}
  if os.path.exists(FLAGS.results_json):
    with open(FLAGS.results_json) as f:
      records = json.load(f)
  failed = []
  for name in FLAGS.only or names:
    # One record per benchmark and flags: runs with other flags are kept.
    key = shlex.join([name] + args.get(name, []))
    records[key] = run_benchmark(name, args.get(name, []))
    if "error" in records[key]:
      failed.append(key)
      logging.error("%s failed: %s", key, records[key]["error"][-500:])
    # Written after every benchmark: a long run keeps what it finished.
    with open(FLAGS.results_json, "w") as f:
      json.dump(records, f, indent=1)
    with open(FLAGS.output, "w") as f:
      f.write(markdown(records))
  if failed:
    sys.exit(f"Failed: {', '.join(failed)}")


if __name__ == "__main__":
  app.run(main)
