"""What the collectives of a profiled training window cost, per step.

Reads a profile captured by `profiling.ProfileWindow` through xprof's own
converter (the `trace_viewer` tool behind TensorBoard's Profile tab) and
reports, per training step:

- `step_ms`: wall time, from the `train` events (one per compiled-loop call,
  divided by the steps it ran);
- `collective_ms`: time with at least one collective op in flight on any
  replica: the union of the op intervals, each from the start of the
  asynchronous kernel to its completion. Per-op "self times" would count the
  same wall time once per replica and per overlapping op;
- per kind of collective, told apart by the name scopes around them:
  `cgbn_forward` (`cgbn_allgather`), `cgbn_backward` (`cgbn_grad_allreduce`),
  `cgbn` (both), `gradient` (`gradient_allreduce`) and `other` (e.g. Model
  Garden's box losses all-reduce their normalizers): the union of its
  intervals, its share of `collective_ms` (kinds overlap across replicas, so
  shares may add up to more than 1), its ops per replica and step, and their
  payload in bytes per replica and step.

In-flight time includes waiting for the slowest peer: with logical CPU
replicas sharing a few cores it mostly measures how far apart the replicas
run, not data transfer. The trace records no tensor shapes, so payloads come
from the traced graph (`collective_payloads`): an all-reduce carries its
input, an all-gather its output. A ring all-reduce of S bytes over n devices
sends 2(n-1)/n S per device, the basis of NCCL's "bus bandwidth".
"""
import collections
import glob
import json
import os
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import tensorflow as tf

from megdet_tf.training import profiling

# Name scope (a path segment of the op name) -> kind.
SCOPES = {
    "cgbn_allgather": "cgbn_forward",
    "cgbn_grad_allreduce": "cgbn_backward",
    "gradient_allreduce": "gradient",
}
KINDS = ("cgbn_forward", "cgbn_backward", "gradient", "other")
# Reported groups of kinds; "cgbn" is the union of both CGBN passes.
GROUPS = {**{kind: (kind,) for kind in KINDS},
          "cgbn": ("cgbn_forward", "cgbn_backward")}
# The collectives that strategies and CGBN run in a training step.
COLLECTIVE_OPS = frozenset({
    "CollectiveReduceV2", "CollectiveGatherV2", "CollectiveReduceScatterV2",
    "CollectiveAllToAllV2", "NcclAllReduce"})

Interval = Tuple[float, float]


def kind_of(op_name: str) -> str:
  """`KINDS` entry of a collective, from the name scopes in its op name."""
  segments = op_name.split(":")[0].split("/")
  for scope, kind in SCOPES.items():
    if scope in segments:
      return kind
  return "other"


def is_train_event(event: dict) -> bool:
  """Whether `event` is a `ProfileWindow` loop call.

  Named "train", or "train <step>" once xprof has grouped the trace in steps.
  """
  return (event["name"].split(" ")[0] == profiling.TRAIN_EVENT and
          "num_steps" in event.get("args", {}))


def latest_profile(logdir: str) -> List[str]:
  """The `.xplane.pb` files of the newest profile run under `logdir`."""
  runs = sorted(glob.glob(os.path.join(logdir, "plugins", "profile", "*")))
  files = glob.glob(os.path.join(runs[-1], "*.xplane.pb")) if runs else []
  if not files:
    raise FileNotFoundError(
        f"No profile under {logdir}/plugins/profile; capture one with "
        "--gin_param='ProfileWindow.profile_steps=(first, last)'.")
  return files


def trace_events(xplane_files: Sequence[str]) -> List[dict]:
  """The complete ('X') events of the trace viewer's view of the profile."""
  # pylint: disable=g-import-not-at-top
  from xprof.convert import raw_to_tool_data  # The `profile` extra.
  data, _ = raw_to_tool_data.xspace_to_tool_data(list(xplane_files),
                                                 "trace_viewer", {})
  if not data:
    raise ValueError(f"xprof could not convert {list(xplane_files)}")
  return [e for e in json.loads(data)["traceEvents"]
          if e.get("ph") == "X" and "dur" in e]


def _union(intervals: Iterable[Interval]) -> float:
  """Total length covered by the intervals."""
  total, end = 0.0, float("-inf")
  for start, stop in sorted(intervals):
    if stop > end:
      total += stop - max(start, end)
      end = stop
  return total


def _clip(intervals: Iterable[Interval], window: Interval) -> List[Interval]:
  return [(max(a, window[0]), min(b, window[1])) for a, b in intervals
          if b > window[0] and a < window[1]]


def collective_payloads(function: tf.types.experimental.ConcreteFunction
                        ) -> Dict[str, int]:
  """Bytes per replica of every collective op in `function` and its callees.

  Keys are op names as in the graph that holds the op (loop bodies and
  branches are graphs of their own); `summarize` matches them to the names
  in the trace, which the runtime prefixes when it inlines functions.
  """
  payloads = {}

  def visit(graph):
    for op in graph.get_operations():
      if op.type in COLLECTIVE_OPS:
        size = op.inputs[0].shape.num_elements()
        if op.type == "CollectiveGatherV2" and size is not None:
          size *= int(tf.get_static_value(op.inputs[1]))  # Group size.
        if size is None:
          raise ValueError(f"{op.name}: the payload of a collective needs a "
                           "static input shape.")
        payloads[op.name] = size * op.inputs[0].dtype.size
      for attr in op.node_def.attr.values():
        for func in [attr.func] + list(attr.list.func):
          # Loop bodies and branches are functions registered in the graph.
          callee = func.name and graph._get_function(func.name)  # pylint: disable=protected-access
          if callee:
            visit(callee.graph)

  visit(function.graph)
  return payloads


def _payload(long_name: str, payloads: Mapping[str, int]) -> int:
  """The payload of a traced op: its longest suffix that names a graph op."""
  segments = long_name.split(":")[0].split("/")
  for i in range(len(segments)):
    name = "/".join(segments[i:])
    if name in payloads:
      return payloads[name]
  raise KeyError(f"Collective {long_name} of the trace is not in the traced "
                 "graph; pass the payloads of the function that ran.")


def summarize(events: Sequence[dict], num_replicas: int,
              payloads: Optional[Mapping[str, int]] = None) -> dict:
  """Per-step figures (see the module docstring) of the `train` events."""
  windows = [(e["ts"], e["ts"] + e["dur"], int(e["args"]["num_steps"]))
             for e in events if is_train_event(e)]
  if not windows:
    raise ValueError("The profile has no `train` events; capture it with "
                     "ProfileWindow (ProfileWindow.profile_steps).")
  steps = sum(n for _, _, n in windows)
  by_kind = collections.defaultdict(list)
  counts = collections.Counter()
  payload_bytes = collections.Counter()
  for e in events:
    if e["name"] not in COLLECTIVE_OPS:
      continue
    if not any(start <= e["ts"] < stop for start, stop, _ in windows):
      continue
    name = e.get("args", {}).get("long_name", e["name"])
    kind = kind_of(name)
    by_kind[kind].append((e["ts"], e["ts"] + e["dur"]))
    counts[kind] += 1
    if payloads is not None:
      payload_bytes[kind] += _payload(name, payloads)

  def per_step_ms(intervals):
    return sum(_union(_clip(intervals, w[:2])) for w in windows) / steps / 1e3

  collective_ms = per_step_ms([i for kind in KINDS for i in by_kind[kind]])
  step_ms = sum(stop - start for start, stop, _ in windows) / steps / 1e3
  result = {"steps": steps, "loop_calls": len(windows),
            "num_replicas": num_replicas, "step_ms": step_ms,
            "collective_ms": collective_ms,
            "collective_share_of_step": collective_ms / step_ms}
  per_replica_step = steps * num_replicas
  for group, kinds in GROUPS.items():
    ms = per_step_ms([i for kind in kinds for i in by_kind[kind]])
    result[f"{group}_ms"] = ms
    result[f"{group}_share"] = ms / collective_ms if collective_ms else 0.0
    result[f"{group}_count"] = sum(counts[k] for k in kinds) / per_replica_step
    if payloads is not None:
      result[f"{group}_bytes"] = sum(
          payload_bytes[k] for k in kinds) / per_replica_step
  return result


def report(logdir: str, num_replicas: int,
           payloads: Optional[Mapping[str, int]] = None) -> dict:
  """`summarize` of the newest profile under `logdir`."""
  return summarize(trace_events(latest_profile(logdir)), num_replicas,
                   payloads)


# Table columns: header, report key, format.
COLUMNS = (
    ("step ms", "step_ms", "{:.1f}".format),
    ("collective ms", "collective_ms", "{:.1f}".format),
    ("of step", "collective_share_of_step", "{:.0%}".format),
    ("CGBN share", "cgbn_share", "{:.0%}".format),
    ("grad share", "gradient_share", "{:.0%}".format),
    ("CGBN ops", "cgbn_count", "{:g}".format),
    ("grad ops", "gradient_count", "{:g}".format),
    ("CGBN KiB", "cgbn_bytes", lambda v: f"{v / 2**10:.1f}"),
    ("grad MiB", "gradient_bytes", lambda v: f"{v / 2**20:.2f}"),
)


def format_table(rows: Sequence[Mapping[str, float]],
                 label: str = "group_size") -> str:
  """A Markdown table of `summarize` results (one row per setting)."""
  lines = ["| " + " | ".join([label] + [c[0] for c in COLUMNS]) + " |",
           "|" + "---:|" * (len(COLUMNS) + 1)]
  for row in rows:
    cells = [str(row[label])] + [fmt(row[key]) if key in row else "n/a"
                                 for _, key, fmt in COLUMNS]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)
