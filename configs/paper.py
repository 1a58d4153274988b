"""Salehi et al. (2017): whole 128x224x256 volumes, Adam 1e-4 x0.9/1000 steps.

Three input channels (T1, T2, FLAIR), whole-volume training (no patches),
Tversky loss with alpha = 0.3 (false positives) and beta = 0.7 (false
negatives). Point ``data.root`` at an nnU-Net-layout dataset of registered
volumes, e.g. ``--config.data.root=/data/Dataset001_MSSEG``. The paper trained
1000 epochs of its 7-8 training volumes per fold (two-fold cross-validation
of 15 cases) in batches of one: run ``--config.data.fold=0`` and ``=1``.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.data.root = "data/Dataset001_Lesions"
  # The paper's volumes are registered to one grid: no resampling, each
  # scan z-scored as it is.
  config.data.preprocess = False
  config.data.patch_shape = ()  # whole volumes
  config.data.num_folds = 2  # the paper's two-fold cross-validation
  # Validation (choosing the best checkpoint) on one case of the training
  # fold; the held-out fold is only predicted, never used for selection.
  config.data.num_val_cases = 1

  # The paper's network has no normalisation. What keeps it from collapsing
  # to all-background (not in the paper, and not changing the network): He
  # initialisation, a learning-rate warm-up and gradient clipping (defaults);
  # a stuck run stops with a message (train.stuck_patience).
  config.model.normalization = "none"
  config.augment.enabled = False

  config.loss.name = "tversky"  # alpha 0.3 (FP), beta 0.7 (FN): the defaults
  config.loss.pool_batch = False
  config.optimizer.learning_rate = 1e-4  # x0.9 every 1000 steps (default)

  config.train.batch_size = 1
  config.train.num_steps = 7500  # ~1000 epochs of a fold's 7-8 volumes
  config.train.eval_every = 500
  config.train.checkpoint_every = 500
  config.inference.window = (128, 224, 256)
  return config
