"""Training and validation of the 3D U-Net with the Tversky loss family.

``train_and_evaluate(config, workdir)`` is the whole job and reads like the
recipe: check the config, prepare the data, build the model and optimizer,
resume from the latest checkpoint in ``workdir`` if there is one, train with
one jitted data-parallel step, validate with the paper's metrics, keep
checkpoints. ``train.py`` only parses flags and calls it. The pieces live in
their own modules: :mod:`configuration`, :mod:`training_data`,
:mod:`train_state`, :mod:`validation`, :mod:`metric_writer`,
:mod:`preemption` and :mod:`checkpoint`.

Data parallelism: the global batch is sharded over a 1-D mesh of every device
(``tversky_jax.parallel``); parameters and optimizer state are replicated, and
XLA inserts the gradient all-reduce. The result equals a single-device run on
the same global batch up to float rounding.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
import os
import sys
import time
from typing import Sequence

import jax
import ml_collections
import numpy as np
import tqdm

from tversky_jax import checkpoint as checkpoint_lib
from tversky_jax import configuration
from tversky_jax import operating_point as operating_point_lib
from tversky_jax import parallel
from tversky_jax import preemption
from tversky_jax import run_health
from tversky_jax import train_state as train_state_lib
from tversky_jax import training_data
from tversky_jax import validation
from tversky_jax.configuration import ConfigError
from tversky_jax.run_health import TrainingDiverged
from tversky_jax.run_health import TrainingStuck
from tversky_jax.data import nifti
from tversky_jax.data import pipeline
from tversky_jax.metric_writer import MetricWriter

# Logged steps in the running mean of the training loss: single batches jump
# between ~0.3 and 1.0 (a patch without foreground scores 1).
LOSS_WINDOW = 20

# What :func:`train_and_evaluate` raises for a problem of the user's config,
# data, disk or run, each with a one-line message; train.py and the sweep
# print it as "error: ..." without a traceback.
USER_ERRORS = (ConfigError, nifti.DatasetError, checkpoint_lib.CheckpointError,
               TrainingDiverged, TrainingStuck)

__all__ = ["ConfigError", "TrainingDiverged", "TrainingStuck", "TrainSummary",
           "USER_ERRORS", "train_and_evaluate"]


@dataclasses.dataclass
class TrainSummary:
  """What :func:`train_and_evaluate` returns."""

  step: int
  interrupted: bool
  last_loss: float
  best_step: int | None
  best_metrics: dict[str, float]
  final_metrics: dict[str, float]
  # The threshold chosen on the validation cases for the best checkpoint
  # (None: not validated, apr, or more than two classes).
  operating_point: operating_point_lib.OperatingPoint | None = None


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
      per logged step in ``workdir/metrics.jsonl``, the config in
      ``workdir/config.json`` and the training curves in
      ``workdir/curves.png``. Each validated checkpoint also stores the
      lesion threshold chosen on the validation cases
      (:mod:`tversky_jax.operating_point`), for ``tversky-predict
      --threshold chosen``.
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
    tversky_jax.checkpoint.CheckpointError: a checkpoint cannot be written
      (e.g. a full disk); the earlier ones stay.
  """
  devices = list(jax.devices() if devices is None else devices)
  configuration.validate_config(config, num_devices=len(devices))
  _make_workdir(workdir)
  run = _Run(config, workdir, devices, progress)
  try:
    run.restore()
    with preemption.StopOnSignal() as stop_signal:
      run.train(stop_after, stop_signal)
  except BaseException:
    run.abandon()
    raise
  return run.finish()


class _Run:
  """The state of one :func:`train_and_evaluate` call and its steps."""

  def __init__(self, config, workdir, devices, progress):
    self.config, self.workdir = config, workdir
    self.is_lead = jax.process_index() == 0
    self.progress = progress and self.is_lead
    self.data = training_data.load(config, workdir, progress=self.progress)
    self.spec = training_data.model_spec(config, self.data)
    divisors = self.spec.divisors(config.model.depth)
    patch_shape = tuple(config.data.patch_shape) or None
    configuration.check_patch_shape(patch_shape, divisors)
    whole = pipeline.whole_volume_shape(self.data.train_cases, divisors)
    self._warn_large_patch(patch_shape, divisors)
    self.window = tuple(config.inference.window) or patch_shape or whole
    self.batch_voxels = config.train.batch_size * math.prod(
        patch_shape or whole)
    self.manager = checkpoint_lib.CheckpointManager(
        os.path.join(workdir, "checkpoints"),
        max_to_keep=config.train.keep_checkpoints,
        best_metric=config.train.best_metric)
    self._check_resumable()  # before anything is initialised or compiled
    self.mesh = parallel.make_mesh(devices)
    self.local_mesh = parallel.make_mesh(
        [d for d in devices if d.process_index == jax.process_index()])
    graphdef, self.state = train_state_lib.create_train_state(
        config, self.spec, self.mesh)
    self.train_step, self.logits = train_state_lib.jitted_steps(
        config, self.spec, graphdef, self.data.num_classes, self.mesh)
    self.loss_args = train_state_lib.loss_args(config)  # alpha, beta
    self.schedule = train_state_lib.make_schedule(config)
    self.data_iter = pipeline.make_train_iterator(
        self.data.train_cases, global_batch_size=config.train.batch_size,
        patch_shape=patch_shape, divisor=divisors,
        foreground_fraction=config.data.foreground_fraction,
        random_flip=config.data.random_flip, seed=config.seed,
        process_index=jax.process_index(), process_count=jax.process_count(),
        worker_count=config.data.worker_count,
        prefetch_batches=config.data.prefetch_batches)
    self.writer = None
    self.step = self.saved_step = self.start_step = 0
    self.last_loss = math.nan
    self.losses = collections.deque(maxlen=LOSS_WINDOW)
    self.stuck = run_health.StuckDetector(config.train.stuck_patience)
    self.final_metrics: dict[str, float] = {}
    self.pending = None  # (step, metrics) of the step not yet checked

  def _warn_large_patch(self, patch_shape, divisors) -> None:
    """A warning on stderr when every patch is partly zero padding."""
    largest = tuple(int(s) for s in np.max(
        [c.label.shape for c in self.data.train_cases], axis=0))
    warning = configuration.patch_shape_warning(
        patch_shape, largest, divisors, planned=self.data.plan is not None)
    if warning:
      _log(warning)

  def _check_resumable(self) -> None:
    """Raises ConfigError when the run in ``workdir`` cannot go on."""
    config, workdir = self.config, self.workdir
    latest = self.manager.latest_step()
    if latest is not None:
      configuration.check_resumable(config, workdir)
      meta = self._saved_meta(latest)
      configuration.check_same_channels(
          meta.get("channel_names"), self.data.dataset.channel_names,
          str(self.data.dataset.root), workdir)
      if meta:  # an unreadable one is reported when restoring
        configuration.check_state_format(
            meta.get("state_format"), train_state_lib.STATE_FORMAT, workdir)

  def restore(self) -> None:
    """Resumes from the latest checkpoint in ``workdir``, if there is one."""
    config, workdir = self.config, self.workdir
    if self.is_lead and configuration.write_config(config, workdir):
      _log(f"note: the config differs from the one in {workdir}/config.json; "
           "the run continues from its checkpoint with the new config.")
    restored = self.manager.restore(
        train_state_lib.abstract_state(self.state))
    if restored is not None:
      self.state, self.start_step = restored.state, restored.step
      if restored.data_state:
        self.data_iter.set_state(restored.data_state)
      _log(f"Resumed from the checkpoint of step {restored.step} in "
           f"{workdir}.")
    self.step = self.saved_step = self.start_step
    self.writer = MetricWriter(workdir, enabled=self.is_lead)

  def _saved_meta(self, step) -> dict:
    try:
      return self.manager.restore_meta(step)
    except checkpoint_lib.CheckpointError:
      return {}  # unreadable: restoring reports it and takes an older one

  def train(self, stop_after, stop_signal) -> None:
    """Steps until ``train.num_steps``, ``stop_after`` or a stop signal."""
    num_steps = self.config.train.num_steps
    last_step = num_steps if stop_after is None else min(
        num_steps, self.start_step + stop_after)
    bar = tqdm.tqdm(total=num_steps, initial=self.start_step, unit="step",
                    disable=not self.progress, dynamic_ncols=True)
    timer = [time.perf_counter(), 0]  # start of the logging window, steps
    while self.step < last_step and not stop_signal.should_stop(self.step):
      batch = parallel.global_batch(next(self.data_iter), self.mesh)
      self.state, step_metrics = self.train_step(self.state, batch,
                                                 self.loss_args)
      self.step += 1
      timer[1] += 1
      self._flush()
      # The loss of step k is read on the host while step k + 1 runs, so the
      # device never waits for the check; every save flushes it first, so a
      # NaN state is never written.
      self.pending = (self.step, step_metrics)
      if self._due(self.config.train.log_every) or self.step == last_step:
        self._log_train(step_metrics, timer, bar)
      bar.update(1)
      if self._due(self.config.train.eval_every) or (
          self.config.train.eval_every and self.step == num_steps):
        self._save(*self._validate())
      elif self._due(self.config.train.checkpoint_every):
        self._save()
    self._flush()
    bar.close()
    if self.step != self.saved_step:
      self._save()
    if self.step < num_steps:
      _log(f"Stopped at step {self.step}; checkpoint saved. Run the same "
           "command again to resume.")

  def _due(self, every: int) -> bool:
    return bool(every) and self.step % every == 0

  def _flush(self) -> None:
    if self.pending is not None:
      step, step_metrics = self.pending
      self.pending = None
      self.last_loss = run_health.check_finite(step_metrics, step, self.manager)
      self.losses.append(self.last_loss)
      self.stuck.update(step, self.last_loss, float(step_metrics["grad_norm"]))

  def _log_train(self, step_metrics, timer, bar) -> None:
    self._flush()
    rate = timer[1] / max(time.perf_counter() - timer[0], 1e-9)
    mean_loss = float(np.mean(self.losses))
    self.writer.write(self.step, {
        "train/loss": self.last_loss, "train/loss_mean": mean_loss,
        "train/grad_norm": float(step_metrics["grad_norm"]),
        "train/learning_rate": float(self.schedule(self.step - 1)),
        "train/steps_per_s": rate,
        "train/voxels_per_s": rate * self.batch_voxels})
    bar.set_postfix(loss=f"{mean_loss:.4f}", steps_s=f"{rate:.2f}",
                    vox_s=f"{rate * self.batch_voxels:.3g}")
    timer[:] = [time.perf_counter(), 0]

  def _validate(self) -> tuple[dict[str, float] | None,
                               operating_point_lib.OperatingPoint | None]:
    """(finite validation metrics, operating point); (None, None) without
    validation cases."""
    if not self.data.val_cases:
      return None, None
    # Each process validates on its own devices with a local copy of the
    # replicated state (the global one spans devices it cannot address).
    local_state = parallel.localize(self.state, self.local_mesh)
    search = None
    if operating_point_lib.searched(self.config.train.best_metric,
                                    self.data.num_classes):
      search = operating_point_lib.Search(self.config.train.best_metric,
                                          self.config.inference.threshold)
    values = self.final_metrics = validation.validate(
        self.data.val_cases, lambda x: self.logits(local_state, x),
        self.config, self.window, training_data.class_names(self.data.dataset),
        list(self.local_mesh.devices.flat), self.writer, self.step,
        on_case=search.add if search else None)
    point = search.finish() if search else None
    if point is not None:
      self.writer.write(self.step, {f"val/{k}": v
                                    for k, v in point.scalars().items()})
    return {k: v for k, v in values.items() if np.isfinite(v)}, point

  def _save(self, metrics: dict[str, float] | None = None,
            point: operating_point_lib.OperatingPoint | None = None) -> None:
    self._flush()
    self.saved_step = self.step
    self.manager.save(
        self.step, self.state, data_state=self.data_iter.get_state(),
        meta={"config": self.config.to_dict(), "metrics": metrics or {},
              "channel_names": list(self.data.dataset.channel_names),
              "class_names": training_data.class_names(self.data.dataset),
              "model": self.spec.to_dict(),
              "state_format": train_state_lib.STATE_FORMAT,
              "plan": self.data.plan.to_json() if self.data.plan else None,
              "dataset_root": os.path.abspath(self.config.data.root),
              operating_point_lib.META_KEY: point.to_dict() if point else None},
        metrics=metrics)

  def abandon(self) -> None:
    """Closes what :meth:`finish` closes when training raised: the pending
    checkpoint write is finished (a failed one was already reported), and
    nothing is left for the interpreter's exit (tensorboardX's exit
    handler prints a traceback on Python 3.12 for an open writer). Best
    effort: the error that stopped training is the one to report (a full
    disk also fails the writer's last flush)."""
    closers = [self.data_iter.close, self.manager.close]
    if self.writer is not None:
      closers.append(self.writer.close)
    for close in closers:
      with contextlib.suppress(Exception):
        close()

  def finish(self) -> TrainSummary:
    """Waits for the last checkpoint, closes everything, plots the curves."""
    self.data_iter.close()
    self.manager.wait()
    best_step = self.manager.best_step()
    best_meta = {}
    if best_step is not None:
      best_meta = self.manager.restore_meta(best_step)
    best_metrics = best_meta.get("metrics", {})
    stored_point = best_meta.get(operating_point_lib.META_KEY)
    self.manager.close()
    self.writer.close()  # and draws curves.png
    interrupted = self.step < self.config.train.num_steps
    if self.is_lead and not interrupted and best_metrics:
      _log(f"Best validation {self.config.train.best_metric} at step "
           f"{best_step}: " + validation.format_metrics(best_metrics))
      line = operating_point_lib.summary_line(
          stored_point, best_step, self.config.train.best_metric,
          self.data.num_classes, self.config.inference.threshold)
      if line:
        _log(line)
    return TrainSummary(
        step=self.step, interrupted=interrupted, last_loss=self.last_loss,
        best_step=best_step, best_metrics=best_metrics,
        final_metrics=self.final_metrics,
        operating_point=operating_point_lib.OperatingPoint.from_dict(
            stored_point))


def _make_workdir(workdir: str) -> None:
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as error:
    raise ConfigError(f"--workdir={workdir}: cannot create it "
                      f"({error.strerror or error})") from None


def _log(message: str) -> None:
  if jax.process_index() == 0:
    tqdm.tqdm.write(message, file=sys.stderr)
