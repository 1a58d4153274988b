"""Training curves of one or more runs from their ``metrics.jsonl``.

Command line::

  python -m tversky_jax.plot_run runs/alpha03 [runs/alpha07 ...] \
      [--out curves.png]

Each workdir's ``metrics.jsonl`` holds one JSON object per logged step, e.g.
``{"step": 10, "train/loss": 0.8, "train/learning_rate": 1e-4}`` and
``{"step": 100, "val/dsc": 0.5, "val/pooled_dsc": 0.6, ...}`` (as
:class:`tversky_jax.metric_writer.MetricWriter` writes them). The figure has a
panel for the training loss (running mean, raw values faint), one for the
learning rate, and one per validation metric (mean over cases solid,
``pooled_`` dashed). Each run is one colour, labelled by its workdir name,
so runs with different alpha/beta can be compared. A run without
validation lines just has no validation curves. Steps logged twice (a
resumed run repeats the steps after its last checkpoint) keep the last
value.

Function API (the trainer calls it at the end of training)::

  plot_curves(["runs/alpha03"], "runs/alpha03/curves.png")
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

METRICS_FILE = "metrics.jsonl"
LOSS_KEY = "train/loss"
LEARNING_RATE_KEY = "train/learning_rate"
VAL_PREFIX = "val/"
POOLED_PREFIX = "pooled_"
SMOOTHING = 10  # logged points in the running mean of the loss

# A run's curves: key -> (steps, values), steps increasing.
Curves = dict[str, tuple[np.ndarray, np.ndarray]]


class RunError(ValueError):
  """A workdir without usable metrics (missing, empty or broken file)."""


def read_metrics(workdir: str | os.PathLike[str]) -> Curves:
  """Reads ``workdir/metrics.jsonl`` into one curve per key.

  A broken last line (a run still writing) is ignored.

  Args:
    workdir: a training workdir.

  Returns:
    key -> ``(steps int64 [n], values float64 [n])``, sorted by step, the
    last value kept for a repeated step; non-finite values are dropped.

  Raises:
    RunError: the file is missing, unreadable, has no metrics, or a line
      other than the last is not a JSON object with a ``step``.
  """
  path = Path(workdir) / METRICS_FILE
  try:
    lines = path.read_text().splitlines()
  except OSError as error:
    reason = ("no such file" if isinstance(error, FileNotFoundError)
              else error.strerror or str(error))
    raise RunError(f"{path}: {reason}") from None
  points: dict[str, dict[int, float]] = {}
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
      step = int(record.pop("step"))
    except (ValueError, KeyError, TypeError, AttributeError):
      if number == len(lines):
        continue
      raise RunError(
          f"{path}:{number}: not a JSON object with a step") from None
    for key, value in record.items():
      if isinstance(value, (int, float)) and math.isfinite(value):
        points.setdefault(key, {})[step] = float(value)
  if not points:
    raise RunError(f"{path}: no metrics (empty file)")
  return {key: (np.array(sorted(values), np.int64),
                np.array([values[s] for s in sorted(values)], np.float64))
          for key, values in points.items()}


def running_mean(values: np.ndarray, window: int = SMOOTHING) -> np.ndarray:
  """Mean of the last ``window`` values at each point (fewer at the start).

  Args:
    values: ``[n]``.
    window: at least 1.

  Returns:
    ``float64 [n]``.
  """
  values = np.asarray(values, np.float64)
  sums = np.cumsum(np.r_[0.0, values])
  ends = np.arange(1, values.size + 1)
  starts = np.maximum(ends - window, 0)
  return (sums[ends] - sums[starts]) / (ends - starts)


def run_labels(workdirs: Sequence[str | os.PathLike[str]]) -> list[str]:
  """Workdir names, or the paths as given when two names are equal."""
  names = [Path(w).resolve().name or str(w) for w in workdirs]
  if len(set(names)) == len(names):
    return names
  return [os.path.normpath(w) for w in workdirs]


def _validation_metrics(runs: Sequence[Curves]) -> list[str]:
  """Validation metric names (``pooled_`` folded in), first-seen order."""
  names: dict[str, None] = {}
  for curves in runs:
    for key in curves:
      if key.startswith(VAL_PREFIX):
        name = key[len(VAL_PREFIX):]
        names[name.removeprefix(POOLED_PREFIX)] = None
  return list(names)


def _plot_loss(ax, curves: Curves, colour, window: int) -> None:
  if LOSS_KEY not in curves:
    return
  steps, values = curves[LOSS_KEY]
  ax.plot(steps, values, color=colour, alpha=0.25, linewidth=0.8)
  ax.plot(steps, running_mean(values, window), color=colour, linewidth=1.6)


def _plot_validation(ax, curves: Curves, colour, metric: str) -> None:
  for key, style in ((VAL_PREFIX + metric, "-"),
                     (VAL_PREFIX + POOLED_PREFIX + metric, "--")):
    if key in curves:
      steps, values = curves[key]
      ax.plot(steps, values, style, color=colour, linewidth=1.4,
              marker="." if steps.size < 30 else None)


def _decorate(axes, metrics: Sequence[str], window: int,
              runs: Sequence[Curves]) -> None:
  axes[0].set_title(f"training loss (running mean of {window} logs)")
  axes[1].set_title("learning rate")
  axes[1].ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
  rates = np.concatenate([c[LEARNING_RATE_KEY][1] for c in runs
                          if LEARNING_RATE_KEY in c] or [np.zeros(0)])
  if rates.size and rates.min() > 0 and rates.max() > 20 * rates.min():
    axes[1].set_yscale("log")
  for ax, metric in zip(axes[2:], metrics):
    ax.set_title(f"validation {metric}")
  for ax in axes:
    ax.set_xlabel("step")
    ax.grid(True, alpha=0.3)


def _place_panels(fig, num_rows: int, num_cols: int) -> None:
  """Fixed margins in inches: room for tick labels, titles and the legend
  above. ``tight_layout`` measures every label by drawing the figure once
  more: with it, the 8 panels of a run's curves took a median 2.1-2.3 s to
  write on a 2-core CPU, 1.1-1.2 s with these margins (every training run
  writes them when it ends)."""
  width, height = fig.get_figwidth(), fig.get_figheight()
  fig.subplots_adjust(left=0.75 / width, right=1 - 0.3 / width,
                      bottom=0.5 / height, top=1 - 0.8 / height,
                      wspace=0.9 / (width / num_cols - 0.9),
                      hspace=0.85 / ((height - 1.3) / num_rows - 0.85))


def plot_curves(workdirs: Sequence[str | os.PathLike[str]],
                out_path: str | os.PathLike[str], *,
                smoothing: int = SMOOTHING) -> Path:
  """Writes the training curves of one or more runs as a PNG.

  Args:
    workdirs: training workdirs, each with a ``metrics.jsonl``.
    out_path: the PNG to write (parent folders are created).
    smoothing: logged points in the running mean of the training loss.

  Returns:
    The written path.

  Raises:
    RunError: a workdir has no usable metrics (see :func:`read_metrics`).
  """
  # pylint: disable=g-import-not-at-top
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  from matplotlib.lines import Line2D
  # pylint: enable=g-import-not-at-top
  if not workdirs:
    raise RunError("no workdir given")
  runs = [read_metrics(w) for w in workdirs]
  metrics = _validation_metrics(runs)
  num_panels = 2 + len(metrics)
  num_cols = min(3, num_panels)
  num_rows = math.ceil(num_panels / num_cols)
  fig = Figure(figsize=(4.2 * num_cols, 3.2 * num_rows + 0.5), dpi=100)
  FigureCanvasAgg(fig)
  axes = [fig.add_subplot(num_rows, num_cols, i + 1)
          for i in range(num_panels)]
  colours = [f"C{i % 10}" for i in range(len(runs))]
  for curves, colour in zip(runs, colours):
    _plot_loss(axes[0], curves, colour, smoothing)
    if LEARNING_RATE_KEY in curves:
      axes[1].plot(*curves[LEARNING_RATE_KEY], color=colour)
    for ax, metric in zip(axes[2:], metrics):
      _plot_validation(ax, curves, colour, metric)
  _decorate(axes, metrics, smoothing, runs)
  handles = [Line2D([], [], color=c, label=l)
             for c, l in zip(colours, run_labels(workdirs))]
  if metrics:
    handles += [Line2D([], [], color="k", label="validation: mean of cases"),
                Line2D([], [], color="k", linestyle="--", label="pooled")]
  fig.legend(handles=handles, loc="upper center", ncols=min(5, len(handles)),
             frameon=False)
  _place_panels(fig, num_rows, num_cols)
  out_path = Path(out_path)
  out_path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(out_path)
  return out_path


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the command line; returns the exit status."""
  parser = argparse.ArgumentParser(
      prog="python -m tversky_jax.plot_run",
      description="Plot training loss, learning rate and validation metrics "
      "of one or more training workdirs (from their metrics.jsonl).",
      epilog="Exit status: 0 done; 1 a missing/empty metrics.jsonl or an "
      "unwritable output (one-line message); 2 invalid arguments.")
  parser.add_argument("workdirs", nargs="+", metavar="WORKDIR",
                      help="training workdirs; one line per run")
  parser.add_argument("--out", metavar="FILE.png",
                      help="output PNG (default: WORKDIR/curves.png for one "
                      "run, ./curves.png for several)")
  parser.add_argument("--smoothing", type=int, default=SMOOTHING,
                      metavar="N", help="logged points in the loss running "
                      f"mean (default {SMOOTHING})")
  args = parser.parse_args(argv)
  if args.smoothing < 1:
    parser.error("--smoothing must be >= 1")
  out = args.out or (Path(args.workdirs[0]) / "curves.png"
                     if len(args.workdirs) == 1 else Path("curves.png"))
  try:
    path = plot_curves(args.workdirs, out, smoothing=args.smoothing)
  except (RunError, OSError) as error:
    print(f"error: {error}", file=sys.stderr)
    return 1
  print(f"Wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
