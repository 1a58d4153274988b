"""Stopping a training run cleanly on SIGINT/SIGTERM or a preemption notice."""

from __future__ import annotations

import signal
import sys

import jax
import tqdm


class StopOnSignal:
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


def _log(message: str) -> None:
  if jax.process_index() == 0:
    tqdm.tqdm.write(message, file=sys.stderr)
