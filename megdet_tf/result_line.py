"""A child process's result for its parent: one `RESULT {json}` stdout line.

What needs a fresh TensorFlow (its own logical devices, strategy or
allocator) runs in a child process: benchmarks' measurements,
tools/profile_allreduce.py's settings, tests' training runs. The child prints
its result last, after whatever else it prints; the parent reads it back.
"""
import json
from typing import Any, Dict, Optional

_PREFIX = "RESULT "


def print_result(result: Dict[str, Any]) -> None:
  """Prints `result` as the `RESULT` line, flushed (children often end with
  `os._exit`, which would lose buffered output)."""
  print(_PREFIX + json.dumps(result), flush=True)


def read_result(stdout: str) -> Optional[Dict[str, Any]]:
  """The result of the last `RESULT` line in `stdout`; None if there is none."""
  _, found, rest = stdout.rpartition(_PREFIX)
  return json.loads(rest.splitlines()[0]) if found else None
