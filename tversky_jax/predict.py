"""Lesion masks for new NIfTI scans from a trained run.

Command line (``python -m tversky_jax.predict`` or ``tversky-predict``)::

  # every case of an nnU-Net-layout dataset's imagesTs/ (or of any folder of
  # CASE_XXXX.nii.gz channel files)
  tversky-predict --workdir runs/demo --input data/Dataset001_Lesions \
      --output predictions/ [--save-probabilities]
  # one case from explicit channel files, in the training channel order
  tversky-predict --workdir runs/demo --channels t1.nii.gz t2.nii.gz \
      flair.nii.gz --case-id patient07 --output predictions/

Per case it writes ``CASE.nii.gz``, the uint8 lesion mask
(``probability >= threshold``), and with
``--save-probabilities`` ``CASE_prob.nii.gz``, the float32 lesion probability,
both on exactly the grid of the case's first channel file (same shape,
affine, qform/sform codes), so a viewer overlays them on the scan.

The threshold: ``--threshold NUMBER``; ``--threshold chosen``, the one
chosen on the validation cases during training and stored with the
checkpoint (its ``operating_point``, see :mod:`tversky_jax.operating_point`);
by default the saved config's ``inference.threshold``, 0.5 as in the paper.
The chosen one is opt-in: picked on a few validation cases it helped one
held-out task and hurt another (docs/real_data.md).
The summary line says which one it used. Models with more than two classes
write the most probable class and use no threshold.

Function API (used by the replication sweep, no subprocess)::

  predictor = load_predictor("runs/demo", checkpoint="best")
  prob = predictor.predict_probability(nifti.normalize_image(image))
  report = predict_cases(predictor, find_cases("data/.../imagesTs",
                         predictor.channel_names)[0], "predictions/")

Conventions: images are channels-last ``[x, y, z, channels]`` in NIfTI voxel
order (no reorientation), channels in the order of the training dataset's
dataset.json (nnU-Net suffixes ``_0000``, ``_0001``, ...). Preprocessing is
:func:`tversky_jax.data.nifti.normalize_image`, the function training uses;
inference is :func:`tversky_jax.validation.class_probabilities` (Gaussian-
blended sliding windows, batches sharded over all local devices, the
full-resolution accumulators on the host).

Exit status of the command: 0 when every case was written, 1 when a case
failed (it is reported and skipped, the others are still written) or the run
could not start (no checkpoint, bad paths, channel mismatch: a one-line
``error: ...`` message), 2 for invalid arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from tversky_jax import operating_point
from tversky_jax import validation
from tversky_jax import train_state
from tversky_jax import checkpoint as checkpoint_lib
from tversky_jax import parallel
from tversky_jax.data import nifti
from tversky_jax.data import planning
from tversky_jax.data import preprocessing

OUTPUT_ENDING = ".nii.gz"
PROBABILITY_SUFFIX = "_prob"

_CHANNEL_FILE_RE = re.compile(
    r"^(?P<case>.+)_(?P<channel>\d{4})(?P<ending>\.nii\.gz|\.nii)$")


class PredictError(ValueError):
  """A problem the user can fix (paths, checkpoint, channels); one line."""


# --------------------------------------------------------------------------
# The predictor
# --------------------------------------------------------------------------


class Predictor:
  """A trained (or freshly initialised) U-Net ready for whole-volume prediction.

  Attributes:
    config: the training config of the checkpoint (``configs/default.py``
      keys; JSON lists where the file had tuples).
    step: the checkpoint's training step (None for an untrained model).
    channel_names: the input channels, in order (``len`` = model input
      channels).
    window: sliding window ``(wx, wy, wz)``, each a multiple of
      ``2**config.model.depth``; None: the whole volume, padded up to such a
      multiple (for models trained on whole volumes).
    overlap: fraction of the window shared by neighbouring windows.
    batch_size: windows per device call (rounded up to a multiple of the
      device count).
    mirror: average over the 8 flips of the spatial axes (8x the compute).
    threshold: a voxel is lesion when its probability is ``>= threshold``.
    threshold_source: where :attr:`threshold` comes from, for the log.
    devices: the local devices the windows of a batch are sharded over.
  """

  def __init__(self, config: ml_collections.ConfigDict, graphdef: Any,
               state: Any, *, channel_names: Sequence[str],
               step: int | None = None,
               spec: train_state.ModelSpec | None = None,
               plan: planning.Plan | None = None,
               window: Sequence[int] | None = None,
               overlap: float | None = None, batch_size: int | None = None,
               mirror: bool | None = None, threshold: float | None = None,
               threshold_source: str | None = None,
               devices: Sequence[jax.Device] | None = None):
    """Wraps a model state; ``None`` settings come from ``config.inference``.

    Args:
      config: the model's training config.
      graphdef: ``nnx.GraphDef`` of :func:`abstract_model_state` (the model
        alone) or of :func:`train_state.create_train_state` (model and
        optimizer; the optimizer is not used).
      state: the matching state, replicated over ``devices``.
      channel_names: input channel names in order.
      step: the training step of ``state``, for reports.
      spec: the network's shape (classes, strides); default: two classes,
        ``config.model.depth`` stages of 2x2x2 pooling.
      plan: the training data's plan: a scan is preprocessed with it
        (cropped, normalised by modality, resampled to its spacing) and the
        probabilities are resampled back to the scan's grid. None: the scan
        is z-scored on its own grid (runs trained without preprocessing).
      window: sliding-window size; default ``config.inference.window``, or
        ``config.data.patch_shape`` when that is empty, or the whole volume
        when both are.
      overlap: default ``config.inference.overlap``.
      batch_size: default ``config.inference.batch_size``.
      mirror: default ``config.inference.mirror``.
      threshold: default ``config.inference.threshold``.
      threshold_source: where ``threshold`` comes from; default "given" or
        "the config's inference.threshold".
      devices: default ``jax.local_devices()``.

    Raises:
      PredictError: a setting is out of range or the window is not a multiple
        of ``2**config.model.depth``.
    """
    self.config = config
    self.step = step
    self.channel_names = tuple(channel_names)
    self.devices = list(jax.local_devices() if devices is None else devices)
    self._state = state
    self._logits = train_state.make_logits_fn(graphdef)
    inf = config.inference
    self.spec = spec or train_state.ModelSpec(len(self.channel_names))
    self.plan = plan
    self.divisors = self.spec.divisors(config.model.depth)
    if window is None:
      window = tuple(inf.window) or tuple(config.data.patch_shape) or None
    self.window = None if window is None else tuple(int(w) for w in window)
    self.overlap = float(inf.overlap if overlap is None else overlap)
    self.batch_size = int(inf.batch_size if batch_size is None else batch_size)
    self.mirror = bool(inf.mirror if mirror is None else mirror)
    self.threshold = float(inf.threshold if threshold is None else threshold)
    self.threshold_source = threshold_source or (
        "the config's inference.threshold" if threshold is None else "given")
    self._check_settings()

  def _check_settings(self) -> None:
    if self.window is not None and (
        len(self.window) != 3 or
        any(w <= 0 or w % d for w, d in zip(self.window, self.divisors))):
      raise PredictError(
          f"window {self.window}: expected 3 sizes, each a positive multiple "
          f"of the network's divisors {self.divisors} (x, y, z; 2**depth = "
          f"{2 ** self.config.model.depth} for depth "
          f"{self.config.model.depth} without anisotropic strides)")
    if not 0.0 <= self.overlap < 1.0:
      raise PredictError(f"overlap {self.overlap}: must be in [0, 1)")
    if self.batch_size < 1:
      raise PredictError(f"batch size {self.batch_size}: must be >= 1")
    if not 0.0 <= self.threshold <= 1.0:
      raise PredictError(f"threshold {self.threshold}: must be in [0, 1]")

  def describe_threshold(self) -> str:
    """How masks are made, e.g. ``threshold 0.35 (chosen on 2 validation
    cases at step 4)``."""
    if self.num_classes != 2:
      return f"the most probable of {self.num_classes} classes"
    return f"threshold {self.threshold:g} ({self.threshold_source})"

  @property
  def num_channels(self) -> int:
    return len(self.channel_names)

  def window_for(self, shape: Sequence[int]) -> tuple[int, int, int]:
    """The window used for a volume of spatial ``shape`` ``(x, y, z)``."""
    if self.window is not None:
      return self.window  # type: ignore[return-value]
    return tuple(int(-(-s // d) * d) for s, d in
                 zip(shape, self.divisors))  # type: ignore[return-value]

  def logits(self, images: jax.Array | np.ndarray) -> jax.Array:
    """Jitted forward pass: ``[n, x, y, z, channels]`` -> logits
    ``[n, x, y, z, K]`` (float32; class 0 background); every spatial size a
    multiple of :attr:`divisors`."""
    return self._logits(self._state, images)

  @property
  def num_classes(self) -> int:
    return self.spec.num_classes

  def predict_probabilities(self, image: np.ndarray,
                            progress: bool = False) -> np.ndarray:
    """Softmax probabilities of one image as the network sees it.

    Args:
      image: ``[x, y, z, channels]`` (channels last, NIfTI axis order, the
        channels in :attr:`channel_names` order), normalised (and resampled)
        as in training (:meth:`predict_files` does it from the files).
      progress: show a tqdm bar over the sliding windows.

    Returns:
      float32 ``[x, y, z, K]``, Gaussian-blended over the sliding windows
      (and mirror-averaged when :attr:`mirror`).

    Raises:
      PredictError: the image is not 4-D or has the wrong channel count.
    """
    image = np.asarray(image)
    if image.ndim != 4 or image.shape[-1] != self.num_channels:
      raise PredictError(
          f"expected an image [x, y, z, {self.num_channels}] (channels "
          f"{', '.join(self.channel_names)}), got shape {image.shape}")
    return validation.class_probabilities(
        image, self.logits, self.window_for(image.shape[:3]),
        overlap=self.overlap, batch_size=self.batch_size, mirror=self.mirror,
        devices=self.devices, progress=progress)

  def predict_probability(self, image: np.ndarray,
                          progress: bool = False) -> np.ndarray:
    """float32 ``[x, y, z]`` lesion probability ``1 - p(background)`` of a
    two-class model (see :meth:`predict_probabilities`)."""
    return 1.0 - self.predict_probabilities(image, progress)[..., 0]

  def predict_mask(self, probabilities: np.ndarray) -> np.ndarray:
    """uint8 ``[x, y, z]`` segmentation.

    ``probabilities`` is a lesion probability ``[x, y, z]`` (a voxel is 1
    where it is ``>= threshold``) or the class probabilities ``[x, y, z,
    K]`` (two classes: the same threshold on class 1; more: the most
    probable class).
    """
    probabilities = np.asarray(probabilities)
    if probabilities.ndim == 3:
      return (probabilities >= self.threshold).astype(np.uint8)
    return validation.segment(probabilities, self.threshold)

  def predict_files(self, paths: Sequence[str | os.PathLike[str]],
                    progress: bool = False
                    ) -> tuple[np.ndarray, np.ndarray, Any]:
    """Reads, preprocesses and predicts one case given by its channel files.

    With a :attr:`plan` the scan is cropped, normalised and resampled as the
    training data were, and the probabilities are resampled back to the
    scan's own grid; without one it is z-scored on its own grid.

    Args:
      paths: one NIfTI file per channel, in :attr:`channel_names` order.
      progress: show a tqdm bar over the sliding windows.

    Returns:
      ``(probabilities, affine [4, 4], header)`` on the grid of the first
      channel file, whose affine and header these are: float32 ``[x, y, z]``
      lesion probability for a two-class model, else ``[x, y, z, K]``.

    Raises:
      PredictError: wrong number of files.
      tversky_jax.data.nifti.DatasetError: a file is missing, unreadable, not
        3-D, holds NaN/Inf, or is on another grid than the first one.
    """
    if len(paths) != self.num_channels:
      raise PredictError(_channel_count_message(self.channel_names, paths))
    image, affine, header = nifti.load_image_files(paths)
    if self.plan is None:
      probs = self.predict_probabilities(nifti.normalize_image(image),
                                         progress)
    else:
      prepared, _, meta = preprocessing.preprocess_case(
          image, planning.case_spacing(header), affine, self.plan)
      probs = preprocessing.resample_to_original(
          self.predict_probabilities(prepared, progress), meta)
    if self.num_classes == 2:
      probs = 1.0 - probs[..., 0]
    return np.asarray(probs, np.float32), affine, header


def load_predictor(workdir: str | os.PathLike[str],
                   checkpoint: str | int = "best", *,
                   channel_names: Sequence[str] | None = None,
                   devices: Sequence[jax.Device] | None = None,
                   window: Sequence[int] | None = None,
                   overlap: float | None = None, batch_size: int | None = None,
                   mirror: bool | None = None,
                   threshold: float | str | None = None) -> Predictor:
  """Restores a trained model from ``workdir`` for prediction.

  Only the model's variables are read from the checkpoint (see
  :func:`abstract_model_state`); the optimizer state is neither read nor
  allocated. The model config is the one stored with the checkpoint (falling
  back to ``workdir/config.json``). The input channels are, in this order of
  preference: ``channel_names``; ``channel_names`` in the checkpoint's
  metadata (if the trainer stores them); those of the training dataset's
  dataset.json (``config.data.root``, looked up as given, relative to the
  current directory, and relative to the workdir and its parents).

  Args:
    workdir: the training run's directory (holds ``checkpoints/``).
    checkpoint: ``"best"`` (best validation ``config.train.best_metric``;
      the latest when no checkpoint has metrics), ``"latest"``, or a step.
    channel_names: input channel names in order; needed when the training
      dataset.json cannot be found.
    devices: local devices to shard the windows over (default all).
    window, overlap, batch_size, mirror: override ``config.inference``
      (see :class:`Predictor`).
    threshold: a number, or ``"chosen"``: the checkpoint's operating point
      (the threshold chosen on the validation cases); default
      ``config.inference.threshold``.

  Returns:
    The :class:`Predictor`.

  Raises:
    PredictError: no workdir or checkpoint, unknown step, unknown channels,
      or a checkpoint that does not fit the model of its config.
  """
  workdir = Path(workdir)
  ckpt_dir = workdir / "checkpoints"
  if not workdir.is_dir():
    raise PredictError(f"--workdir {workdir}: no such directory")
  if not ckpt_dir.is_dir():
    raise PredictError(
        f"no checkpoint in {workdir} (no checkpoints/ folder); train first "
        "with train.py --workdir")
  manager = checkpoint_lib.CheckpointManager(ckpt_dir, async_save=False,
                                             best_metric=None)
  try:
    steps = manager.all_steps()
    if not steps:
      raise PredictError(f"no checkpoint in {ckpt_dir}; train first")
    step, how = _select_step(manager, workdir, checkpoint, steps)
    meta = manager.restore_meta(step)
    config = _load_config(meta, step, workdir)
    trained_on = (tuple(meta["channel_names"]) if meta.get("channel_names")
                  else _training_channel_names(config, workdir))
    names = tuple(channel_names) if channel_names else trained_on
    if channel_names and trained_on and len(names) != len(trained_on):
      raise PredictError(
          f"{len(names)} channel name(s) given ({', '.join(names)}) but the "
          f"model was trained on {len(trained_on)} channel(s) "
          f"({', '.join(trained_on)})")
    if not names:
      raise PredictError(
          f"cannot find the training dataset {config.data.root!r} of {workdir} "
          "(its dataset.json names the input channels); pass the channel "
          "names (--channel-names T1 T2 FLAIR)")
    devices = list(jax.local_devices() if devices is None else devices)
    spec = (train_state.ModelSpec.from_dict(meta["model"])
            if meta.get("model") else train_state.ModelSpec(len(names)))
    spec = dataclasses.replace(spec, in_channels=len(names))
    plan = planning.Plan.from_json(meta["plan"]) if meta.get("plan") else None
    graphdef, abstract = abstract_model_state(config, spec,
                                              parallel.make_mesh(devices))
    try:
      state = manager.restore_subtree(abstract, step)
    except checkpoint_lib.CheckpointError as error:
      raise PredictError(
          f"{_one_line(error)} (does the model of the saved config with "
          f"{len(names)} input channel(s) {', '.join(names)} match it?)"
      ) from None
  finally:
    manager.close()
  _log(f"Restored the {how} checkpoint (step {step}) of {workdir}.")
  threshold, source = _threshold(threshold, meta, step)
  return Predictor(config, graphdef, state, channel_names=names,
                   step=step, spec=spec, plan=plan, window=window,
                   overlap=overlap,
                   batch_size=batch_size, mirror=mirror, threshold=threshold,
                   threshold_source=source, devices=devices)


CHOSEN = "chosen"


def _threshold_arg(text: str) -> float | str:
  """``--threshold``: a number or :data:`CHOSEN`."""
  if text == CHOSEN:
    return text
  try:
    return float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(
        f"expected a number or {CHOSEN!r}, got {text!r}") from None


def _threshold(given: float | str | None, meta: dict[str, Any],
               step: int) -> tuple[float | None, str | None]:
  """(threshold, where it comes from) for :class:`Predictor`: a number as
  given; for :data:`CHOSEN` the checkpoint's operating point; for None
  (None, None): the config's."""
  if given != CHOSEN:
    return given, None
  point = operating_point.OperatingPoint.from_dict(
      meta.get(operating_point.META_KEY))
  if point is None:
    raise PredictError(
        f"--threshold chosen: the checkpoint of step {step} stores no "
        "operating point (it was not validated, or trained before operating "
        "points); give a number")
  return point.threshold, (
      f"chosen on {point.cases} validation case"
      f"{'s' if point.cases != 1 else ''} at step {step}, "
      f"{point.metric} {point.at_default:.4f} -> {point.at_threshold:.4f}")


def abstract_model_state(config: ml_collections.ConfigDict,
                         spec: train_state.ModelSpec | int,
                         mesh: jax.sharding.Mesh) -> tuple[Any, Any]:
  """``(graphdef, state of jax.ShapeDtypeStruct)`` of the model alone.

  The train state of :func:`train_state.create_train_state` is
  ``nnx.split((model, optimizer))``, the pytree ``{0: the model's variables
  (parameters, and batch statistics with batch norm), 1: the optimizer's
  state (step, moments)}``. This is ``nnx.split((model, None))``: key 0
  alone, so it is the partial restore target of a checkpoint
  (:meth:`checkpoint.CheckpointManager.restore_subtree` reads no optimizer
  moment) and :func:`train_state.make_logits_fn` runs on it unchanged. It is
  traced with :func:`jax.eval_shape`, so nothing is initialised or compiled
  (on CPU the eager initialisation of the U-Net costs ~25 s of XLA
  compilation); the leaves are replicated over ``mesh``.
  """
  spec = train_state.ModelSpec(spec) if isinstance(spec, int) else spec
  captured = {}

  def init():
    model = train_state.build_model(config, spec, config.seed, mesh.size)
    captured["graphdef"], state = nnx.split((model, None))
    return state

  shapes = jax.eval_shape(init)
  replicated = parallel.replicated(mesh)
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
      shapes)
  return captured["graphdef"], abstract


def _select_step(manager: checkpoint_lib.CheckpointManager, workdir: Path,
                 checkpoint: str | int, steps: list[int]) -> tuple[int, str]:
  """The step ``checkpoint`` names, and how it was chosen (for the log)."""
  if checkpoint == "latest":
    return steps[-1], "latest"
  if checkpoint == "best":
    config = _read_config_json(workdir) or (
        manager.restore_meta(steps[-1]).get("config") or {})
    metric = config.get("train", {}).get("best_metric")
    best = _best_step(manager, steps, metric) if metric else None
    if best is None:
      return steps[-1], "latest (no checkpoint has validation metrics)"
    return best, f"best by validation {metric}"
  try:
    step = int(checkpoint)
  except (TypeError, ValueError):
    raise PredictError(
        f"--checkpoint {checkpoint!r}: expected best, latest or a step "
        "number") from None
  if step not in steps:
    raise PredictError(
        f"--checkpoint {step}: no checkpoint of that step in "
        f"{manager.directory}; available: {steps}")
  return step, f"step {step}"


def _best_step(manager: checkpoint_lib.CheckpointManager, steps: list[int],
               metric: str) -> int | None:
  """The step with the highest saved validation ``metric`` (ties: latest).

  All of train_lib's checkpoint metrics are higher-is-better. None when no
  checkpoint has the metric (e.g. trained with ``train.eval_every=0``).
  """
  best, best_value = None, -np.inf
  for step in steps:
    value = (manager.restore_meta(step).get("metrics") or {}).get(metric)
    if value is not None and np.isfinite(value) and value >= best_value:
      best, best_value = step, float(value)
  return best


def _read_config_json(workdir: Path) -> dict[str, Any] | None:
  path = workdir / "config.json"
  if not path.is_file():
    return None
  try:
    return json.loads(path.read_text())
  except (OSError, json.JSONDecodeError) as error:
    raise PredictError(f"{path}: cannot read ({error})") from None


def _load_config(meta: dict[str, Any], step: int,
                 workdir: Path) -> ml_collections.ConfigDict:
  """The config saved with the checkpoint, else workdir/config.json."""
  config = meta.get("config") or _read_config_json(workdir)
  if not config:
    raise PredictError(
        f"neither the checkpoint of step {step} nor {workdir}/config.json "
        "holds the training config")
  return ml_collections.ConfigDict(config)


def _training_channel_names(config: ml_collections.ConfigDict,
                            workdir: Path) -> tuple[str, ...] | None:
  """Channel names from the training dataset.json, if it can be found."""
  root = Path(config.data.root)
  if root.is_absolute():
    candidates = [root]
  else:
    base = workdir.resolve()
    candidates = [Path.cwd() / root] + [d / root for d in (base, *base.parents)]
  for candidate in candidates:
    if (candidate / "dataset.json").is_file():
      try:
        return nifti.read_dataset(candidate).channel_names
      except nifti.DatasetError:
        continue
  return None


# --------------------------------------------------------------------------
# Finding cases
# --------------------------------------------------------------------------


@dataclasses.dataclass
class CaseInputs:
  """The cases found in an input folder.

  Attributes:
    cases: case id -> channel files in channel order, for complete cases.
    problems: case id -> why it cannot be predicted (e.g. a missing
      channel), for incomplete cases; predicting reports them as failed.
    ignored: file names that are not ``CASE_XXXX.nii(.gz)``.
  """

  cases: dict[str, tuple[Path, ...]]
  problems: dict[str, str]
  ignored: list[str]


def find_cases(folder: str | os.PathLike[str],
               channel_names: Sequence[str]) -> CaseInputs:
  """Finds the cases to predict in ``folder``.

  ``folder`` is either an nnU-Net raw dataset root (holds dataset.json; its
  ``imagesTs/`` is predicted, and its dataset.json channel names must equal
  ``channel_names``, case-insensitively), or a folder of
  ``CASE_XXXX.nii.gz`` / ``CASE_XXXX.nii`` files (``XXXX`` the channel index).

  Args:
    folder: the input folder.
    channel_names: the model's input channels, in order.

  Returns:
    :class:`CaseInputs`. A case missing a channel file, or with a channel
    index beyond the model's, is listed in ``problems`` naming the file and
    channel.

  Raises:
    PredictError: no such folder, a dataset.json with other channels, or no
      case at all.
  """
  folder = Path(folder)
  if not folder.is_dir():
    raise PredictError(f"--input {folder}: no such directory")
  if (folder / "dataset.json").is_file():
    try:
      dataset = nifti.read_dataset(folder)
    except nifti.DatasetError as error:
      raise PredictError(_one_line(error)) from None
    given = [n.strip().lower() for n in dataset.channel_names]
    if given != [n.strip().lower() for n in channel_names]:
      raise PredictError(
          f"{folder}/dataset.json lists the channels "
          f"({', '.join(dataset.channel_names)}) but the model was trained on "
          f"({', '.join(channel_names)}), in this order")
    images = folder / "imagesTs"
    if not images.is_dir():
      raise PredictError(
          f"{folder} has no imagesTs/ folder to predict; pass --input "
          f"{folder}/imagesTr to predict the training images")
    folder = images
  files: dict[str, dict[int, Path]] = {}
  ignored = []
  for path in sorted(folder.iterdir()):
    if path.name.startswith(".") or not path.is_file():
      continue
    match = _CHANNEL_FILE_RE.match(path.name)
    if match is None:
      if path.name.endswith(nifti.SUPPORTED_FILE_ENDINGS):
        ignored.append(path.name)
      continue
    files.setdefault(match["case"], {})[int(match["channel"])] = path
  if not files:
    raise PredictError(
        f"--input {folder}: no CASE_XXXX.nii.gz channel files found")
  if ignored:
    _log(f"warning: ignoring {len(ignored)} file(s) in {folder} not named "
         f"CASE_XXXX.nii.gz: {', '.join(ignored[:5])}"
         + (", ..." if len(ignored) > 5 else ""))
  cases, problems = {}, {}
  for case_id, channels in sorted(files.items()):
    missing = [f"{case_id}_{c:04d} ({name})"
               for c, name in enumerate(channel_names) if c not in channels]
    extra = sorted(c for c in channels if c >= len(channel_names))
    if missing:
      problems[case_id] = (
          f"missing channel file(s) {', '.join(missing)} in {folder}; the "
          f"model needs {len(channel_names)} channels "
          f"({', '.join(channel_names)})")
    elif extra:
      problems[case_id] = (
          f"has channel file(s) {', '.join(f'{c:04d}' for c in extra)} but the "
          f"model was trained on {len(channel_names)} channel(s) "
          f"({', '.join(channel_names)})")
    else:
      cases[case_id] = tuple(channels[c] for c in range(len(channel_names)))
  return CaseInputs(cases=cases, problems=problems, ignored=ignored)


def _channel_count_message(channel_names: Sequence[str],
                           paths: Sequence[Any]) -> str:
  names = list(channel_names)
  message = (f"the model expects {len(names)} channel file(s), in this order: "
             f"{', '.join(names)}; got {len(paths)}")
  if len(paths) < len(names):
    message += f" (missing: {', '.join(names[len(paths):])})"
  return message


def case_id_from_path(path: str | os.PathLike[str]) -> str:
  """``dir/patient7_0000.nii.gz`` -> ``patient7``; ``t1.nii`` -> ``t1``."""
  name = Path(path).name
  match = _CHANNEL_FILE_RE.match(name)
  if match:
    return match["case"]
  for ending in nifti.SUPPORTED_FILE_ENDINGS:
    if name.endswith(ending):
      return name[:-len(ending)]
  return name


# --------------------------------------------------------------------------
# Predicting cases
# --------------------------------------------------------------------------


@dataclasses.dataclass
class PredictionReport:
  """What :func:`predict_cases` did.

  Attributes:
    masks: case id -> written ``CASE.nii.gz`` mask.
    probabilities: case id -> written ``CASE_prob.nii.gz`` (if requested).
    failed: case id -> one-line reason; nothing was written for it.
  """

  masks: dict[str, Path] = dataclasses.field(default_factory=dict)
  probabilities: dict[str, Path] = dataclasses.field(default_factory=dict)
  failed: dict[str, str] = dataclasses.field(default_factory=dict)

  @property
  def ok(self) -> bool:
    return not self.failed


def predict_cases(predictor: Predictor,
                  cases: Mapping[str, Sequence[str | os.PathLike[str]]],
                  output_dir: str | os.PathLike[str], *,
                  save_probabilities: bool = False,
                  problems: Mapping[str, str] | None = None,
                  progress: bool = True) -> PredictionReport:
  """Predicts every case and writes its mask (and probability) NIfTI.

  Each output has the shape, affine and qform/sform codes of the case's
  first channel file (its display range ``cal_min/cal_max`` is reset).
  A case that fails (missing or unreadable file, wrong grid, device out of
  memory, a failed write) is reported on stderr, anything it half wrote is
  removed, and the others are still written. Ctrl-C stops at once.

  Args:
    predictor: from :func:`load_predictor`.
    cases: case id -> channel files in ``predictor.channel_names`` order.
    output_dir: created if missing; gets ``CASE.nii.gz`` (uint8 mask, 1 =
      lesion) and, with ``save_probabilities``, ``CASE_prob.nii.gz``
      (float32 lesion probability).
    save_probabilities: also write the probability maps.
    problems: case id -> reason, for cases known to be unusable (from
      :func:`find_cases`); reported as failed.
    progress: tqdm bars over the cases and the windows of each case.

  Returns:
    A :class:`PredictionReport`.
  """
  output_dir = Path(output_dir)
  output_dir.mkdir(parents=True, exist_ok=True)
  report = PredictionReport()
  for case_id, reason in sorted((problems or {}).items()):
    report.failed[case_id] = reason
    _log(f"error: case {case_id}: {reason}")
  bar = tqdm(sorted(cases.items()), desc="cases", unit="case",
             disable=not progress, dynamic_ncols=True)
  for case_id, paths in bar:
    bar.set_postfix_str(case_id)
    try:
      prob, affine, header = predictor.predict_files(list(paths), progress)
      header = _output_header(header)
      mask_path = output_dir / f"{case_id}{OUTPUT_ENDING}"
      if save_probabilities:
        report.probabilities[case_id] = nifti.write_nifti(
            output_dir / f"{case_id}{PROBABILITY_SUFFIX}{OUTPUT_ENDING}",
            prob, affine, header, dtype=np.float32)
      report.masks[case_id] = nifti.write_nifti(
          mask_path, predictor.predict_mask(prob), affine, header,
          dtype=np.uint8)
    except Exception as error:  # pylint: disable=broad-except
      # Unreadable files, a wrong grid, device out of memory, a full disk:
      # report the case, drop what it half wrote, go on with the others.
      for written in (report.masks, report.probabilities):
        path = written.pop(case_id, None)
        if path is not None:
          path.unlink(missing_ok=True)
      report.failed[case_id] = _one_line(error)
      _log(f"error: case {case_id}: {report.failed[case_id]}")
  bar.close()
  return report


def _output_header(header: Any) -> Any:
  """The input header with intensity display settings cleared."""
  header = header.copy()
  header["cal_min"] = 0
  header["cal_max"] = 0
  header["intent_code"] = 0
  return header


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="tversky-predict",
      description=(
          "Lesion masks for new NIfTI scans from a trained run. Writes "
          "OUTPUT/CASE.nii.gz (uint8 mask, on the input's grid) per case and, "
          "with --save-probabilities, OUTPUT/CASE_prob.nii.gz (float32)."),
      epilog=(
          "Exit status: 0 all cases written; 1 a case failed (the others are "
          "written) or the run could not start; 2 invalid arguments."))
  parser.add_argument("--workdir", required=True,
                      help="the training run's directory (holds checkpoints/)")
  parser.add_argument("--checkpoint", default="best",
                      help="best (by validation metric; the latest when none "
                      "was validated), latest, or a step number "
                      "(default: best)")
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--input", metavar="DIR",
                      help="an nnU-Net raw dataset root (predicts its "
                      "imagesTs/) or a folder of CASE_XXXX.nii.gz files")
  source.add_argument("--channels", nargs="+", metavar="FILE",
                      help="the channel files of one case, in the training "
                      "channel order (e.g. T1 T2 FLAIR)")
  parser.add_argument("--case-id",
                      help="output name for --channels (default: the first "
                      "file's name without _0000 and extension)")
  parser.add_argument("--output", required=True, metavar="DIR",
                      help="output folder (created if missing)")
  parser.add_argument("--threshold", type=_threshold_arg,
                      help="lesion where probability >= threshold: a number, "
                      "or 'chosen' for the one chosen on the validation cases "
                      "during training and stored with the checkpoint "
                      "(default: the saved config's, 0.5)")
  parser.add_argument("--save-probabilities", action="store_true",
                      help="also write CASE_prob.nii.gz (float32)")
  parser.add_argument("--window", type=int, nargs=3, metavar=("X", "Y", "Z"),
                      help="sliding window (default: the saved config's "
                      "inference.window or data.patch_shape)")
  parser.add_argument("--overlap", type=float,
                      help="window overlap in [0, 1) (default: saved config)")
  parser.add_argument("--batch-size", type=int,
                      help="windows per device batch (default: saved config)")
  parser.add_argument("--mirror", action=argparse.BooleanOptionalAction,
                      default=None,
                      help="mirroring test-time augmentation, 8x compute "
                      "(default: saved config)")
  parser.add_argument("--channel-names", nargs="+", metavar="NAME",
                      help="the model's input channels, in order; only needed "
                      "when the training dataset.json cannot be found")
  parser.add_argument("--no-progress", action="store_true",
                      help="no progress bars")
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the command line; returns the exit status (see the module doc)."""
  parser = build_parser()
  args = parser.parse_args(argv)
  if args.case_id is not None and args.channels is None:
    parser.error("--case-id goes with --channels")
  try:
    predictor = load_predictor(
        args.workdir, args.checkpoint, channel_names=args.channel_names,
        window=args.window, overlap=args.overlap, batch_size=args.batch_size,
        mirror=args.mirror, threshold=args.threshold)
    if args.channels is not None:
      if len(args.channels) != predictor.num_channels:
        raise PredictError(
            "--channels: " + _channel_count_message(predictor.channel_names,
                                                    args.channels))
      case_id = args.case_id or case_id_from_path(args.channels[0])
      inputs = CaseInputs({case_id: tuple(Path(p) for p in args.channels)},
                          {}, [])
    else:
      inputs = find_cases(args.input, predictor.channel_names)
  except (PredictError, checkpoint_lib.CheckpointError,
          nifti.DatasetError) as error:
    print(f"error: {_one_line(error)}", file=sys.stderr)
    return 1
  report = predict_cases(predictor, inputs.cases, args.output,
                         save_probabilities=args.save_probabilities,
                         problems=inputs.problems,
                         progress=not args.no_progress)
  total = len(report.masks) + len(report.failed)
  print(f"Wrote {len(report.masks)} of {total} mask(s) to "
        f"{os.path.abspath(args.output)} at "
        f"{predictor.describe_threshold()}")
  if report.failed:
    print(f"error: {len(report.failed)} case(s) failed: "
          f"{', '.join(sorted(report.failed))}", file=sys.stderr)
    return 1
  return 0


def _one_line(error: BaseException) -> str:
  """The message on one line (DatasetError lists its problems on lines)."""
  text = ""
  for part in str(error).splitlines():
    part = part.strip(" -")
    if part:
      text += ("" if not text else " " if text.endswith(":") else "; ") + part
  return text


def _log(message: str) -> None:
  tqdm.write(message, file=sys.stderr)


if __name__ == "__main__":
  sys.exit(main())
