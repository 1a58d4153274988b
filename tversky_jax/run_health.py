"""Health checks of a training run: a loss that is not finite, a network that
has stopped learning. Each stops the run with a message saying what to do;
the last good checkpoint stays.
"""

from __future__ import annotations

import numpy as np


class TrainingDiverged(RuntimeError):
  """The loss became NaN or infinite."""


class TrainingStuck(RuntimeError):
  """The gradient vanished for ``train.stuck_patience`` steps in a row."""


def check_finite(step_metrics, step: int, manager) -> float:
  # The loss of step k comes from the parameters before its update; a finite
  # gradient norm too means the updated parameters are finite.
  loss = float(step_metrics["loss"])
  if not (np.isfinite(loss) and np.isfinite(float(step_metrics["grad_norm"]))):
    manager.wait()
    latest = manager.latest_step()
    kept = (f"the last good checkpoint (step {latest}) is kept"
            if latest is not None else "no checkpoint had been written yet")
    raise TrainingDiverged(
        f"the loss (or its gradient) became "
        f"{loss if not np.isfinite(loss) else 'inf/nan'} at step {step}; "
        f"training stopped and {kept}. Lower optimizer.learning_rate, set "
        "optimizer.grad_clip_norm, or check the data.")
  return loss


class StuckDetector:
  """Notices a run whose gradient has vanished (a collapsed network).

  A network that predicts only background (e.g. the paper's network without
  normalisation on a hard task) has a loss stuck near its untrained value
  and a gradient norm orders of magnitude below the first steps'. After
  ``patience`` such steps in a row, :meth:`update` raises TrainingStuck.
  """

  def __init__(self, patience: int):
    self.patience = patience
    self.first_norm = None
    self.count = 0

  def update(self, step: int, loss: float, grad_norm: float) -> None:
    if not self.patience:
      return
    if self.first_norm is None:
      self.first_norm = max(grad_norm, 1e-30)
    vanished = grad_norm < 1e-3 * self.first_norm
    self.count = self.count + 1 if vanished else 0
    if self.count >= self.patience:
      raise TrainingStuck(
          f"training is stuck at step {step}: the gradient norm "
          f"({grad_norm:.3g}) has been below 1/1000 of the first step's "
          f"({self.first_norm:.3g}) for {self.count} steps, loss {loss:.4f}; "
          "the network has collapsed (it predicts one class everywhere). "
          "Try --config.model.normalization=instance, "
          "--config.loss.name=tversky_ce, --config.model.head_bias=prior or "
          "another optimizer.learning_rate; the last checkpoint is kept.")
