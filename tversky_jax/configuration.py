"""The training config: checking it, and whether a run can continue with it.

``configs/default.py`` lists every key with its default and a comment; the
other config files change only what differs. :func:`validate_config` checks
every value before anything is read or compiled and raises a one-line
:class:`ConfigError` naming the key; :func:`check_resumable` refuses a config
(or dataset) that the checkpoints of an existing run cannot follow.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections

from tversky_jax.models import unet3d

LOSSES = ("tversky", "dice", "focal_tversky", "tversky_ce")
OPTIMIZERS = ("adam", "adamw", "sgd")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
METRICS = ("dsc", "sensitivity", "specificity", "precision", "f2", "apr")


class ConfigError(ValueError):
  """A configuration value is invalid; the message is one line."""


# ``require(condition, key, expected)``: raises a ConfigError naming
# ``config.key``, its value and ``expected`` unless ``condition`` holds.
_Require = Callable[[bool, str, str], None]


def validate_config(config: ml_collections.ConfigDict,
                    num_devices: int | None = None) -> None:
  """Checks every value before anything is compiled or read.

  The sections are checked in the order loss, optimizer, model, train, data,
  inference.

  Args:
    config: a config with the keys of ``configs/default.py``.
    num_devices: the devices the global batch is split over (default: all).

  Raises:
    ConfigError: naming the first bad key, its value and what is expected.
  """
  num_devices = jax.device_count() if num_devices is None else num_devices

  def require(condition: bool, key: str, expected: str) -> None:
    if not condition:
      value = lookup(config, key)
      raise ConfigError(f"config.{key}={value!r}: {expected}.")

  # Sizes must be multiples of this unless anisotropic strides are given
  # (then train_lib checks them against the strides' divisors).
  divisor = unet3d.required_divisor(config.model.depth)
  _check_loss(config, require)
  _check_optimizer(config, require)
  _check_model(config, require)
  _check_train(config, require, num_devices)
  _check_data(config, require, divisor)
  _check_inference(config, require, divisor)


def _check_loss(config: ml_collections.ConfigDict, require: _Require) -> None:
  """``config.loss``: alpha weighs false positives, beta false negatives."""
  loss = config.loss
  require(loss.name in LOSSES, "loss.name", f"expected one of {LOSSES}")
  require(loss.alpha >= 0, "loss.alpha",
          "alpha (false-positive weight) must be >= 0")
  require(loss.beta >= 0, "loss.beta",
          "beta (false-negative weight) must be >= 0")
  require(loss.alpha + loss.beta > 0, "loss.beta", "alpha + beta must be > 0")
  require(loss.gamma > 0, "loss.gamma", "must be > 0")
  require(loss.ce_weight >= 0, "loss.ce_weight", "must be >= 0")
  require(loss.smooth > 0, "loss.smooth", "must be > 0")


def _check_optimizer(config: ml_collections.ConfigDict,
                     require: _Require) -> None:
  opt = config.optimizer
  require(opt.name in OPTIMIZERS, "optimizer.name",
          f"expected one of {OPTIMIZERS}")
  require(opt.learning_rate > 0, "optimizer.learning_rate", "must be > 0")
  require(opt.decay_steps >= 1, "optimizer.decay_steps", "must be >= 1")
  require(0 < opt.decay_rate <= 1, "optimizer.decay_rate", "must be in (0, 1]")
  require(opt.grad_clip_norm >= 0, "optimizer.grad_clip_norm",
          "must be >= 0 (0 disables clipping)")
  require(opt.warmup_steps >= 0, "optimizer.warmup_steps", "must be >= 0")


def _check_model(config: ml_collections.ConfigDict, require: _Require) -> None:
  model = config.model
  conv_impls = ("auto",) + unet3d.CONV_IMPLS
  require(model.dtype in DTYPES, "model.dtype",
          f"expected one of {tuple(DTYPES)}")
  require(model.normalization in unet3d.NORMALIZATIONS, "model.normalization",
          f"expected one of {unet3d.NORMALIZATIONS}")
  require(model.conv_impl in conv_impls, "model.conv_impl",
          f"expected one of {conv_impls}")
  require(model.depth >= 1, "model.depth", "must be >= 1")
  require(model.base_features >= 1, "model.base_features", "must be >= 1")
  require(model.init in unet3d.INITS, "model.init",
          f"expected one of {unet3d.INITS}")
  require(model.head_bias in ("prior", "zero"), "model.head_bias",
          "expected 'prior' or 'zero'")
  require(isinstance(model.get("deep_supervision", False), bool),
          "model.deep_supervision", "expected True or False")


def _check_train(config: ml_collections.ConfigDict, require: _Require,
                 num_devices: int) -> None:
  """``config.train`` and ``config.seed``; the global batch must split evenly
  over ``num_devices`` devices and over the processes."""
  train = config.train
  require(train.batch_size >= 1, "train.batch_size", "must be >= 1")
  require(train.batch_size % num_devices == 0, "train.batch_size",
          f"the global batch must be divisible by the {num_devices} devices")
  require(train.batch_size % jax.process_count() == 0, "train.batch_size",
          f"must be divisible by the {jax.process_count()} processes")
  require(train.num_steps >= 1, "train.num_steps", "must be >= 1")
  for key in ("log_every", "eval_every", "checkpoint_every"):
    require(train[key] >= 0, f"train.{key}", "must be >= 0 (0: never)")
  require(train.keep_checkpoints >= 1, "train.keep_checkpoints",
          "must be >= 1")
  require(train.stuck_patience >= 0, "train.stuck_patience",
          "must be >= 0 (0: never)")
  require(train.best_metric in METRICS, "train.best_metric",
          f"expected one of {METRICS}")
  require(config.seed >= 0, "seed", "must be >= 0")


def _check_data(config: ml_collections.ConfigDict, require: _Require,
                divisor: int) -> None:
  """``config.data``; patch sizes ``[x, y, z]`` must be multiples of
  ``divisor`` (``2**model.depth``) unless ``model.strides`` is set."""
  data = config.data
  patch = tuple(data.patch_shape)
  require(patch == () or (len(patch) == 3 and all(p > 0 for p in patch)),
          "data.patch_shape", "expected () for whole volumes or 3 positive "
          "sizes [x, y, z]")
  if not config.model.strides:  # else checked against the strides' divisors
    require(all(p % divisor == 0 for p in patch), "data.patch_shape",
            f"every size must be a multiple of 2**model.depth = {divisor}")
  require(0 <= data.foreground_fraction <= 1, "data.foreground_fraction",
          "must be in [0, 1]")
  require(data.num_val_cases >= 0, "data.num_val_cases", "must be >= 0")
  require(data.num_folds == 0 or data.num_folds >= 2, "data.num_folds",
          "must be 0 (no cross-validation) or >= 2")
  require(data.num_folds == 0 or 0 <= data.fold < data.num_folds, "data.fold",
          f"must be in [0, data.num_folds={data.num_folds})")
  require(data.worker_count >= 0, "data.worker_count", "must be >= 0")
  require(data.prefetch_batches >= 0, "data.prefetch_batches", "must be >= 0")
  require(not data.synthesize_if_missing or
          data.synthetic_cases > data.num_val_cases,
          "data.synthetic_cases", "must exceed data.num_val_cases")
  require(not data.synthesize_if_missing or
          len(data.synthetic_shape) == 3 and
          all(s >= 16 for s in data.synthetic_shape),
          "data.synthetic_shape", "expected 3 sizes, each >= 16")


def _check_inference(config: ml_collections.ConfigDict, require: _Require,
                     divisor: int) -> None:
  """``config.inference``; window sizes as the patch sizes of
  :func:`_check_data`."""
  inference = config.inference
  window = tuple(inference.window)
  require(window == () or (len(window) == 3 and all(
      w > 0 and (config.model.strides or w % divisor == 0) for w in window)),
          "inference.window",
          f"expected () or 3 sizes, each a multiple of {divisor}")
  require(0 <= inference.overlap < 1, "inference.overlap", "must be in [0, 1)")
  require(inference.batch_size >= 1, "inference.batch_size", "must be >= 1")
  require(0 <= inference.threshold <= 1, "inference.threshold",
          "must be in [0, 1]")


def lookup(config: ml_collections.ConfigDict, dotted: str) -> Any:
  """``config`` value of a dotted key such as ``"loss.beta"``."""
  value = config
  for part in dotted.split("."):
    value = value[part]
  return value


def check_patch_shape(patch_shape, divisors) -> None:
  """Raises ConfigError unless every patch size is a multiple of its axis'
  divisor (the product of the network's pooling strides on that axis)."""
  if patch_shape and any(p % d for p, d in zip(patch_shape, divisors)):
    raise ConfigError(
        f"config.data.patch_shape={patch_shape}: each size must be a "
        f"multiple of the network's divisors {divisors} (its pooling "
        "strides per axis)")


def patch_shape_warning(patch_shape, largest, divisors, *,
                        planned: bool = False) -> str | None:
  """The warning for a patch larger than every training volume, or None.

  Args:
    patch_shape: ``(px, py, pz)``, or None (whole volumes).
    largest: ``(x, y, z)``, the largest extent of the training volumes
      along each axis (on the grid the network sees).
    divisors: the network's divisors per axis.
    planned: the volumes are on a plan's grid (said in the message).

  Returns:
    One line when the patch exceeds ``largest`` on some axis (so every
    patch is partly zero padding), naming the patch size that fits:
    ``largest`` rounded down to the divisors (at least one divisor).
  """
  if not patch_shape or all(p <= s for p, s in zip(patch_shape, largest)):
    return None
  fitting = tuple(min(p, max(d, s // d * d))
                  for p, s, d in zip(patch_shape, largest, divisors))
  grid = " on the planned grid" if planned else ""
  return (f"warning: data.patch_shape {tuple(patch_shape)} is larger than "
          f"every training volume (largest {'x'.join(map(str, largest))}"
          f"{grid}); every patch is partly zero padding; set "
          f"--config.data.patch_shape to at most {fitting}")


# Keys whose change makes a checkpoint unloadable (parameter or optimizer
# state structure) or its data position meaningless (grain's state layout).
STRUCTURAL_KEYS = ("model.base_features", "model.depth", "model.strides",
                   "model.normalization", "model.deep_supervision",
                   "optimizer.name",
                   "optimizer.grad_clip_norm", "data.worker_count")


def check_resumable(config, workdir: str) -> None:
  """Raises ConfigError when ``workdir``'s run cannot continue with ``config``."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return
  with open(path) as f:
    old = json.load(f)
  new = json.loads(json.dumps(config.to_dict()))
  for key in STRUCTURAL_KEYS:
    section, name = key.split(".")
    before = old.get(section, {}).get(name)
    after = new[section][name]
    if key == "optimizer.grad_clip_norm":  # only on/off changes the state
      before, after = bool(before), bool(after)
    if before is not None and before != after:
      raise ConfigError(
          f"config.{key}={lookup(config, key)!r}: the run in {workdir} was "
          f"trained with {key}={old[section][name]!r} and its checkpoints "
          "cannot continue with this change; use another --workdir.")


def check_same_channels(saved: Sequence[str] | None,
                        channels: Sequence[str], root: str,
                        workdir: str) -> None:
  """Raises ConfigError when the dataset's input channels changed.

  Args:
    saved: the channel names stored with the run's latest checkpoint (None
      for checkpoints that predate them: not checked).
    channels: the channel names of the dataset at ``root``.
  """
  if saved is not None and list(saved) != list(channels):
    raise ConfigError(
        f"config.data.root={root}: its channels {list(channels)} differ "
        f"from the channels {list(saved)} the run in {workdir} was trained "
        "on; use another --workdir.")


def check_state_format(saved: int | None, current: int, workdir: str) -> None:
  """Raises ConfigError when ``workdir``'s checkpoints store the train state
  in another layout than this version writes (``train_state.STATE_FORMAT``).

  Args:
    saved: the ``state_format`` stored with the run's latest checkpoint
      (None: written before the number existed).
    current: the layout this version reads and writes.
  """
  if saved != current:
    raise ConfigError(
        f"--workdir={workdir}: its checkpoints were written by an earlier "
        f"tversky_jax (train-state format {saved or 1}, this version reads "
        f"{current}: the optimizer's state is now one vector) and cannot "
        "continue training; predict.py still reads their model. Use another "
        "--workdir to train.")


def write_config(config: ml_collections.ConfigDict, workdir: str) -> bool:
  """Writes ``workdir/config.json``; True when it replaced a different one."""
  path = os.path.join(workdir, "config.json")
  new = config.to_dict()
  changed = False
  if os.path.exists(path):
    with open(path) as f:
      changed = json.loads(json.dumps(new)) != json.load(f)
  with open(path, "w") as f:
    json.dump(new, f, indent=2)
  return changed
