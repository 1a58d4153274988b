"""Training metrics on disk: ``metrics.jsonl``, ``curves.png`` and, when the
optional ``tensorboard`` extra (tensorboardX) is installed, TensorBoard event
files with the same scalars and the validation overlay images."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import tqdm

from tversky_jax import plot_run


class MetricWriter:
  """Appends ``{"step": s, name: value, ...}`` lines to metrics.jsonl.

  Also writes TensorBoard event files (in ``workdir/tensorboard``) when
  tensorboardX is installed: every scalar, and the images of
  :meth:`write_images`. Disabled (``enabled=False``, the processes other
  than the first), it writes nothing.
  """

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self.workdir = workdir
    self._file = None
    self._tb = None
    if not enabled:
      return
    self._file = open(os.path.join(workdir, "metrics.jsonl"), "a")
    summary_writer = _tensorboardx_summary_writer()
    if summary_writer is not None:
      self._tb = summary_writer(os.path.join(workdir, "tensorboard"))

  @property
  def takes_images(self) -> bool:
    """Whether :meth:`write_images` writes anything (TensorBoard is on)."""
    return self._tb is not None

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

  def write_images(self, step: int, images: dict[str, np.ndarray]) -> None:
    """TensorBoard images ``{tag: uint8 [h, w, 3]}`` at ``step``; nothing
    without TensorBoard."""
    if self._tb is None:
      return
    for tag, rgb in images.items():
      self._tb.add_image(tag, np.asarray(rgb, np.uint8), int(step),
                         dataformats="HWC")

  def close(self) -> None:
    """Closes the files and draws ``workdir/curves.png`` from metrics.jsonl
    (a plot that fails never fails the run: a note on stderr)."""
    if self._file is not None:
      self._file.close()
      self._file = None
      try:
        plot_run.plot_curves([self.workdir],
                             os.path.join(self.workdir, "curves.png"))
      except (plot_run.RunError, OSError, ValueError) as error:
        tqdm.tqdm.write(f"note: no training curves ({error}).",
                        file=sys.stderr)
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def _tensorboardx_summary_writer():
  """tensorboardX's ``SummaryWriter`` class, or None when not installed.

  tensorboardX imports torch when it can, only to accept torch tensors,
  which we never pass: with PyTorch installed (as for most MONAI users)
  that took 4 s of every training run's start here. Unless torch is loaded
  already, it is hidden while tensorboardX is imported, and only then.
  """
  hide_torch = "torch" not in sys.modules
  if hide_torch:
    sys.modules["torch"] = None  # ``import torch`` raises ImportError
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    return SummaryWriter
  except ImportError:
    return None
  finally:
    if hide_torch:
      del sys.modules["torch"]
