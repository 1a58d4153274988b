"""The training run's data: the dataset, its split, and the cases in memory.

:func:`prepare_dataset` reads (or writes the phantoms of) ``config.data.root``
and validates every case; :func:`split_cases` and :func:`held_out_cases` say
which cases train, validate, and are held out as a cross-validation test fold
that training never sees.
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

import jax
import ml_collections
import numpy as np

from tversky_jax.configuration import ConfigError
from tversky_jax.data import nifti
from tversky_jax.data import synthetic


def prepare_dataset(config: ml_collections.ConfigDict
                    ) -> tuple[nifti.Dataset, list[str], list[str]]:
  """Reads (synthesising it first if allowed) and validates the dataset.

  Returns the dataset and the training and validation case ids (see
  :func:`split_cases`); a held-out cross-validation fold is in neither.
  """
  root = os.path.abspath(config.data.root)
  if config.data.synthesize_if_missing:
    # Only process 0 decides and writes; every process waits for it, so no
    # process races ahead on a half-visible shared folder.
    if jax.process_index() == 0 and not os.path.exists(root):
      _log(f"Writing synthetic lesion phantoms to {root} ...")
      synthetic.make_synthetic_dataset(
          root, num_cases=config.data.synthetic_cases,
          shape=tuple(config.data.synthetic_shape), seed=config.seed)
    _sync_processes("synthetic_dataset")
  if not os.path.exists(root):
    raise ConfigError(
        f"config.data.root={config.data.root!r}: no dataset there. Point it "
        "at an nnU-Net-layout folder or set "
        "--config.data.synthesize_if_missing=True for phantoms.")
  dataset = nifti.read_dataset(root)
  nifti.validate_dataset(dataset, split="train")
  cases = sorted(dataset.training_cases)
  return (dataset,) + split_cases(cases, config)


def held_out_cases(cases: Sequence[str], config: ml_collections.ConfigDict
                   ) -> list[str]:
  """The test fold of ``data.num_folds``-fold cross-validation (else none).

  Fold ``f`` holds out every case ``i`` (sorted by id) with
  ``i % num_folds == f``. Training never reads these cases, not even to
  validate or to choose a checkpoint: they are only predicted afterwards.
  """
  folds = config.data.num_folds
  if not folds:
    return []
  cases = sorted(cases)
  if folds > len(cases):
    raise ConfigError(
        f"config.data.num_folds={folds}: the dataset has only {len(cases)} "
        "training cases.")
  return [c for i, c in enumerate(cases) if i % folds == config.data.fold]


def split_cases(cases: Sequence[str], config: ml_collections.ConfigDict
                ) -> tuple[list[str], list[str]]:
  """(training, validation) case ids, both outside the held-out fold.

  Validation takes the last ``data.num_val_cases`` (by id) of the cases that
  :func:`held_out_cases` leaves for training.
  """
  held_out = set(held_out_cases(cases, config))
  cases = sorted(c for c in cases if c not in held_out)
  num_val = config.data.num_val_cases
  if num_val >= len(cases):
    where = " of the training fold" if held_out else ""
    raise ConfigError(
        f"config.data.num_val_cases={num_val}: only {len(cases)} cases"
        f"{where}; at least one must remain for training.")
  split = len(cases) - num_val
  return cases[:split], cases[split:]


def whole_volume_shape(cases, divisor: int) -> tuple[int, int, int]:
  """The largest case's spatial shape, rounded up to multiples of divisor."""
  largest = np.max([case.image.shape[:3] for case in cases], axis=0)
  return tuple(int(-(-s // divisor) * divisor) for s in largest)


def _sync_processes(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def _log(message: str) -> None:
  if jax.process_index() == 0:
    print(message, file=sys.stderr, flush=True)
