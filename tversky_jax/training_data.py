"""The training run's data: the dataset, its split, plan and cases in memory.

:func:`prepare_dataset` reads (or writes the phantoms of) ``config.data.root``
and validates every case; :func:`split_cases` and :func:`held_out_cases` say
which cases train, validate, and are held out as a cross-validation test fold
that training never sees. :func:`load` does all of it and, with
``data.preprocess`` (the default), plans the dataset (target spacing,
normalisation per modality; :mod:`tversky_jax.data.planning`) and trains
from the preprocessed cache (:mod:`tversky_jax.data.preprocessing`);
validation cases keep their original label so that validation scores the
prediction on each scan's own grid, as ``tversky-predict`` writes it.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Sequence

import jax
import ml_collections
import numpy as np

from tversky_jax import train_state as train_state_lib
from tversky_jax.configuration import ConfigError
from tversky_jax.data import nifti
from tversky_jax.data import pipeline
from tversky_jax.data import planning
from tversky_jax.data import preprocessing
from tversky_jax.data import synthetic
from tversky_jax.models import unet3d


@dataclasses.dataclass
class ValidationCase:
  """A validation case: the network's input and the reference to score.

  Attributes:
    case_id: the case.
    image: ``float32 [x, y, z, c]`` as the network sees it (normalised, and
      resampled to the plan's spacing when preprocessing).
    label: ``uint8 [X, Y, Z]`` on the scan's own grid.
    meta: how ``image`` maps back to the scan's grid; None when it is that
      grid already.
  """

  case_id: str
  image: np.ndarray
  label: np.ndarray
  meta: preprocessing.CaseMeta | None = None


@dataclasses.dataclass
class TrainingData:
  """Everything :func:`load` prepares for a training run."""

  dataset: nifti.Dataset
  plan: planning.Plan | None
  num_classes: int
  train_cases: list[pipeline.TrainingCase]
  val_cases: list[ValidationCase]


def num_classes_of(dataset: nifti.Dataset) -> int:
  """Classes of the softmax: every label value of dataset.json, 0 included."""
  return int(max(dataset.label_values)) + 1


def load(config: ml_collections.ConfigDict, workdir: str,
         progress: bool = True) -> TrainingData:
  """Reads, validates, (plans and preprocesses) and loads the run's cases.

  Args:
    config: ``data.*`` keys of ``configs/default.py``.
    workdir: the run's folder; the preprocessed cache goes to
      ``data.cache_dir`` or, when that is empty, ``workdir/preprocessed``.
    progress: progress bars (process 0 only).
  """
  dataset, train_ids, val_ids = prepare_dataset(config)
  num_classes = num_classes_of(dataset)
  progress = progress and jax.process_index() == 0
  if not config.data.preprocess:
    train = pipeline.load_training_cases(dataset, train_ids, progress=progress,
                                         num_classes=num_classes)
    val = [ValidationCase(c.case_id, c.image, c.label) for c in
           pipeline.load_training_cases(dataset, val_ids, progress=progress,
                                        num_classes=num_classes)
           ] if val_ids else []
    return TrainingData(dataset, None, num_classes, train, val)
  plan, folder = _plan_and_preprocess(config, dataset, workdir, progress)
  train = pipeline.load_preprocessed_cases(folder, train_ids, num_classes,
                                           progress=progress)
  val = []
  for case_id in val_ids:
    image, _, meta = preprocessing.load_preprocessed(folder, case_id)
    label = nifti.load_case(dataset, case_id).label
    val.append(ValidationCase(case_id, np.asarray(image), label, meta))
  return TrainingData(dataset, plan, num_classes, train, val)


def _plan_and_preprocess(config, dataset, workdir, progress):
  """(plan, folder of the cached cases); process 0 writes, the others wait."""
  out_dir = config.data.cache_dir or os.path.join(workdir, "preprocessed")
  options = planning.PlanOptions(
      base_features=config.model.base_features,
      normalization=tuple(config.data.normalization) or None)
  try:
    if jax.process_index() == 0:
      plan, _ = planning.plan_dataset(dataset, out_dir, options,
                                      progress=progress)
      summary = preprocessing.preprocess_dataset(dataset, plan, out_dir,
                                                 progress=progress)
      if summary.built:
        _log(f"Preprocessed {len(summary.built)} case(s) into "
             f"{summary.folder} (target spacing "
             f"{'x'.join(f'{s:g}' for s in plan.target_spacing)} mm).")
    _sync_processes("preprocessed")
    plan = planning.load_plan(out_dir)
  except (planning.MemoryBudgetError, OSError) as error:
    raise ConfigError(f"config.data.cache_dir={out_dir!r}: cannot plan or "
                      f"preprocess there ({error})") from None
  return plan, os.path.join(out_dir, preprocessing.CASES_DIR)


def class_names(dataset) -> list[str]:
  """Name of every softmax class (``class_k`` where dataset.json has none)."""
  names = {int(v): k for k, v in dataset.labels.items()
           if isinstance(v, int)}
  return [names.get(k, f"class_{k}")
          for k in range(num_classes_of(dataset))]


def model_spec(config, data: TrainingData
               ) -> train_state_lib.ModelSpec:
  """The network's shape for this run: channels, classes, strides, bias."""
  strides = tuple(tuple(int(v) for v in s) for s in config.model.strides)
  if not strides and data.plan is not None:
    strides = planning.stage_strides(data.plan.target_spacing,
                                     config.model.depth)
  if strides == unet3d.default_strides(config.model.depth):
    strides = ()  # the paper's network, and its parameter tree
  head_bias = None
  if config.model.head_bias == "prior":
    counts = sum(np.bincount(np.asarray(c.label).ravel(),
                             minlength=data.num_classes)[:data.num_classes]
                 for c in data.train_cases)
    head_bias = tuple(float(v) for v in
                      np.log((counts + 1.0) / (counts.sum() + 1.0)))
  return train_state_lib.ModelSpec(data.dataset.num_channels,
                                   data.num_classes, strides or None,
                                   head_bias)


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


def _sync_processes(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def _log(message: str) -> None:
  if jax.process_index() == 0:
    print(message, file=sys.stderr, flush=True)
