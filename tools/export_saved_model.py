r"""Exports a trained detector as a SavedModel for TF Serving.

  python tools/export_saved_model.py --gin_file=gin/demo.gin \
      --checkpoint_path=runs/demo --export_dir=exported/demo

Pass the Gin files and bindings the model was trained with (`--gin_file`,
`--gin_param`, as for tools/train.py). The SavedModel goes to
`EXPORT_DIR/<version>/`, the checkpoint's step unless `--version` says
otherwise; an existing version is an error, never overwritten. Signatures and
outputs: `megdet_tf/serving/export_saved_model.py`.
"""
import sys

from absl import app
from absl import flags

import megdet_tf  # noqa: F401  pylint: disable=unused-import
from megdet_tf.serving import export_saved_model as export_lib
from megdet_tf.training import experiment

FLAGS = flags.FLAGS
experiment.define_gin_flags()
flags.DEFINE_string("checkpoint_path", None,
                    "Checkpoint prefix (runs/demo/ckpt-500) or a model_dir, "
                    "whose latest checkpoint is exported.")
flags.DEFINE_string("export_dir", None, "TF Serving's model base path; the "
                    "SavedModel goes to EXPORT_DIR/<version>.")
flags.DEFINE_integer("version", None, "Version directory (default: the "
                     "checkpoint's step).", lower_bound=0)
flags.mark_flags_as_required(["checkpoint_path", "export_dir"])


def main(argv):
  del argv
  experiment.parse_gin_flags()
  try:
    path = export_lib.export_saved_model(FLAGS.checkpoint_path,
                                         FLAGS.export_dir, FLAGS.version)
  except (FileExistsError, FileNotFoundError) as e:
    sys.exit(f"ERROR: {e}")
  print(path)


if __name__ == "__main__":
  app.run(main)
