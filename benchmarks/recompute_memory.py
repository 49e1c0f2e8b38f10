r"""What recomputation (MegDet's sub-linear memory) saves and costs.

  python benchmarks/recompute_memory.py [--image_size 512] [--batch 2]
      [--precision mixed_bfloat16] [--rounds 3] [--steps 3]

Builds our R50-FPN trainer twice in one process, with `ResNet.recompute`
off and on (the backbone's stages keep only their inputs in the forward pass
and recompute their activations in the backward pass), on the generated
shapes dataset at `--image_size`, then alternates timed rounds of `--steps`
steps. Helpers and flags are benchmarks/detector_step.py's (one CPU replica,
per-replica BN, nothing frozen). A JSON line per variant gives the median
step time and `step_peak_mib`, the most memory TensorFlow's CPU allocator
held during its rounds above what it held before them (activations,
gradients, temporaries); the last line is `recompute_peak_ratio: X`, the
peak with recomputation over the peak without.
"""
import json
import os
import statistics
import tempfile

from absl import app
from absl import flags
import gin

import detector_step  # pylint: disable=g-bad-import-order  # benchmarks/

flags.DEFINE_integer("image_size", 512, "Square training images, pixels.")
FLAGS = flags.FLAGS
FLAGS.set_default("precision", "mixed_bfloat16")


def main(argv):
  del argv
  os.chdir(detector_step.REPO)
  from megdet_tf.dataloaders import prepare_shapes  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as tmp:
    FLAGS.data_dir = prepare_shapes.prepare_shapes_dataset(
        os.path.join(tmp, "data"), num_train=64, num_val=4,
        image_size=FLAGS.image_size)
    variants = {}
    for recompute in (False, True):
      with gin.unlock_config():  # The first trainer locked it.
        variants[recompute] = detector_step.build_ours(
            "gin/model/r50_fpn.gin", FLAGS.image_size,
            os.path.join(tmp, f"recompute_{recompute}"),
            [f"ResNet.recompute={recompute}"]).run
    rounds = {recompute: [] for recompute in variants}
    for _ in range(FLAGS.rounds):
      for recompute, run_steps in variants.items():
        rounds[recompute].append(detector_step._timed_round(run_steps))  # pylint: disable=protected-access
  peaks = {}
  for recompute, timings in rounds.items():
    peaks[recompute] = max(peak for _, peak in timings)
    print(json.dumps({
        "benchmark": "recompute_memory", "recompute": recompute,
        "precision": FLAGS.precision, "image_size": FLAGS.image_size,
        "batch": FLAGS.batch, "steps": FLAGS.steps * FLAGS.rounds,
        "step_s": round(statistics.median(s for s, _ in timings), 3),
        "step_peak_mib": round(peaks[recompute])}), flush=True)
  print(f"recompute_peak_ratio: {peaks[True] / peaks[False]:.3f}", flush=True)
  os._exit(0)  # pylint: disable=protected-access  # Skip graph teardown.


if __name__ == "__main__":
  app.run(main)
