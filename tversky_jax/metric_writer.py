"""Training metrics on disk: ``metrics.jsonl`` (and TensorBoard, if installed)."""

from __future__ import annotations

import json
import os


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
