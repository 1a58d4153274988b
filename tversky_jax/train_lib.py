"""Training and validation of the 3D U-Net with the Tversky loss family.

``train_and_evaluate(config, workdir)`` is the whole job: it prepares the
dataset, builds the model and optimizer, resumes from the latest checkpoint in
``workdir`` if there is one, trains with one jitted data-parallel step, runs
sliding-window validation with the paper's metrics, and keeps checkpoints.
``train.py`` only parses flags and calls it.

Data parallelism: the global batch is sharded over a 1-D mesh of every device
(``tversky_jax.parallel``); parameters and optimizer state are replicated, and
XLA inserts the gradient all-reduce. The result equals a single-device run on
the same global batch up to float rounding.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from flax import nnx

from tversky_jax import checkpoint as checkpoint_lib
from tversky_jax import inference
from tversky_jax import losses
from tversky_jax import metrics as metrics_lib
from tversky_jax import parallel
from tversky_jax.data import nifti
from tversky_jax.data import pipeline
from tversky_jax.data import synthetic
from tversky_jax.models import unet3d

LOSSES = ("tversky", "dice", "focal_tversky", "tversky_ce")
OPTIMIZERS = ("adam", "adamw", "sgd")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
METRICS = ("dsc", "sensitivity", "specificity", "precision", "f2", "apr")

TrainState = Any  # nnx.State of (model, optimizer)


class ConfigError(ValueError):
  """A configuration value is invalid; the message is one line."""


class TrainingDiverged(RuntimeError):
  """The loss became NaN or infinite."""


# --------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------


def validate_config(config: ml_collections.ConfigDict,
                    num_devices: int | None = None) -> None:
  """Checks every value before anything is compiled or read.

  Raises:
    ConfigError: naming the first bad key, its value and what is expected.
  """
  num_devices = jax.device_count() if num_devices is None else num_devices

  def require(condition: bool, key: str, expected: str):
    if not condition:
      value = _lookup(config, key)
      raise ConfigError(f"config.{key}={value!r}: {expected}.")

  divisor = unet3d.required_divisor(config.model.depth)
  require(config.loss.name in LOSSES, "loss.name", f"expected one of {LOSSES}")
  require(config.loss.alpha >= 0, "loss.alpha",
          "alpha (false-positive weight) must be >= 0")
  require(config.loss.beta >= 0, "loss.beta",
          "beta (false-negative weight) must be >= 0")
  require(config.loss.alpha + config.loss.beta > 0, "loss.beta",
          "alpha + beta must be > 0")
  require(config.loss.gamma > 0, "loss.gamma", "must be > 0")
  require(config.loss.ce_weight >= 0, "loss.ce_weight", "must be >= 0")
  require(config.loss.smooth > 0, "loss.smooth", "must be > 0")
  require(config.optimizer.name in OPTIMIZERS, "optimizer.name",
          f"expected one of {OPTIMIZERS}")
  require(config.optimizer.learning_rate > 0, "optimizer.learning_rate",
          "must be > 0")
  require(config.optimizer.decay_steps >= 1, "optimizer.decay_steps",
          "must be >= 1")
  require(0 < config.optimizer.decay_rate <= 1, "optimizer.decay_rate",
          "must be in (0, 1]")
  require(config.optimizer.grad_clip_norm >= 0, "optimizer.grad_clip_norm",
          "must be >= 0 (0 disables clipping)")
  require(config.model.dtype in DTYPES, "model.dtype",
          f"expected one of {tuple(DTYPES)}")
  require(config.model.normalization in unet3d.NORMALIZATIONS,
          "model.normalization", f"expected one of {unet3d.NORMALIZATIONS}")
  require(config.model.conv_impl in ("auto",) + unet3d.CONV_IMPLS,
          "model.conv_impl", f"expected one of {('auto',) + unet3d.CONV_IMPLS}")
  require(config.model.depth >= 1, "model.depth", "must be >= 1")
  require(config.model.base_features >= 1, "model.base_features",
          "must be >= 1")
  require(config.train.batch_size >= 1, "train.batch_size", "must be >= 1")
  require(config.train.batch_size % num_devices == 0, "train.batch_size",
          f"the global batch must be divisible by the {num_devices} devices")
  require(config.train.batch_size % jax.process_count() == 0,
          "train.batch_size",
          f"must be divisible by the {jax.process_count()} processes")
  require(config.train.num_steps >= 1, "train.num_steps", "must be >= 1")
  for key in ("log_every", "eval_every", "checkpoint_every"):
    require(config.train[key] >= 0, f"train.{key}", "must be >= 0 (0: never)")
  require(config.train.keep_checkpoints >= 1, "train.keep_checkpoints",
          "must be >= 1")
  require(config.train.best_metric in METRICS, "train.best_metric",
          f"expected one of {METRICS}")
  patch = tuple(config.data.patch_shape)
  require(patch == () or (len(patch) == 3 and all(p > 0 for p in patch)),
          "data.patch_shape", "expected () for whole volumes or 3 positive "
          "sizes [x, y, z]")
  require(all(p % divisor == 0 for p in patch), "data.patch_shape",
          f"every size must be a multiple of 2**model.depth = {divisor}")
  require(0 <= config.data.foreground_fraction <= 1,
          "data.foreground_fraction", "must be in [0, 1]")
  require(config.data.num_val_cases >= 0, "data.num_val_cases", "must be >= 0")
  require(config.data.num_folds == 0 or config.data.num_folds >= 2,
          "data.num_folds", "must be 0 (no cross-validation) or >= 2")
  require(config.data.num_folds == 0 or
          0 <= config.data.fold < config.data.num_folds, "data.fold",
          f"must be in [0, data.num_folds={config.data.num_folds})")
  require(config.data.worker_count >= 0, "data.worker_count", "must be >= 0")
  require(config.data.prefetch_batches >= 0, "data.prefetch_batches",
          "must be >= 0")
  require(config.seed >= 0, "seed", "must be >= 0")
  require(not config.data.synthesize_if_missing or
          config.data.synthetic_cases > config.data.num_val_cases,
          "data.synthetic_cases", "must exceed data.num_val_cases")
  require(not config.data.synthesize_if_missing or
          len(config.data.synthetic_shape) == 3 and
          all(s >= 16 for s in config.data.synthetic_shape),
          "data.synthetic_shape", "expected 3 sizes, each >= 16")
  window = tuple(config.inference.window)
  require(window == () or (len(window) == 3 and
                           all(w > 0 and w % divisor == 0 for w in window)),
          "inference.window",
          f"expected () or 3 sizes, each a multiple of {divisor}")
  require(0 <= config.inference.overlap < 1, "inference.overlap",
          "must be in [0, 1)")
  require(config.inference.batch_size >= 1, "inference.batch_size",
          "must be >= 1")
  require(0 <= config.inference.threshold <= 1, "inference.threshold",
          "must be in [0, 1]")


def _lookup(config: ml_collections.ConfigDict, dotted: str) -> Any:
  value = config
  for part in dotted.split("."):
    value = value[part]
  return value


# --------------------------------------------------------------------------
# Model, optimizer, loss
# --------------------------------------------------------------------------


def build_model(config: ml_collections.ConfigDict, in_channels: int,
                seed: int) -> unet3d.UNet3D:
  """The U-Net of ``config.model`` for ``in_channels`` input channels.

  ``model.conv_impl="auto"`` picks the three-2D-convolution form of the 3x3x3
  convolutions on CPU (3-4x faster there, see bench/bench_conv3d.py) and the
  native 3D convolution (cuDNN) on GPU and TPU; the parameters are the same.
  """
  conv_impl = config.model.conv_impl
  if conv_impl == "auto":
    conv_impl = "2d_sum" if jax.default_backend() == "cpu" else "native"
  # The "rbg" generator initialises in seconds where the default threefry
  # compiles a kernel per parameter shape (~30 s for the paper's network on
  # CPU); only the initial values depend on it.
  return unet3d.UNet3D(
      in_channels=in_channels, num_classes=2,
      base_features=config.model.base_features, depth=config.model.depth,
      normalization=config.model.normalization,
      dtype=DTYPES[config.model.dtype], conv_impl=conv_impl,
      rngs=nnx.Rngs(jax.random.key(seed, impl="rbg")))


def make_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Learning rate x ``decay_rate`` every ``decay_steps`` steps (staircase)."""
  opt = config.optimizer
  return optax.exponential_decay(opt.learning_rate, opt.decay_steps,
                                 opt.decay_rate, staircase=True)


def make_optimizer(config: ml_collections.ConfigDict
                   ) -> optax.GradientTransformation:
  """optax optimizer with the staircase exponential decay of the paper.

  The learning rate is multiplied by ``decay_rate`` every ``decay_steps``
  steps (the paper: 1e-4, x0.9 every 1000 steps, Adam).
  """
  opt = config.optimizer
  schedule = make_schedule(config)
  if opt.name == "adam":
    tx = optax.adam(schedule)
  elif opt.name == "adamw":
    tx = optax.adamw(schedule, weight_decay=opt.weight_decay)
  else:
    tx = optax.sgd(schedule, momentum=opt.momentum)
  if opt.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(opt.grad_clip_norm), tx)
  return tx


def make_loss_fn(config: ml_collections.ConfigDict
                 ) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """``loss(logits [b, x, y, z, 2], labels [b, x, y, z]) -> scalar``.

  alpha weighs false positives and beta false negatives (Salehi et al.).
  """
  cfg = config.loss
  common = dict(smooth=cfg.smooth, pool_batch=cfg.pool_batch)
  if cfg.name == "dice":
    return lambda logits, labels: losses.dice_loss(logits, labels, **common)
  common.update(alpha=cfg.alpha, beta=cfg.beta)
  if cfg.name == "tversky":
    return lambda logits, labels: losses.tversky_loss(logits, labels, **common)
  if cfg.name == "focal_tversky":
    return lambda logits, labels: losses.focal_tversky_loss(
        logits, labels, gamma=cfg.gamma, **common)
  return lambda logits, labels: losses.tversky_ce_loss(
      logits, labels, ce_weight=cfg.ce_weight, **common)


def create_train_state(config: ml_collections.ConfigDict, in_channels: int,
                       mesh: jax.sharding.Mesh
                       ) -> tuple[nnx.GraphDef, TrainState]:
  """Initialises model and optimizer, replicated over ``mesh``.

  Returns the graph definition (static structure) and the state pytree that
  the jitted step consumes and returns.
  """
  model = build_model(config, in_channels, config.seed)
  optimizer = nnx.Optimizer(model, make_optimizer(config), wrt=nnx.Param)
  graphdef, state = nnx.split((model, optimizer))
  return graphdef, parallel.replicate(state, mesh)


def make_train_step(graphdef: nnx.GraphDef, loss_fn: Callable,
                    mesh: jax.sharding.Mesh):
  """One jitted, donated, data-parallel optimisation step.

  ``step(state, batch) -> (state, {"loss", "grad_norm"})`` with ``batch`` =
  ``{"image": [B, x, y, z, c], "label": [B, x, y, z]}`` sharded over the
  mesh's ``"data"`` axis and ``state`` replicated.
  """

  def step(state, batch):
    model, optimizer = nnx.merge(graphdef, state)

    def loss_of(model):
      return loss_fn(model(batch["image"]), batch["label"])

    loss, grads = nnx.value_and_grad(loss_of)(model)
    optimizer.update(model, grads)
    new_state = nnx.state((model, optimizer))
    return new_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

  replicated = parallel.replicated(mesh)
  return jax.jit(step, in_shardings=(replicated, parallel.batch_sharding(mesh)),
                 out_shardings=(replicated, replicated), donate_argnums=0)


def make_logits_fn(graphdef: nnx.GraphDef):
  """Jitted ``logits(state, images [n, x, y, z, c]) -> [n, x, y, z, 2]``."""

  @jax.jit
  def logits(state, images):
    model, _ = nnx.merge(graphdef, state)
    model.eval()
    return model(images)

  return logits


# --------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------


def lesion_probability(image: np.ndarray, logits_fn: Callable,
                       config: ml_collections.ConfigDict, window: Sequence[int],
                       devices: Sequence[jax.Device] | None = None,
                       progress: bool = False) -> np.ndarray:
  """Sliding-window lesion probability ``[x, y, z]`` of one normalised image.

  ``image`` is ``[x, y, z, channels]`` (channels last, NIfTI axis order),
  already normalised with :func:`tversky_jax.data.nifti.normalize_image`.
  """
  probabilities = inference.sliding_window_inference(
      logits_fn, image, window=tuple(window), overlap=config.inference.overlap,
      batch_size=config.inference.batch_size, mirror=config.inference.mirror,
      progress=progress, devices=devices)
  return 1.0 - probabilities[..., 0]


def evaluate_cases(cases: Sequence[pipeline.TrainingCase], logits_fn: Callable,
                   config: ml_collections.ConfigDict, window: Sequence[int],
                   devices: Sequence[jax.Device] | None = None
                   ) -> dict[str, float]:
  """The paper's metrics on whole validation volumes.

  Returns the mean over cases of DSC, sensitivity, specificity, precision, F2
  and APR (APR averaged over the cases that contain lesions), and the same
  metrics pooled over all voxels of all cases under ``pooled_*`` keys.
  """
  threshold = config.inference.threshold
  per_case, probs, labels = [], [], []
  for case in cases:
    prob = lesion_probability(case.image, logits_fn, config, window, devices)
    label = (case.label != 0).astype(np.int32)  # lesion vs. the rest
    values = metrics_lib.all_metrics(prob[None], label[None],
                                     threshold=threshold)
    per_case.append({k: float(v[0]) for k, v in values.items()})
    probs.append(prob.ravel())
    labels.append(label.ravel())
  result = {name: float(np.nanmean([c[name] for c in per_case]))
            if per_case else float("nan") for name in METRICS}
  if per_case:
    pooled = metrics_lib.all_metrics(np.concatenate(probs)[None],
                                     np.concatenate(labels)[None],
                                     threshold=threshold, pooled=True)
    result.update({f"pooled_{k}": float(v) for k, v in pooled.items()})
  return result


# --------------------------------------------------------------------------
# The training job
# --------------------------------------------------------------------------


@dataclasses.dataclass
class TrainSummary:
  """What :func:`train_and_evaluate` returns."""

  step: int
  interrupted: bool
  last_loss: float
  best_step: int | None
  best_metrics: dict[str, float]
  final_metrics: dict[str, float]


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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       *, devices: Sequence[jax.Device] | None = None,
                       stop_after: int | None = None,
                       progress: bool = True) -> TrainSummary:
  """Trains the model of ``config`` and writes everything under ``workdir``.

  Running it again with the same ``workdir`` resumes from the latest
  checkpoint (same parameters, optimizer state and data position).
  SIGINT (Ctrl-C) and SIGTERM save a checkpoint and return with
  ``interrupted=True``.

  Args:
    config: see ``configs/default.py``.
    workdir: checkpoints in ``workdir/checkpoints``, one JSON line of metrics
      per logged step in ``workdir/metrics.jsonl``, and the config in
      ``workdir/config.json``.
    devices: devices of the data-parallel mesh (default: all).
    stop_after: stop (with a checkpoint) after this many steps of this call,
      as if interrupted; for tests and time-boxed jobs.
    progress: show a tqdm progress bar (process 0 only).

  Returns:
    A :class:`TrainSummary`.

  Raises:
    ConfigError: invalid configuration (before any compilation).
    tversky_jax.data.nifti.DatasetError: every problem of the dataset.
    TrainingDiverged: the loss became NaN/inf; the last good checkpoint stays.
  """
  devices = list(jax.devices() if devices is None else devices)
  validate_config(config, num_devices=len(devices))
  _make_workdir(workdir)
  is_lead = jax.process_index() == 0
  dataset, train_ids, val_ids = prepare_dataset(config)

  divisor = unet3d.required_divisor(config.model.depth)
  train_cases = pipeline.load_training_cases(dataset, train_ids,
                                             progress=progress and is_lead)
  val_cases = pipeline.load_training_cases(
      dataset, val_ids, progress=progress and is_lead) if val_ids else []
  patch_shape = tuple(config.data.patch_shape) or None
  window = tuple(config.inference.window) or patch_shape or _whole_volume_shape(
      train_cases + val_cases, divisor)

  mesh = parallel.make_mesh(devices)
  local_mesh = parallel.make_mesh(
      [d for d in devices if d.process_index == jax.process_index()])
  graphdef, state = create_train_state(config, dataset.num_channels, mesh)
  train_step = make_train_step(graphdef, make_loss_fn(config), mesh)
  logits = make_logits_fn(graphdef)

  manager = checkpoint_lib.CheckpointManager(
      os.path.join(workdir, "checkpoints"),
      max_to_keep=config.train.keep_checkpoints,
      best_metric=config.train.best_metric)
  data_iter = pipeline.make_train_iterator(
      train_cases, global_batch_size=config.train.batch_size,
      patch_shape=patch_shape, divisor=divisor,
      foreground_fraction=config.data.foreground_fraction,
      random_flip=config.data.random_flip, seed=config.seed,
      process_index=jax.process_index(), process_count=jax.process_count(),
      worker_count=config.data.worker_count,
      prefetch_batches=config.data.prefetch_batches)

  if manager.latest_step() is not None:
    _check_resumable(config, workdir)
    _check_same_channels(manager, dataset, workdir)
  _write_config(config, workdir, is_lead)
  start_step = 0
  restored = manager.restore(_abstract(state))
  if restored is not None:
    state, start_step = restored.state, restored.step
    if restored.data_state:
      data_iter.set_state(restored.data_state)
    _log(f"Resumed from the checkpoint of step {start_step} in {workdir}.")

  writer = MetricWriter(workdir, enabled=is_lead)
  schedule = make_schedule(config)
  num_steps = config.train.num_steps
  last_step = num_steps if stop_after is None else min(
      num_steps, start_step + stop_after)
  final_metrics: dict[str, float] = {}
  last_loss = float("nan")
  step = saved_step = start_step

  def save(step, metrics=None):
    nonlocal saved_step
    saved_step = step
    manager.save(step, state, data_state=data_iter.get_state(),
                 meta={"config": config.to_dict(), "metrics": metrics or {},
                       "channel_names": list(dataset.channel_names),
                       "dataset_root": os.path.abspath(config.data.root)},
                 metrics=metrics)

  def validate(step):
    nonlocal final_metrics
    if not val_cases:
      return None
    # Every process validates on its own devices with a local copy of the
    # replicated parameters (in a multi-host job the global state spans
    # devices this process cannot address).
    local_state = parallel.localize(state, local_mesh)
    values = evaluate_cases(val_cases, lambda x: logits(local_state, x),
                            config, window, list(local_mesh.devices.flat))
    final_metrics = values
    writer.write(step, {f"val/{k}": v for k, v in values.items()})
    if is_lead:
      tqdm.tqdm.write(f"step {step}: " + _format_metrics(values))
    return {k: v for k, v in values.items() if np.isfinite(v)}

  batch_voxels = config.train.batch_size * math.prod(
      patch_shape or _whole_volume_shape(train_cases, divisor))
  bar = tqdm.tqdm(total=num_steps, initial=start_step, unit="step",
                  disable=not (progress and is_lead), dynamic_ncols=True)
  # The loss of step k is read on the host while step k + 1 runs, so the
  # device never waits for the check; every save flushes it first, so a NaN
  # state is never written.
  pending = None

  def flush():
    nonlocal pending, last_loss
    if pending is not None:
      last_loss = _check_finite(pending[1], pending[0], manager)
      pending = None

  with _StopOnSignal() as stop_signal:
    window_start, window_steps = time.perf_counter(), 0
    while step < last_step and not stop_signal.should_stop(step):
      batch = parallel.global_batch(next(data_iter), mesh)
      state, step_metrics = train_step(state, batch)
      step += 1
      window_steps += 1
      flush()
      pending = (step, step_metrics)
      if (config.train.log_every and step % config.train.log_every == 0
          or step == last_step):
        flush()
        rate = window_steps / max(time.perf_counter() - window_start, 1e-9)
        writer.write(step, {"train/loss": last_loss,
                            "train/grad_norm": float(step_metrics["grad_norm"]),
                            "train/learning_rate": float(schedule(step - 1)),
                            "train/steps_per_s": rate,
                            "train/voxels_per_s": rate * batch_voxels})
        bar.set_postfix(loss=f"{last_loss:.4f}", steps_s=f"{rate:.2f}",
                        vox_s=f"{rate * batch_voxels:.3g}")
        window_start, window_steps = time.perf_counter(), 0
      bar.update(1)
      if config.train.eval_every and (step % config.train.eval_every == 0 or
                                      step == num_steps):
        flush()
        save(step, validate(step))
      elif (config.train.checkpoint_every and
            step % config.train.checkpoint_every == 0):
        flush()
        save(step)
    flush()
    interrupted = step < num_steps
    if step != saved_step:
      save(step)
    if interrupted:
      _log(f"Stopped at step {step}; checkpoint saved. Run the same command "
           "again to resume.")
  bar.close()
  data_iter.close()
  manager.wait()
  best_step = manager.best_step()
  best_metrics = {}
  if best_step is not None:
    best_metrics = manager.restore_meta(best_step).get("metrics", {})
  manager.close()
  writer.close()
  summary = TrainSummary(step=step, interrupted=interrupted,
                         last_loss=last_loss, best_step=best_step,
                         best_metrics=best_metrics, final_metrics=final_metrics)
  if is_lead and not interrupted and best_metrics:
    _log(f"Best validation {config.train.best_metric} at step {best_step}: "
         + _format_metrics(best_metrics))
  return summary


def _make_workdir(workdir: str) -> None:
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as error:
    raise ConfigError(f"--workdir={workdir}: cannot create it "
                      f"({error.strerror or error})") from None


def _check_finite(step_metrics, step: int, manager) -> float:
  # The loss of step k comes from the parameters before its update; a finite
  # gradient norm too means the updated parameters are finite.
  loss = float(step_metrics["loss"])
  if not (np.isfinite(loss) and np.isfinite(float(step_metrics["grad_norm"]))):
    manager.wait()
    latest = manager.latest_step()
    kept = (f"the last good checkpoint (step {latest}) is kept"
            if latest is not None else "no checkpoint had been written yet")
    raise TrainingDiverged(
        f"the loss (or its gradient) became {loss if not np.isfinite(loss) else 'inf/nan'} "
        f"at step {step}; training stopped and {kept}. "
        "Lower optimizer.learning_rate, set optimizer.grad_clip_norm, or "
        "check the data.")
  return loss


def _abstract(state: TrainState) -> TrainState:
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
      state)


def _whole_volume_shape(cases, divisor: int) -> tuple[int, int, int]:
  largest = np.max([case.image.shape[:3] for case in cases], axis=0)
  return tuple(int(-(-s // divisor) * divisor) for s in largest)


def _format_metrics(values: dict[str, float]) -> str:
  return "  ".join(f"{k} {values[k]:.4f}" for k in METRICS if k in values)


# Keys whose change makes a checkpoint unloadable (parameter or optimizer
# state structure) or its data position meaningless (grain's state layout).
_STRUCTURAL_KEYS = ("model.base_features", "model.depth",
                    "model.normalization", "optimizer.name",
                    "optimizer.grad_clip_norm", "data.worker_count")


def _check_resumable(config, workdir: str) -> None:
  """Raises ConfigError when ``workdir``'s run cannot continue with ``config``."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return
  with open(path) as f:
    old = json.load(f)
  new = json.loads(json.dumps(config.to_dict()))
  for key in _STRUCTURAL_KEYS:
    section, name = key.split(".")
    before = old.get(section, {}).get(name)
    after = new[section][name]
    if key == "optimizer.grad_clip_norm":  # only on/off changes the state
      before, after = bool(before), bool(after)
    if before is not None and before != after:
      raise ConfigError(
          f"config.{key}={_lookup(config, key)!r}: the run in {workdir} was "
          f"trained with {key}={old[section][name]!r} and its checkpoints "
          "cannot continue with this change; use another --workdir.")


def _check_same_channels(manager, dataset: nifti.Dataset, workdir: str
                         ) -> None:
  """Raises ConfigError when the dataset's input channels changed."""
  try:
    saved = manager.restore_meta(manager.latest_step()).get("channel_names")
  except Exception:  # pylint: disable=broad-except
    return  # an unreadable checkpoint: restoring reports and skips it
  if saved is not None and list(saved) != list(dataset.channel_names):
    raise ConfigError(
        f"config.data.root={dataset.root}: its channels "
        f"{list(dataset.channel_names)} differ from the channels "
        f"{list(saved)} the run in {workdir} was trained on; use another "
        "--workdir.")


def _write_config(config, workdir: str, is_lead: bool) -> None:
  if not is_lead:
    return
  path = os.path.join(workdir, "config.json")
  new = config.to_dict()
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    if json.loads(json.dumps(new)) != old:
      _log(f"note: the config differs from the one in {path}; the run "
           "continues from its checkpoint with the new config.")
  with open(path, "w") as f:
    json.dump(new, f, indent=2)


def _sync_processes(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def _log(message: str) -> None:
  if jax.process_index() == 0:
    tqdm.tqdm.write(message, file=sys.stderr)


class MetricWriter:
  """Appends ``{"step": s, name: value, ...}`` lines to metrics.jsonl.

  Also writes TensorBoard event files when the optional ``tensorboard`` extra
  (tensorboardX) is installed.
  """

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self._file = None
    self._tb = None
    if not enabled:
      return
    self._file = open(os.path.join(workdir, "metrics.jsonl"), "a")
    try:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
    except ImportError:
      self._tb = None

  def write(self, step: int, values: dict[str, float]) -> None:
    if not self.enabled:
      return
    record = {"step": int(step)}
    record.update({k: float(v) for k, v in values.items()})
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    if self._tb is not None:
      for key, value in values.items():
        self._tb.add_scalar(key, float(value), int(step))

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
    if self._tb is not None:
      self._tb.close()


class _StopOnSignal:
  """Decides when the training loop stops early, on a signal.

  In a single process, SIGINT (Ctrl-C) and SIGTERM set a flag checked after
  every step. In a multi-process job the processes must stop at the same
  step to save collectively: JAX's preemption service (started by
  ``jax.distributed.initialize``) catches SIGTERM on any host and all hosts
  agree on a step through ``reached_preemption_sync_point``.
  """

  def __init__(self):
    self.received = False
    self._previous = {}
    self._multi_process = jax.process_count() > 1

  def should_stop(self, step: int) -> bool:
    if self._multi_process:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      if multihost_utils.reached_preemption_sync_point(step):
        _log(f"Preemption notice: all processes stop at step {step}.")
        self.received = True
    return self.received

  def _handler(self, signum, frame):
    del frame
    if self.received:  # a second Ctrl-C: stop right away
      raise KeyboardInterrupt
    self.received = True
    _log(f"Received {signal.Signals(signum).name}: saving a checkpoint and "
         "stopping after this step.")

  def __enter__(self):
    if self._multi_process:  # SIGTERM belongs to JAX's preemption service
      return self
    try:
      for sig in (signal.SIGINT, signal.SIGTERM):
        self._previous[sig] = signal.signal(sig, self._handler)
    except ValueError:  # not the main thread: leave signals alone
      self._previous = {}
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    return False
