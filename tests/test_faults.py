"""Faults that must not lose work: a full disk during a save, and SIGKILL.

The full-disk tests fill a real small file system where this machine lets the
test mount a tmpfs (root with CAP_SYS_ADMIN), and otherwise inject the error
orbax raises for a full disk (tensorstore's ``RESOURCE_EXHAUSTED ... No space
left on device``) at the same two places a real one surfaces: the ``save``
call (synchronous saves, or the failure of the previous asynchronous one) and
``wait_until_finished``. Either way the disk fills only after a first
checkpoint is complete, so no test depends on how large a checkpoint is or
how much space the machine has.
"""

import collections
import contextlib
import errno
import logging
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.helpers import (ROOT, saved_params, subprocess_env, tiny_config,
                           tiny_train_flags)
from tversky_jax import checkpoint
from tversky_jax import train_lib

shutil_usage = collections.namedtuple("shutil_usage", "total used free")
_ENOSPC = ("RESOURCE_EXHAUSTED: Failed writing: Failed to write 9600 bytes "
           "to file 14: No space left on device [os_error_code='28']")


class Disk:
  """A folder whose file system can be filled up and freed again.

  ``real`` says whether it is a tmpfs of its own (filled with a filler file)
  or an ordinary folder where a full disk is simulated at ``where``
  ("save" or "wait") of orbax's CheckpointManager.
  """

  def __init__(self, path, monkeypatch, where):
    self.path = str(path)
    self.where = where
    self._monkeypatch = monkeypatch
    self._full = False
    os.makedirs(self.path, exist_ok=True)
    self.real = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", self.path],
        capture_output=True).returncode == 0
    if not self.real:
      self._simulate()

  def _simulate(self):
    original = getattr(ocp.CheckpointManager, self._method)

    def failing(manager, *args, **kwargs):
      if self._full:
        raise ValueError(_ENOSPC)
      return original(manager, *args, **kwargs)

    self._monkeypatch.setattr(ocp.CheckpointManager, self._method, failing)

  @property
  def _method(self):
    return "save" if self.where == "save" else "wait_until_finished"

  def fill(self):
    self._full = True
    if self.real:
      with open(os.path.join(self.path, "filler"), "wb", buffering=0) as f:
        block = b"\0" * (1 << 16)
        try:
          while True:
            f.write(block)
        except OSError as error:
          assert error.errno == errno.ENOSPC
      # Smaller writes still fit into the last partial block; use them up.
      with open(os.path.join(self.path, "filler2"), "wb", buffering=0) as f:
        try:
          while True:
            f.write(b"\0")
        except OSError:
          pass

  def free(self):
    self._full = False
    for name in ("filler", "filler2"):
      with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(self.path, name))

  def release(self):
    if self.real:  # lazily: a failed background write may still hold a file
      subprocess.run(["umount", "-l", self.path], check=True)


@pytest.fixture(params=["save", "wait"])
def disk(request, tmp_path, monkeypatch):
  disk = Disk(tmp_path / "disk", monkeypatch, request.param)
  yield disk
  disk.release()


@pytest.mark.parametrize("async_save", [False, True])
def test_full_disk_fails_the_save_and_keeps_the_previous_checkpoint(
    disk, async_save):
  manager = checkpoint.CheckpointManager(
      os.path.join(disk.path, "ckpt"), max_to_keep=1, best_metric=None,
      async_save=async_save)
  state = {"w": np.arange(50_000, dtype=np.float32)}
  manager.save(1, state, data_state={"pos": 1}, meta={})
  manager.wait()
  disk.fill()
  with pytest.raises(checkpoint.CheckpointError,
                     match="no space left on device.*already on disk are "
                           "intact"):
    manager.save(2, {"w": state["w"] + 1}, data_state={"pos": 2}, meta={})
    manager.wait()
  # As a stopping run does: the failed write's clean-up in orbax's
  # background threads ends here, before the directory is opened again (it
  # raced with the new manager's removal of the same temporary folder).
  with contextlib.suppress(checkpoint.CheckpointError):
    manager.close()
  disk.free()
  manager = checkpoint.CheckpointManager(
      os.path.join(disk.path, "ckpt"), max_to_keep=1, best_metric=None,
      async_save=False)
  restored = manager.restore({"w": np.zeros(50_000, np.float32)})
  assert restored.step == 1 and restored.data_state == {"pos": 1}
  np.testing.assert_array_equal(restored.state["w"], state["w"])
  manager.save(2, {"w": state["w"] + 1}, data_state={"pos": 2}, meta={})
  assert manager.all_steps() == [2]  # the old one goes once the new is in
  manager.close()


def test_full_disk_stops_training_and_the_run_resumes_exactly(
    tiny_dataset, straight_run, disk):
  # keep_checkpoints=1: the only earlier checkpoint must survive the failure.
  config = tiny_config(tiny_dataset, **{"train.keep_checkpoints": 1})
  workdir = os.path.join(disk.path, "run")
  first = train_lib.train_and_evaluate(config, workdir, stop_after=2,
                                       progress=False)
  assert first.step == 2
  disk.fill()
  with pytest.raises(checkpoint.CheckpointError,
                     match="no space left on device.*already on disk are "
                           "intact"):
    train_lib.train_and_evaluate(config, workdir, progress=False)
  assert saved_params(workdir, config)[0] == 2
  disk.free()
  summary = train_lib.train_and_evaluate(config, workdir, progress=False)
  assert summary.step == 6 and not summary.interrupted
  step, params = saved_params(workdir, config)
  assert step == 6
  for a, b in zip(params, straight_run.params):
    np.testing.assert_array_equal(a, b)


def _committed_steps(workdir):
  folder = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(folder):
    return set()
  return {int(name) for name in os.listdir(folder) if name.isdigit()}


def _saving(workdir, since):
  """Whether a save (or the clean-up of a dead one) changed a temp folder."""
  folder = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(folder):
    return False
  for name in os.listdir(folder):
    if name.endswith("orbax-checkpoint-tmp"):
      with contextlib.suppress(FileNotFoundError):
        if os.stat(os.path.join(folder, name)).st_mtime > since:
          return True
  return False


def _kill_when(process, moment, workdir, rng, deadline):
  """SIGKILLs ``process`` during a save or just after a step; False if done."""
  seen, since = len(_committed_steps(workdir)), time.time()
  while process.poll() is None and time.time() < deadline:
    if moment == "save" and _saving(workdir, since):
      break
    if len(_committed_steps(workdir)) > seen:  # a save missed between polls
      if moment == "step":
        time.sleep(rng.uniform(0.0, 0.3))
      break
    time.sleep(0.002)
  if process.poll() is not None:
    return False
  process.send_signal(signal.SIGKILL)
  process.wait()
  return True


def test_sigkill_anywhere_resumes_from_a_committed_checkpoint(
    tiny_dataset, straight_run, tmp_path):
  """Kills a training process during a save, then its rerun just after a
  step; the final parameters still equal an uninterrupted run's, bit for
  bit."""
  workdir = tmp_path / "run"
  flags = tiny_train_flags(tiny_dataset, workdir,
                           **{"train.checkpoint_every": 1})
  # The session's compilation cache (conftest) spares the restarts the
  # compilation of the train step.
  env = subprocess_env(4)
  rng = random.Random(0)
  moments = ["save", "step"]  # during an async save; just after a step
  kills, resumes, committed = 0, 0, set()
  for attempt in range(len(moments) + 1):
    log_path = tmp_path / f"attempt{attempt}.log"
    with open(log_path, "w") as log:
      process = subprocess.Popen([sys.executable, "train.py", *flags],
                                 cwd=ROOT, env=env, stdout=log,
                                 stderr=subprocess.STDOUT)
      if attempt < len(moments):
        killed = _kill_when(process, moments[attempt], str(workdir), rng,
                            time.time() + 300)
      else:
        killed = False
      if not killed:
        assert process.wait(timeout=300) == 0, log_path.read_text()[-3000:]
    text = log_path.read_text()
    resumed = re.findall(r"Resumed from the checkpoint of step (\d+)", text)
    # A run resumes only from a step whose folder was committed (renamed)
    # when the previous process died.
    if resumed:
      assert int(resumed[0]) in committed, (committed, text)
      resumes += 1
    if not killed:
      break
    kills += 1
    committed = _committed_steps(str(workdir))
  assert kills >= 2 and resumes >= 1, (kills, resumes)
  assert "Done: 6 steps" in text
  step, params = saved_params(str(workdir), tiny_config(tiny_dataset))
  assert step == 6
  for a, b in zip(params, straight_run.params):
    np.testing.assert_array_equal(a, b)


def test_a_full_disk_is_named_even_behind_orbax_clean_up_errors(
    tmp_path, monkeypatch):
  """orbax's clean-up after a failed async write can raise its own error
  (e.g. a missing temporary folder) in place of the ENOSPC that started it:
  the one-line error still says the disk is full."""
  try:
    try:
      raise OSError(errno.ENOSPC, "No space left on device")
    except OSError:
      raise FileNotFoundError(errno.ENOENT, "No such file or directory",
                              "data.orbax-checkpoint-tmp")
  except FileNotFoundError as error:
    behind_clean_up = error
  # Plenty of free space, whatever this machine's disk holds: only the
  # exception chain tells.
  monkeypatch.setattr(checkpoint.shutil, "disk_usage",
                      lambda path: shutil_usage(total=1 << 40, used=0,
                                                free=1 << 40))
  manager = checkpoint.CheckpointManager(tmp_path / "ckpt", async_save=False)
  message = str(manager._write_error(behind_clean_up))
  assert "no space left on device" in message
  assert "already on disk are intact" in message
  other = str(manager._write_error(PermissionError(errno.EACCES, "denied")))
  assert "no space" not in other and "denied" in other
  # The same error on a disk with no space left is put down to the disk.
  monkeypatch.setattr(checkpoint.shutil, "disk_usage",
                      lambda path: shutil_usage(total=1 << 40, used=1 << 40,
                                                free=0))
  full = str(manager._write_error(PermissionError(errno.EACCES, "denied")))
  assert "no space left on device" in full
  manager.close()


def test_orbax_reports_of_a_failed_async_write_are_silenced_until_wait(
    tmp_path, monkeypatch, caplog, capfd):
  """A failed background write is reported by orbax's threads (with a
  traceback each), also after save() returned, before wait() raises it as
  one CheckpointError: the reports stay filtered from save() until wait(),
  then the filters go."""
  from orbax.checkpoint._src.metadata import checkpoint as orbax_metadata
  returned, failed = threading.Event(), threading.Event()
  silenced_at_failure = []

  def full_disk(store, path, metadata):
    returned.wait(timeout=30)  # fail once no call of the manager runs
    silenced_at_failure.append(_silenced())
    failed.set()
    raise OSError(errno.ENOSPC, "No space left on device")

  silenced = _silenced()  # False, unless a manager elsewhere is saving
  manager = checkpoint.CheckpointManager(tmp_path / "ckpt", best_metric=None)
  manager.save(1, {"w": np.arange(1000, dtype=np.float32)},
               data_state=None, meta={})
  manager.wait()
  monkeypatch.setattr(orbax_metadata._MetadataStoreImpl, "write", full_disk)
  caplog.set_level(logging.INFO)
  manager.save(2, {"w": np.ones(1000, np.float32)}, data_state=None,
               meta={})
  returned.set()
  assert failed.wait(timeout=30)
  with pytest.raises(checkpoint.CheckpointError,
                     match="no space left on device"):
    manager.wait()
  with contextlib.suppress(checkpoint.CheckpointError):
    manager.close()
  assert silenced_at_failure and all(silenced_at_failure)
  orbax = f"{os.sep}orbax{os.sep}"
  reports = [r for r in caplog.records
             if r.levelno >= logging.WARNING and orbax in r.pathname]
  assert not reports, [r.getMessage()[:200] for r in reports]
  assert "Traceback" not in "".join(capfd.readouterr())
  assert _silenced() == silenced


def _silenced():
  """Whether a report of orbax's is filtered out now."""
  return not logging.getLogger("absl").filter(logging.LogRecord(
      "absl", logging.ERROR, os.path.join(os.path.dirname(ocp.__file__),
                                          "checkpoint_manager.py"),
      1, "report", None, None))
