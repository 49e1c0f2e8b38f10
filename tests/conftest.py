"""Shared pytest fixtures.

`megdet_tf` is imported first so TF_USE_LEGACY_KERAS is set before any test
imports TensorFlow.
"""
import megdet_tf  # noqa: F401  pylint: disable=unused-import
import pytest

from megdet_tf.dataloaders import shapes_dataset


@pytest.fixture(scope="session")
def shapes_dataset_dir(tmp_path_factory) -> str:
  """A small shapes dataset, generated once per session; returns its path.

  The directory holds `annotations/instances_{train,val}.json` and
  `{train,val}/*.jpg`: 24 train and 8 val images of 128x128 px, seed 0.
  """
  root = tmp_path_factory.mktemp("shapes")
  shapes_dataset.write_shapes_dataset(str(root), num_train=24, num_val=8,
                                      image_size=128, seed=0)
  return str(root)
