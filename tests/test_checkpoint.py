"""CheckpointManager: which read failures move a checkpoint aside, and what
a manager leaves of the process's logging, unraisable hook and orbax's
global type handlers once its calls are done."""

import errno
import json
import logging
import os
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tversky_jax import checkpoint

_SIZE = 20_000  # large enough for orbax to write it to an OCDBT data file


def _state(step):
  return {"w": jnp.arange(_SIZE, dtype=jnp.float32) + step,
          "b": np.full(3, step, np.float32)}


def _target():
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return {"w": jax.ShapeDtypeStruct((_SIZE,), jnp.float32, sharding=sharding),
          "b": np.zeros(3, np.float32)}


@pytest.fixture
def two_steps(tmp_path):
  """A folder with the checkpoints of steps 1 and 2, and its manager."""
  manager = checkpoint.CheckpointManager(tmp_path / "ckpt", async_save=False,
                                         best_metric=None)
  for step in (1, 2):
    manager.save(step, _state(step), data_state={"pos": step}, meta={})
  yield manager
  manager.close()


def _failing_newest(monkeypatch, manager, error):
  """Makes orbax's restore of step 2 raise ``error``."""
  restore = manager._manager.restore

  def failing(step, *args, **kwargs):
    if step == 2:
      raise error
    return restore(step, *args, **kwargs)

  monkeypatch.setattr(manager._manager, "restore", failing)


def _tensorstore_error(status, os_code=None):
  """A ValueError worded as tensorstore words a failed read."""
  suffix = f" [os_error_code='{os_code}']" if os_code is not None else ""
  return ValueError(f'{status}: Error reading "w/0" in OCDBT database at '
                    f'local file "/x/2/state/": failed{suffix}')


def _chain(*errors):
  """The last error, raised while handling the ones before it."""
  for inner, outer in zip(errors, errors[1:]):
    outer.__context__ = inner
  return errors[-1]


def _xla_out_of_memory():
  return jax.errors.JaxRuntimeError(
      "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 4.00GiB.")


@pytest.mark.parametrize("error", [
    PermissionError(errno.EACCES, "Permission denied", "/x/2/meta/metadata"),
    MemoryError(),
    _xla_out_of_memory(),
    OSError(errno.EIO, "Input/output error"),
    OSError(errno.ESTALE, "Stale file handle"),
    TimeoutError(errno.ETIMEDOUT, "Connection timed out"),
    _tensorstore_error("PERMISSION_DENIED", errno.EACCES),
    _tensorstore_error("UNAVAILABLE"),
    # A failure of the environment while reading an existing file hides
    # behind a missing one (e.g. orbax's clean-up of a failed read).
    _chain(MemoryError(), FileNotFoundError(errno.ENOENT, "No such file")),
], ids=["EACCES", "MemoryError", "XLA_RESOURCE_EXHAUSTED", "EIO", "ESTALE",
        "ETIMEDOUT", "tensorstore_PERMISSION_DENIED", "tensorstore_UNAVAILABLE",
        "ENOENT_after_MemoryError"])
def test_a_read_failure_of_the_environment_moves_nothing(
    two_steps, monkeypatch, capsys, error):
  folder = two_steps.directory
  before = sorted(os.listdir(folder))
  _failing_newest(monkeypatch, two_steps, error)
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"step 2 .*nothing was moved") as raised:
    two_steps.restore(_target())
  message = str(raised.value)
  assert "\n" not in message and type(error).__name__ in message
  assert sorted(os.listdir(folder)) == before
  assert two_steps.all_steps() == [1, 2]
  assert "trying the previous checkpoint" not in capsys.readouterr().out


def _data_files(step_folder):
  return [p for p in (step_folder / "state").rglob("*")
          if p.is_file() and p.parent.name == "d"]


def _truncate(step_folder):
  for path in _data_files(step_folder):
    with open(path, "r+b") as f:
      f.truncate(path.stat().st_size // 3)


def _delete_data_file(step_folder):
  for path in _data_files(step_folder):
    path.unlink()


def _bad_json(step_folder):
  (step_folder / "meta" / "metadata").write_text("{not json")


def _no_meta_file(step_folder):
  (step_folder / "meta" / "metadata").unlink()


@pytest.mark.parametrize("damage", [_truncate, _delete_data_file, _bad_json,
                                    _no_meta_file])
def test_a_damaged_checkpoint_is_moved_aside(two_steps, capsys, damage):
  folder = two_steps.directory
  damage(pathlib.Path(folder) / "2")
  # A step asked for by number is reported, not moved.
  with pytest.raises(checkpoint.CheckpointError,
                     match="checkpoint of step 2 .* is unreadable"):
    two_steps.restore(_target(), step=2)
  assert two_steps.all_steps() == [1, 2]
  restored = two_steps.restore(_target())
  assert restored.step == 1 and restored.data_state == {"pos": 1}
  np.testing.assert_array_equal(restored.state["w"], _state(1)["w"])
  assert two_steps.all_steps() == [1]
  assert [n for n in os.listdir(folder) if n.startswith("unreadable_step2_")]
  assert "trying the previous checkpoint" in capsys.readouterr().out


def test_what_counts_as_damage():
  damaged = [
      FileNotFoundError("File /x/2/meta/metadata not found."),
      json.JSONDecodeError("Expecting value", "{", 1),
      KeyError('Item "state" was not found in the checkpoint.'),
      _tensorstore_error("OUT_OF_RANGE"),
      _tensorstore_error("NOT_FOUND"),
      _tensorstore_error("DATA_LOSS"),
      ValueError('Error reading "w/.zarray": Error decoding b-tree node: '
                 "Data corruption detected"),
      _chain(_tensorstore_error("OUT_OF_RANGE"),
             Exception("Encountered error while reading array index")),
  ]
  not_damaged = [
      MemoryError(), _xla_out_of_memory(),
      PermissionError(errno.EACCES, "Permission denied"),
      OSError(errno.EIO, "Input/output error"),
      _tensorstore_error("NOT_FOUND", errno.ENODEV),
      _tensorstore_error("FAILED_PRECONDITION", errno.EBUSY),
      _tensorstore_error("RESOURCE_EXHAUSTED", errno.ENOMEM),
      ValueError("User-provided restore item and on-disk value metadata "
                 "tree structures do not match"),
      RuntimeError("something else"),
      _chain(OSError(errno.EIO, "Input/output error"),
             FileNotFoundError("File /x/2/meta/metadata not found.")),
  ]
  for error in damaged:
    assert checkpoint._is_corrupt(error), error
  for error in not_damaged:
    assert not checkpoint._is_corrupt(error), error


def _orbax_report():
  """A log record as orbax's own modules write one."""
  return logging.LogRecord(
      "absl", logging.ERROR,
      os.path.join(os.path.dirname(ocp.__file__), "checkpoint_manager.py"),
      1, "Save Finalize thread failed.", None, None)


def _silenced():
  return not logging.getLogger("absl").filter(_orbax_report())


def test_a_manager_leaves_the_process_as_it_found_it(tmp_path):
  """Filters, the unraisable hook and orbax's global array handler are
  the process's; a manager may change them only during its own calls."""
  filters = {name: list(logging.getLogger(name).filters)
             for name in ("absl", "asyncio")}
  hook = sys.unraisablehook
  array_handler = ocp.type_handlers.get_type_handler(jax.Array)
  silenced = _silenced()  # False, unless a manager elsewhere is saving
  manager = checkpoint.CheckpointManager(tmp_path / "ckpt", best_metric=None)
  assert _silenced() == silenced
  manager.save(1, _state(1), data_state={"pos": 1}, meta={})
  # The write goes on in orbax's threads, which report a failure.
  assert _silenced()
  manager.wait()
  assert _silenced() == silenced
  assert manager.restore(_target()).step == 1
  assert manager.restore_meta(1) == {"step": 1}
  manager.close()
  for name, before in filters.items():
    assert logging.getLogger(name).filters == before
  assert sys.unraisablehook is hook
  assert ocp.type_handlers.get_type_handler(jax.Array) is array_handler


def test_replicated_arrays_are_written_whole_by_this_manager_only(
    tmp_path, monkeypatch):
  """In one process the manager writes replicated arrays from one device
  (no replica-parallel slicing); orbax's global handler is not used."""
  used = []
  serialize = ocp.type_handlers.ArrayHandler.serialize

  async def spy(handler, *args, **kwargs):
    used.append(handler)
    return await serialize(handler, *args, **kwargs)

  monkeypatch.setattr(ocp.type_handlers.ArrayHandler, "serialize", spy)
  manager = checkpoint.CheckpointManager(tmp_path / "ckpt", async_save=False,
                                         best_metric=None)
  manager.save(1, _state(1), data_state=None, meta={})
  manager.close()
  assert used
  assert all(h is not ocp.type_handlers.get_type_handler(jax.Array)
             and h._use_replica_parallel is False for h in used)
