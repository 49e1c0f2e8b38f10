"""The study's grid: realisations, refusals and Table 2's extra seeds."""
import dataclasses

import pytest

from megdet_tf.study import grid


def _all_runs():
  return [run for study in grid.STUDIES for run in grid.study_runs(study)]


@pytest.mark.parametrize("bn_size, group_size", [(2, 1), (4, 2), (8, 4),
                                                 (16, 8)])
def test_batch_16_reaches_every_bn_size_with_groups_of_eight_replicas(
    bn_size, group_size):
  assert grid.Run(16, bn_size).realise() == dict(
      replicas=8, per_replica=2, group_size=group_size)


def test_every_run_of_the_grid_is_realised_with_its_bn_size():
  for run in _all_runs():
    realised = run.realise()
    assert realised["replicas"] * realised["per_replica"] == run.batch
    assert (realised["per_replica"] * (realised["group_size"] or 0) ==
            run.bn_size), run.name


def test_large_batches_keep_bn_size_32_by_images_not_groups():
  assert grid.Run(256, 32).realise() == dict(replicas=8, per_replica=32,
                                             group_size=1)
  assert grid.Run(512, 32, replicas=16).realise() == dict(
      replicas=16, per_replica=32, group_size=1)


@pytest.mark.parametrize("run, message", [
    (grid.Run(256, 2), "BN size 2 is not a multiple of the 32 images each "
     "of the 8 replicas"),
    (grid.Run(16, 32), "BN size 32 exceeds the batch 16"),
    (grid.Run(20, 0), "batch 20 does not split evenly over 8 replicas"),
    (grid.Run(16, 6), "a BN group of 3 replicas does not divide the 8"),
    (grid.Run(512, 32), "BN size 32 is not a multiple of the 64 images"),
])
def test_impossible_combinations_are_refused_with_the_reason(run, message):
  with pytest.raises(ValueError, match=message):
    run.realise()


def test_names_identify_runs_and_shared_rows_are_the_same_run():
  by_name = {}
  for run in _all_runs():
    assert by_name.setdefault(run.name, run) == run
  table2 = {r.name for r in grid.study_runs("table2")}
  table3 = {r.name for r in grid.study_runs("table3")}
  assert table2 & table3 == {"bs16_frozen_s0"}


def test_table2_adds_a_seed_only_where_seeds_disagree():
  assert grid.table2_extra_seeds({}) == []
  outcomes = {r.name: "converged" for r in grid.study_runs("table2")}
  assert grid.table2_extra_seeds(outcomes) == []
  outcomes["bs64_frozen_s1"] = "failed"
  extra = grid.table2_extra_seeds(outcomes)
  assert extra == [dataclasses.replace(grid.Run(64, 0), seed=2)]
  for name in ("bs64_frozen_s0", "bs128_frozen_half_s0"):
    outcomes[name] = "failed"
  assert [r.name for r in grid.table2_extra_seeds(outcomes)] == [
      "bs128_frozen_half_s2"]


def test_unknown_study_is_named():
  with pytest.raises(ValueError, match="'table9'"):
    grid.study_runs("table9")
