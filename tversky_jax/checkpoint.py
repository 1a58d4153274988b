"""Checkpoints of a training run; the only module that talks to orbax.

A checkpoint holds three items:

* ``state``: the train state pytree (model parameters, optimizer state and
  step counter), saved asynchronously while training goes on;
* ``data``: the input pipeline's iterator state (grain), so a resumed run sees
  exactly the batches an uninterrupted one would have seen (the random crops
  and flips derive from the seed and this position);
* ``meta``: JSON with the step, the run's config and the validation metrics.

Prediction reads a part of ``state`` only (the model's variables, not the
optimizer's moments: :meth:`CheckpointManager.restore_subtree`).

The latest ``max_to_keep`` checkpoints are kept, plus the best one by a
validation metric. A checkpoint that cannot be read back because its files
are damaged (a killed write, a truncated or missing file) is moved aside with
a warning and the previous one is used; any other failure to read (no
permission, no memory, an I/O error) is raised with nothing moved (see
:func:`_is_corrupt`).

The manager changes nothing of the process for longer than its own calls:
orbax's failure reports are filtered only while one of them (or an
asynchronous write) runs, and its array handler for single-process saves is
given to this manager's ``state`` item, not registered globally.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import gc
import json
import logging
import math
import os
import re
import shutil
import sys
import threading
import time
import traceback
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

PyTree = Any

# How the manager names its step folders: the step number ("1234"), orbax's
# default without a step_prefix or fixed length; restore_subtree finds the
# folder of a step with it.
_STEP_FORMAT = ocp.path.step.standard_name_format()


class CheckpointError(RuntimeError):
  """A checkpoint could not be written or read."""


@dataclasses.dataclass(frozen=True)
class Restored:
  """What :meth:`CheckpointManager.restore` returns."""

  step: int
  state: PyTree
  data_state: dict[str, Any] | None
  meta: dict[str, Any]


class CheckpointManager:
  """Saves and restores training checkpoints under ``directory``.

  Args:
    directory: where step folders are written (created if missing). For
      multi-host runs it must be shared by all hosts; orbax writes
      collectively.
    max_to_keep: number of most recent checkpoints to keep.
    best_metric: name of a validation metric; the checkpoint with its best
      value is kept as well. None keeps only the latest ones.
    best_mode: "max" (higher is better, e.g. F2) or "min" (e.g. a loss).
    async_save: write in a background thread while training continues.
  """

  def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 3,
               best_metric: str | None = "f2", best_mode: str = "max",
               async_save: bool = True):
    if best_mode not in ("max", "min"):
      raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}.")
    if max_to_keep < 1:
      raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}.")
    self.directory = os.fspath(os.path.abspath(directory))
    self.best_metric = best_metric
    keep = [policies.LatestN(n=max_to_keep)]
    best_fn = None
    if best_metric is not None:
      best_fn = _metric_getter(best_metric, best_mode)
      keep.append(policies.BestN(get_metric_fn=best_fn,
                                 reverse=best_mode == "min", n=1,
                                 keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        best_fn=best_fn, best_mode=best_mode,
        preservation_policy=policies.AnyPreservationPolicy(keep),
        enable_async_checkpointing=async_save, create=True,
        cleanup_tmp_directories=True)
    self._async = async_save
    self._write_pending = False
    with _quiet_orbax():
      self._manager = ocp.CheckpointManager(
          self.directory, options=options, handler_registry=_handlers())

  def save(self, step: int, state: PyTree, *, data_state: dict | None,
           meta: dict[str, Any], metrics: dict[str, float] | None = None) -> None:
    """Starts writing a checkpoint of ``state`` at ``step``.

    Returns once the device arrays are copied; the write finishes in the
    background (see :meth:`wait`). Raises CheckpointError with the reason
    when the write cannot start (e.g. the disk is full); the checkpoints
    already on disk stay intact because orbax commits a step by renaming its
    folder only once every file is written.
    """
    args = ocp.args.Composite(
        state=ocp.args.PyTreeSave(state),
        data=ocp.args.JsonSave(data_state or {}),
        meta=ocp.args.JsonSave(dict(meta, step=int(step))))
    try:
      with _quiet_orbax():
        self._manager.save(int(step), args=args, metrics=metrics, force=True)
        if self._async:
          self._hold_quiet()
    except Exception as error:  # OSError, or tensorstore's ValueError
      # An earlier asynchronous save may be the one that failed; orbax
      # waited for it first, so no write is pending now.
      self._release_quiet()
      raise self._write_error(error) from error

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are on disk."""
    try:
      with _quiet_orbax():
        self._manager.wait_until_finished()
    except Exception as error:  # OSError, or tensorstore's ValueError
      raise self._write_error(error) from error
    finally:
      self._release_quiet()

  def _hold_quiet(self) -> None:
    """Keeps orbax's failure reports silenced until :meth:`wait` or
    :meth:`close`: orbax's threads report a failed asynchronous write
    before either raises it."""
    if not self._write_pending:
      _quiet_begin()
      self._write_pending = True

  def _release_quiet(self) -> None:
    if self._write_pending:
      self._write_pending = False
      _quiet_end()

  def _write_error(self, error: Exception) -> CheckpointError:
    reason = ("no space left on device"
              if _disk_full(error, self.directory) else _first_line(error))
    return CheckpointError(
        f"writing a checkpoint to {self.directory} failed "
        f"({reason}); the checkpoints already on disk are intact")

  def close(self) -> None:
    """Waits for pending writes, then releases orbax's background threads,
    also when a pending write failed (its CheckpointError is raised once
    they are released): a failed write's clean-up must not run on while
    another manager opens the same directory."""
    try:
      self.wait()
    finally:
      with _quiet_orbax(), contextlib.suppress(Exception):  # the same failure
        self._manager.close()

  def all_steps(self) -> list[int]:
    with _quiet_orbax():
      self._manager.reload()
      return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def best_step(self) -> int | None:
    """The step with the best ``best_metric``; None when no checkpoint has it.

    Without a ``best_metric`` this is the latest step.
    """
    with _quiet_orbax():
      self._manager.reload()
      return self._manager.best_step()

  def restore(self, abstract_state: PyTree, step: int | None = None
              ) -> Restored | None:
    """Restores a checkpoint onto the shardings of ``abstract_state``.

    Args:
      abstract_state: a pytree of ``jax.ShapeDtypeStruct`` (with shardings)
        of the same structure as the saved state.
      step: the step to restore. None restores the latest readable
        checkpoint: a newer one whose files are damaged is reported with a
        warning, skipped and, once an older one is read, moved aside.

    Returns:
      The restored checkpoint, or None when the directory holds none.

    Raises:
      CheckpointError: ``step`` was given and cannot be read; or checkpoints
        exist but none can be read; or reading failed for a reason other
        than damaged files (see :func:`_is_corrupt`), which moves nothing.
    """
    steps = self.all_steps()
    if step is not None:
      if step not in steps:
        raise CheckpointError(
            f"no checkpoint of step {step} in {self.directory}; available: "
            f"{steps}.")
      return self._restore_step(abstract_state, step)
    failures = []
    for candidate in reversed(steps):
      try:
        restored = self._restore_step(abstract_state, candidate)
      except CheckpointError as error:
        if not _is_corrupt(error.__cause__):
          raise CheckpointError(
              f"{error}; nothing was moved: the error does not show damaged "
              "files, the checkpoint may be intact") from error.__cause__
        failures.append(candidate)
        _warn(f"warning: {error}; trying the previous checkpoint.")
        continue
      for broken in failures:  # training will write these steps again
        self._quarantine(broken)
      return restored
    if failures:
      raise CheckpointError(
          f"none of the checkpoints {failures} in {self.directory} is "
          "readable; move the folder away to start afresh.")
    return None

  def _quarantine(self, step: int) -> None:
    """Moves an unreadable step aside (kept for inspection, not deleted)."""
    source = os.path.join(self.directory, str(step))
    target = os.path.join(self.directory,
                          f"unreadable_step{step}_{int(time.time())}")
    if jax.process_index() == 0 and os.path.isdir(source):
      os.rename(source, target)
      _warn(f"warning: moved the unreadable checkpoint of step {step} to "
            f"{target}.")
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices(f"quarantine_{step}")
    with _quiet_orbax():
      self._manager.reload()

  def restore_meta(self, step: int) -> dict[str, Any]:
    """Reads only the JSON metadata (step, config, metrics) of ``step``.

    Raises:
      CheckpointError: the metadata cannot be read.
    """
    try:
      with _quiet_orbax():
        restored = self._manager.restore(
            step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    except Exception as error:  # orbax/tensorstore raise many kinds
      raise self._read_error(step, error) from error
    return dict(restored.meta)

  def restore_subtree(self, abstract_subtree: PyTree, step: int) -> PyTree:
    """Reads only the leaves of ``abstract_subtree`` from the state of ``step``.

    Nothing else of the checkpoint is read or allocated: prediction restores
    the model's variables without the optimizer's moments (two more copies
    of the parameters under Adam). The checkpoint format is the one
    :meth:`save` writes; the sub-tree is read with orbax's partial restore
    (``PyTreeRestore(partial_restore=True)``) by a separate checkpointer, as
    the manager's ``state`` item is bound to ``StandardRestore``, which
    reads whole trees only.

    Args:
      abstract_subtree: a pytree of ``jax.ShapeDtypeStruct`` (with
        shardings) of the saved state's structure with whole branches left
        out, e.g. ``nnx.State({0: model})`` of a state saved as ``{0: model,
        1: optimizer}``. Every leaf must exist in the checkpoint with this
        shape.
      step: the step to read (an existing one, see :meth:`all_steps`).

    Returns:
      The pytree of ``abstract_subtree``'s structure, its leaves ``jax.Array``
      on the given shardings.

    Raises:
      CheckpointError: the step is missing or unreadable, or a leaf of
        ``abstract_subtree`` is not in it (or has another shape).
    """
    restore_args = ocp.checkpoint_utils.construct_restore_args(
        abstract_subtree)
    args = ocp.args.PyTreeRestore(item=abstract_subtree,
                                  restore_args=restore_args,
                                  partial_restore=True)
    try:
      path = ocp.path.step.find_step_path(self.directory, _STEP_FORMAT,
                                          step=step)
      with (_quiet_orbax(),
            ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer):
        restored = checkpointer.restore(path / "state", args=args)
      _check_subtree(restored, abstract_subtree)
    except Exception as error:  # orbax/tensorstore raise many kinds
      raise self._read_error(step, error) from error
    return restored

  def _restore_step(self, abstract_state: PyTree, step: int) -> Restored:
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                              data=ocp.args.JsonRestore(),
                              meta=ocp.args.JsonRestore())
    try:
      with _quiet_orbax():
        restored = self._manager.restore(step, args=args)
    except Exception as error:  # orbax/tensorstore raise many kinds
      raise self._read_error(step, error) from error
    return Restored(step=step, state=restored.state,
                    data_state=dict(restored.data) or None,
                    meta=dict(restored.meta))

  def _read_error(self, step: int, error: Exception) -> CheckpointError:
    reason = type(error).__name__
    if str(error).strip():
      reason += f": {_first_line(error)}"
    return CheckpointError(
        f"checkpoint of step {step} in {self.directory} is unreadable "
        f"({reason})")


def _handlers() -> ocp.handlers.CheckpointHandlerRegistry:
  """The handlers of the three items: ``state`` is written by a handler of
  this manager's own (:func:`_state_writer`) and read by orbax's standard
  one; the format is the same."""
  registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
  registry.add("state", ocp.args.PyTreeSave, _state_writer())
  registry.add("state", ocp.args.StandardRestore)
  for item in ("data", "meta"):
    registry.add(item, ocp.args.JsonSave)
    registry.add(item, ocp.args.JsonRestore)
  return registry


def _state_writer() -> ocp.PyTreeCheckpointHandler:
  """In a single process, replicated arrays are written from one device.

  Orbax's default (replica-parallel saving, off by default on GPU only)
  has every device write a slice of each replicated array, which pays off
  when the replicas live on different hosts. In one process every slice is
  written by the same process anyway, and on CPU cutting them compiled
  about 100 small slicing programs: the first save of the tests' tiny
  model took 2.7 s instead of 0.5 s in a fresh process. The array handler
  is this writer's only: orbax's global registry belongs to the process.
  """
  if jax.process_count() > 1:
    return ocp.PyTreeCheckpointHandler()
  types = ocp.type_handlers
  registry = types.create_type_handler_registry(
      *((ty, types.get_type_handler(ty)) for ty in types.supported_types()),
      (jax.Array, types.ArrayHandler(use_replica_parallel=False)))
  return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


def _check_subtree(restored: PyTree, abstract: PyTree) -> None:
  """Raises ValueError unless every leaf of ``abstract`` was read with its
  shape: a partial restore leaves a leaf missing from the checkpoint as the
  ``jax.ShapeDtypeStruct`` it was given and reads a leaf of another shape
  as saved, both silently."""
  for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(restored),
                               jax.tree.leaves(abstract)):
    name = jax.tree_util.keystr(path, simple=True, separator=".")
    if isinstance(got, jax.ShapeDtypeStruct):
      raise ValueError(f"{name} is not in the checkpoint")
    if tuple(got.shape) != tuple(want.shape):
      raise ValueError(f"{name} has the shape {tuple(got.shape)} in the "
                       f"checkpoint, expected {tuple(want.shape)}")


def _metric_getter(name: str, mode: str):
  worst = -math.inf if mode == "max" else math.inf

  def get(metrics: dict[str, float]) -> float:
    # A missing or NaN value (e.g. APR without lesions) ranks last.
    value = float(metrics.get(name, worst))
    return worst if math.isnan(value) else value

  return get


# Below this many free bytes a failed write is put down to a full disk.
_FULL_DISK_BYTES = 1 << 20


def _disk_full(error: BaseException, directory: str | os.PathLike) -> bool:
  """Whether a failed write is due to a full disk.

  Either ENOSPC is somewhere in the exception chain, or the disk under
  ``directory`` has (almost) no space left: orbax's clean-up after a failed
  asynchronous write sometimes raises its own error (e.g. a missing
  temporary folder) in place of the ENOSPC that started it.
  """
  if any(getattr(link, "errno", None) == errno.ENOSPC
         or "No space left on device" in str(link) for link in _chain(error)):
    return True
  try:
    return shutil.disk_usage(directory).free < _FULL_DISK_BYTES
  except OSError:
    return False


def _chain(error: BaseException | None):
  """``error`` and the errors it was raised from or while handling."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    yield error
    error = error.__cause__ or error.__context__


_DAMAGE, _ENVIRONMENT = "damage", "environment"
# tensorstore raises ValueError with its status code first ("OUT_OF_RANGE:
# ..."; none for INVALID_ARGUMENT) and, for a failed system call, its errno
# as os_error_code. These codes without an errno mean missing or malformed
# stored bytes: a missing file (NOT_FOUND), one shorter than the index says
# (OUT_OF_RANGE), undecodable data (DATA_LOSS, FAILED_PRECONDITION).
_DAMAGE_CODES = ("NOT_FOUND", "OUT_OF_RANGE", "DATA_LOSS",
                 "FAILED_PRECONDITION")
_STATUS_CODE = re.compile(r"([A-Z][A-Z_]+): ")
_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")


def _is_corrupt(error: BaseException | None) -> bool:
  """Whether a failed read shows that the checkpoint's own files are damaged.

  The rule: some error of the chain (``error``, the errors it was raised
  from or while handling) is a sign of damage, and none is a sign of a
  failing environment (see :func:`_sign`). A damaged step is moved aside
  and its training redone, so only evident damage may cost that; any other
  failure (no permission, no memory, an I/O error, a target that does not
  fit, an error of unknown kind) is raised with the checkpoint in place.
  """
  signs = {_sign(link) for link in _chain(error)}
  return _DAMAGE in signs and _ENVIRONMENT not in signs


def _sign(error: BaseException) -> str | None:
  """What one error of a failed read says: damage, environment or nothing.

  Damage: a missing file (FileNotFoundError, orbax's KeyError for a missing
  item, tensorstore's NOT_FOUND or ENOENT), undecodable content (JSON,
  tensorstore's damage codes or "Error decoding"). Environment: any other
  errno (EACCES, EIO, ESTALE, ETIMEDOUT...), MemoryError, any other status
  code (RESOURCE_EXHAUSTED of an XLA allocation, PERMISSION_DENIED...).
  """
  if isinstance(error, MemoryError):
    return _ENVIRONMENT
  if isinstance(error, FileNotFoundError):
    return _DAMAGE
  if isinstance(error, OSError) and error.errno is not None:
    return _ENVIRONMENT
  if isinstance(error, (json.JSONDecodeError, UnicodeDecodeError)):
    return _DAMAGE
  text = str(error)
  if isinstance(error, KeyError) and "not found in the checkpoint" in text:
    return _DAMAGE
  if code := _OS_ERROR_CODE.search(text):
    return _DAMAGE if int(code.group(1)) == errno.ENOENT else _ENVIRONMENT
  if status := _STATUS_CODE.match(text):
    return _DAMAGE if status.group(1) in _DAMAGE_CODES else _ENVIRONMENT
  if isinstance(error, ValueError) and "Error decoding" in text:
    return _DAMAGE
  return None


def _first_line(error: Exception) -> str:
  text = str(error).strip()
  if "No space left on device" in text:
    return "no space left on device"
  return text.splitlines()[0][:300] if text else type(error).__name__


def _from_orbax(tb) -> bool:
  return tb is not None and any(
      f"{os.sep}orbax{os.sep}" in frame.filename
      for frame in traceback.extract_tb(tb))


class _OrbaxFailureFilter(logging.Filter):
  """Drops orbax's own reports of a failed write or read.

  When a save fails (a full disk) or a restore does not match, orbax logs the
  error with a traceback from each of its threads, and asyncio reports every
  unawaited write task; :class:`CheckpointManager` re-raises the failure as
  one :class:`CheckpointError`, so these reports only bury that line.
  """

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno >= logging.CRITICAL:
      return True
    if record.name == "absl":
      return f"{os.sep}orbax{os.sep}" not in record.pathname
    exc = record.exc_info[2] if record.exc_info else None
    return not (_from_orbax(exc) or "orbax-checkpoint-tmp" in
                record.getMessage())


def _unraisable_hook(unraisable: Any) -> None:
  """Drops the never-awaited orbax coroutines a failed restore leaves behind."""
  if not _from_orbax(unraisable.exc_traceback):
    _previous_unraisable_hook(unraisable)


_FILTER = _OrbaxFailureFilter()
_FILTERED_LOGGERS = ("absl", "asyncio")
# How many calls of managers (and pending asynchronous writes) need the
# filter and the hook; they are installed while there is one.
_quiet_lock = threading.Lock()
_quiet_users = 0
_previous_unraisable_hook = sys.unraisablehook


def _quiet_begin() -> None:
  """Installs the filter and the hook, unless another call already did."""
  global _quiet_users, _previous_unraisable_hook
  with _quiet_lock:
    _quiet_users += 1
    if _quiet_users == 1:
      for name in _FILTERED_LOGGERS:
        logging.getLogger(name).addFilter(_FILTER)
      _previous_unraisable_hook = sys.unraisablehook
      sys.unraisablehook = _unraisable_hook


def _quiet_end() -> None:
  """Removes them once no call needs them: they belong to the process."""
  global _quiet_users
  with _quiet_lock:
    _quiet_users -= 1
    if _quiet_users == 0:
      for name in _FILTERED_LOGGERS:
        logging.getLogger(name).removeFilter(_FILTER)
      if sys.unraisablehook is _unraisable_hook:  # else leave the newer one
        sys.unraisablehook = _previous_unraisable_hook


@contextlib.contextmanager
def _quiet_orbax():
  """Silences orbax's failure reports during one orbax call of a manager.

  A failed call leaves orbax's unawaited tasks behind, held by the frames
  of the error's traceback and reported when they are collected: the
  frames are let go and collected before the filters go (the error reaches
  the user as one line; its orbax frames would only be noise).
  """
  _quiet_begin()
  try:
    yield
  except Exception as error:
    for link in _chain(error):
      link.__traceback__ = None
    gc.collect()
    raise
  finally:
    _quiet_end()


def _warn(message: str) -> None:
  if jax.process_index() == 0:
    print(message, flush=True)
