"""The paper's experiments as a grid of training runs on logical CPU replicas.

Each row of the paper's Table 2 (frozen BN), Table 3 (cross-GPU BN) and
Figure 4 (AP per epoch under the long policy) becomes a `Run`: a global batch,
a BN size and a rate variant. A run is realised on `replicas` logical
devices with batch / replicas images each, and BN size = images per replica
x CGBN group size (batch 16 = 8 x 2 with groups of 1, 2, 4, 8 gives BN 2, 4,
8, 16). Everything else (data, detector, pretrained backbone, the paper's
linear scaling and warmup) is `gin/study/finetune.gin`, the same for every
run, so the batch changes only the number of steps.
"""
import dataclasses
from typing import Dict, List, Optional, Tuple

REPLICAS = 8
STUDIES = ("table2", "table3", "fig4", "ablation")
# Table 2 rows run with these seeds; a row whose seeds disagree (one
# converges, one fails) gets one more.
TABLE2_SEEDS = (0, 1)
TABLE2_EXTRA_SEED = 2


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run of the study.

  Attributes:
    batch: global batch (images per step over all replicas).
    bn_size: images per BN group; 0 = frozen BN (the paper's "BN 0").
    policy: `normal` or `long` (gin/schedule/).
    peak_scale: 0.5 = Table 2's half learning rate.
    seed: weight initialisation of the new layers and data order.
    replicas: logical CPU replicas (None: `REPLICAS`).
    eval_every_epoch: evaluate after every epoch (Figure 4), else at the end.
    warmup_epochs: warmup length (None: the recipe's, gin/study/).
    norm_in_heads: the FPN and the heads get the run's norm too.
  """
  batch: int
  bn_size: int
  policy: str = "normal"
  peak_scale: float = 1.0
  seed: int = 0
  replicas: Optional[int] = None
  eval_every_epoch: bool = False
  warmup_epochs: Optional[float] = None
  norm_in_heads: bool = False

  @property
  def name(self) -> str:
    norm = "frozen" if self.bn_size == 0 else f"bn{self.bn_size}"
    half = "_half" if self.peak_scale != 1.0 else ""
    long = "_long" if self.policy != "normal" else ""
    warmup = (f"_wu{self.warmup_epochs:g}" if self.warmup_epochs is not None
              else "")
    heads = "_heads" if self.norm_in_heads else ""
    return f"bs{self.batch}_{norm}{half}{long}{warmup}{heads}_s{self.seed}"

  def realise(self, default_replicas: int = REPLICAS) -> Dict[str, int]:
    """Replicas, images per replica and CGBN group size (None if frozen).

    Raises:
      ValueError: the batch or BN size cannot be realised, saying why.
    """
    replicas = self.replicas or default_replicas
    if self.batch % replicas:
      raise ValueError(f"{self.name}: batch {self.batch} does not split "
                       f"evenly over {replicas} replicas")
    per_replica = self.batch // replicas
    if self.bn_size == 0:
      return dict(replicas=replicas, per_replica=per_replica, group_size=None)
    if self.bn_size > self.batch:
      raise ValueError(f"{self.name}: BN size {self.bn_size} exceeds the "
                       f"batch {self.batch}")
    if self.bn_size % per_replica:
      raise ValueError(
          f"{self.name}: BN size {self.bn_size} is not a multiple of the "
          f"{per_replica} images each of the {replicas} replicas holds at "
          f"batch {self.batch}; use more replicas or another BN size")
    group_size = self.bn_size // per_replica
    if replicas % group_size:
      raise ValueError(f"{self.name}: a BN group of {group_size} replicas "
                       f"does not divide the {replicas} replicas")
    return dict(replicas=replicas, per_replica=per_replica,
                group_size=group_size)


def _table2(seeds: Tuple[int, ...]) -> List[Run]:
  runs = [Run(16, 0)]
  for batch in (32, 64, 128):
    runs += [Run(batch, 0, seed=s) for s in seeds]
  for batch in (64, 128):
    runs += [Run(batch, 0, peak_scale=0.5, seed=s) for s in seeds]
  return runs


def study_runs(study: str, seeds: Tuple[int, ...] = TABLE2_SEEDS
               ) -> List[Run]:
  """The runs of one study, in the order they are trained."""
  if study == "table2":
    return _table2(seeds)
  if study == "table3":
    return ([Run(16, bn) for bn in (0, 2, 4, 8, 16)] +
            [Run(32, 32), Run(64, 64), Run(128, 32), Run(256, 32),
             # Beyond the paper: where linear scaling + warmup + CGBN starts
             # to fall behind. 16 replicas keep the BN size at 32.
             Run(512, 32, replicas=16)])
  if study == "fig4":
    # With the norm in the FPN and heads: batch 256 diverges without it here
    # (see "ablation").
    return [Run(16, 16, policy="long", eval_every_epoch=True,
                norm_in_heads=True),
            Run(256, 32, policy="long", eval_every_epoch=True,
                norm_in_heads=True)]
  if study == "ablation":
    # Beyond the paper: which part of the recipe large batches lack here.
    # Table 3's large batches stop in the new, unnormalized box head after a
    # warmup of a few steps, so: a longer warmup, the norm in the FPN and
    # heads too, and both; then the batches of Table 3 with the norm in the
    # heads. The first two rows are Table 3's, for reference.
    return [Run(16, 16), Run(256, 32),
            Run(256, 32, warmup_epochs=2),
            Run(256, 32, norm_in_heads=True),
            Run(256, 32, warmup_epochs=2, norm_in_heads=True),
            Run(16, 16, norm_in_heads=True),
            Run(64, 64, norm_in_heads=True),
            Run(128, 32, norm_in_heads=True),
            Run(512, 32, replicas=16, norm_in_heads=True)]
  raise ValueError(f"Unknown study {study!r}; use one of {STUDIES} or 'all'")


def table2_extra_seeds(outcomes: Dict[str, str]) -> List[Run]:
  """Table 2 runs to add: one more seed for each row whose seeds disagree.

  Args:
    outcomes: run name -> `converged` or `failed`, for the finished runs.
  """
  extra = []
  for run in _table2(TABLE2_SEEDS):
    if run.seed != TABLE2_SEEDS[0]:
      continue
    seen = {outcomes.get(dataclasses.replace(run, seed=s).name)
            for s in TABLE2_SEEDS}
    if seen == {"converged", "failed"}:
      extra.append(dataclasses.replace(run, seed=TABLE2_EXTRA_SEED))
  return extra
