"""The alpha/beta replication sweep of Table 1 (Salehi et al. 2017) on phantoms.

  python -m tversky_jax.experiments.sweep --config configs/sweep.py \
      --workdir runs/sweep [--config.sweep.seeds=3] [--config.data.root=DATA]

Every training run of the sweep uses this config with only ``loss.alpha``,
``loss.beta``, ``seed`` and ``data.fold`` changed (see
``tversky_jax/experiments/sweep.py``). ``seed`` is the seed of the first of
``sweep.seeds`` seeds; a run's seed sets both the model initialisation and the
training data order (patch positions, flips, case order). Validation during
training is off (``train.eval_every = 0``): the held-out fold is only
predicted, with the final checkpoint, after training, so it never selects a
checkpoint.

Default data: synthetic lesion phantoms (``data.root = ""``: written to
``<workdir>/Dataset902_SweepPhantoms`` on first use, from ``sweep.data_seed``,
the same for every run). Point ``data.root`` at any nnU-Net-layout dataset to
run the sweep on your own data.

Size: chosen so the default sweep (5 settings x 2 seeds x 2 folds = 20
trainings) runs in under 30 minutes on a 2-core CPU; see docs/results.md.
Lesions are 0.1-0.5 % of the phantoms' voxels (about 450:1 on average, the
paper's > 500:1 imbalance); half of the training patches are centred on a
lesion voxel, which lowers the imbalance the loss sees during training to
roughly 100:1-200:1. Held-out cases are predicted whole (sliding window).
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.seed = 0

  config.data.root = ""  # "": phantoms under the sweep's workdir
  config.data.synthesize_if_missing = True
  config.data.synthetic_cases = 16
  config.data.synthetic_shape = (32, 32, 32)
  # Random 24^3 patches, half of them centred on a lesion voxel. Whole-volume
  # training (the paper's) was tried and is unstable at this budget: with no
  # normalisation the logits run away and the softmax saturates (loss stuck
  # at 1, zero gradient) in many runs at lr 1e-3 and some at 3e-4, while
  # lr 1e-4 is too slow for ~300 steps; see docs/results.md.
  config.data.patch_shape = (24, 24, 24)
  config.data.foreground_fraction = 0.5
  config.data.random_flip = True
  config.data.num_val_cases = 0  # unused: the sweep sets data.num_folds

  # The paper's network and loss: no normalisation, no augmentation, the
  # Tversky loss alone (the default recipe's instance norm, augmentation and
  # Tversky + CE are not what Table 1 compares; with them the 400 steps here
  # reached a held-out DSC of only ~0.07 on the phantoms).
  config.model.base_features = 8
  config.model.depth = 3
  config.model.normalization = "none"
  config.augment.enabled = False

  config.loss.name = "tversky"
  config.loss.pool_batch = False

  # 3e-4, not the demo's 1e-3: at 1e-3 the logits of 2 of 20 runs ran away
  # in the first 40 steps (softmax saturated, loss stuck at 1, zero
  # gradient), which decided the ranking of the settings; see
  # docs/results.md. The paper: 1e-4 x0.9 every 1000 steps, for ~8000 steps.
  config.optimizer.learning_rate = 3e-4
  config.optimizer.decay_steps = 100
  config.optimizer.decay_rate = 0.9

  # Two patches per step, the loss averaged over them (loss.pool_batch off),
  # the paper's per-volume loss. (One sample per step, the paper's batch,
  # fails in the grain pipeline at present: see docs/results.md.)
  config.train.batch_size = 2
  config.train.num_steps = 400
  config.train.log_every = 20
  config.train.eval_every = 0  # the held-out fold must not pick a checkpoint
  config.train.checkpoint_every = 0  # only the final one (and on Ctrl-C)
  config.train.keep_checkpoints = 1
  # A run that collapses (loss stuck at 1, no gradient) is an outcome of the
  # setting, counted as a failed run in the report: it must not stop the
  # sweep.
  config.train.stuck_patience = 0

  config.inference.window = ()  # the training patch, overlap 0.5
  config.inference.overlap = 0.5
  config.inference.threshold = 0.5

  config.sweep = ml_collections.ConfigDict()
  # (alpha, beta): alpha weighs false positives, beta false negatives.
  config.sweep.settings = ((0.5, 0.5), (0.4, 0.6), (0.3, 0.7), (0.2, 0.8),
                           (0.1, 0.9))
  # Seeds config.seed, config.seed + 1, ...; each varies model init and data
  # order together, identically for every setting (paired comparison).
  config.sweep.seeds = 2
  # k-fold cross-validation over the cases (the paper: two folds).
  config.sweep.num_folds = 2
  # Seed of the synthetic phantoms (the dataset is the same for all runs).
  config.sweep.data_seed = 0
  # Persistent XLA compilation cache: "auto" = <workdir>/jax_cache, "" = off.
  config.sweep.compilation_cache = "auto"
  return config
