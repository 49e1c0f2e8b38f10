"""CPU kernels for the passes group batch norm adds, compiled on first use.

Per-replica BN runs one fused kernel forward and one backward. Group BN must
know its group's statistics before it normalizes, and with TensorFlow's fused
kernels alone that costs an extra training-mode kernel forward (for the local
statistics; it also writes an output nobody reads) and two extra passes
backward (the group's correction of dx, then its sum), which made group BN
slower than per-replica BN on CPUs even without collectives (benchmarks'
cgbn_overhead measures both). Three ops (group_norm_kernels.cc) do the same work in the passes it
needs:

  megdet_channel_moments(x)        per-channel mean and M2 = sum (x - mean)^2:
                                   two reading passes, nothing written;
  megdet_channel_grad_sums(dy, x, mean)
                                   sum dy and sum dy * (x - mean): one pass;
  megdet_group_norm_grad(dy, x, mean, a, b, c)
                                   a dy + b (x - mean) + c: one pass.

They take float32, bfloat16 and float16 [..., C] tensors and accumulate in
float32 (float64 across blocks of 256 rows). CPU only: on GPUs the layer keeps
cuDNN's kernels.

`load()` compiles the source with TensorFlow's flags (the compiler in $CXX,
default c++) into $MEGDET_TF_CACHE (default ~/.cache/megdet_tf), keyed by the
source, TensorFlow's version and the CPU, which takes a few seconds once. If
there is no compiler or the build fails, it warns once and returns None, and
the layer runs on TensorFlow's fused kernels with the same results.
"""
import functools
import hashlib
import os
import platform
import subprocess
import tempfile
import threading
from typing import Optional

from absl import logging
import tensorflow as tf

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                      "group_norm_kernels.cc")
_lock = threading.Lock()


def _cpu_description() -> str:
  """The CPU's model and instruction sets (the build uses -march=native)."""
  try:
    with open("/proc/cpuinfo") as f:
      return "".join(line for line in f
                     if line.startswith(("model name", "flags")))[:4096]
  except OSError:
    return platform.processor()


def _cache_dir() -> str:
  return os.environ.get("MEGDET_TF_CACHE",
                        os.path.join(os.path.expanduser("~"), ".cache",
                                     "megdet_tf"))


def build(compiler: Optional[str] = None,
          cache_dir: Optional[str] = None) -> str:
  """Compiles the kernels unless cached; returns the shared library's path.

  Raises RuntimeError naming the command and its output if the build fails.
  """
  compiler = compiler or os.environ.get("CXX", "c++")
  cache_dir = cache_dir or _cache_dir()
  with open(SOURCE, "rb") as f:
    source = f.read()
  flags = ["-shared", "-fPIC", "-O3", "-march=native", "-w",
           *tf.sysconfig.get_compile_flags()]
  link_flags = tf.sysconfig.get_link_flags()
  key = hashlib.sha256(b"\0".join(
      [source, tf.__version__.encode(), " ".join(flags + link_flags).encode(),
       compiler.encode(), _cpu_description().encode()])).hexdigest()[:16]
  library = os.path.join(cache_dir, f"group_norm_kernels_{key}.so")
  if os.path.exists(library):
    return library
  os.makedirs(cache_dir, exist_ok=True)
  # Built under a temporary name and renamed: processes building at the same
  # time never load a half-written library.
  fd, partial = tempfile.mkstemp(suffix=".so", dir=cache_dir)
  os.close(fd)
  command = [compiler, *flags, SOURCE, "-o", partial, *link_flags]
  try:
    result = subprocess.run(command, capture_output=True, text=True,
                            check=False)
  except OSError as e:
    os.remove(partial)
    raise RuntimeError(f"{' '.join(command)}: {e}") from e
  if result.returncode:
    os.remove(partial)
    raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
  os.replace(partial, library)
  return library


@functools.lru_cache(maxsize=None)
def _load_once():
  try:
    return tf.load_op_library(build())
  except (RuntimeError, OSError, tf.errors.NotFoundError) as e:
    logging.warning(
        "Group batch norm's CPU kernels are unavailable, so it uses "
        "TensorFlow's fused kernels (same results, more passes over the "
        "activations). Install a C++ compiler or set $CXX to use them. %s", e)
    return None


def load():
  """The compiled ops' module (`megdet_channel_moments`, ...), or None."""
  with _lock:  # MirroredStrategy traces its replicas in threads.
    return _load_once()
