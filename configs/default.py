"""Every setting of a training run, with its default.

The other configs start from this one and change a few values. On the
command line any value can be overridden, e.g.
``python train.py --config configs/demo.py --config.loss.beta=0.8``;
a key that is not here is an error.
"""

import dataclasses

import ml_collections

from tversky_jax.data import augmentation


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.data = ml_collections.ConfigDict()
  # nnU-Net v2 raw dataset folder (dataset.json, imagesTr/, labelsTr/).
  config.data.root = "data/Dataset900_SyntheticLesions"
  # When `root` does not exist, write synthetic lesion phantoms there.
  config.data.synthesize_if_missing = False
  config.data.synthetic_cases = 12
  config.data.synthetic_shape = (48, 48, 48)
  # Training cases held out for validation (the last ones, sorted by name);
  # validation chooses the best checkpoint. 0: no validation.
  config.data.num_val_cases = 2
  # k-fold cross-validation over the cases sorted by name: with num_folds > 0
  # fold f holds out every case i with i % num_folds == f as a test set that
  # training never sees (predict it afterwards); validation then takes
  # num_val_cases of the remaining training cases.
  config.data.num_folds = 0
  config.data.fold = 0
  # Plan the dataset (target spacing: median, coarse axis of anisotropic data
  # from a lower percentile; normalisation by modality: CT clipped to the
  # foreground 0.5-99.5 percentiles and z-scored with the dataset's
  # foreground mean/std, other modalities z-scored per case inside the head)
  # and train from a cache resampled to that spacing. Prediction and
  # validation map the probabilities back to each scan's own grid. False:
  # every case as it is, z-scored per case (the paper's registered volumes).
  config.data.preprocess = True
  # Where the plan and the cache go; empty: <workdir>/preprocessed.
  config.data.cache_dir = ""
  # Per-channel normalisation override, e.g. ("ct", "zscore"); empty: by the
  # channel names of dataset.json.
  config.data.normalization = ()
  # Patch size [x, y, z] (on the planned grid); an empty tuple trains on whole
  # volumes (the paper), zero-padded to the network's divisors.
  config.data.patch_shape = (32, 32, 32)
  # Fraction of patches centred on a foreground voxel (of a foreground class
  # drawn uniformly among those in the case, as nnU-Net does).
  config.data.foreground_fraction = 0.33
  # Flips in the input pipeline (host); augment.p_mirror flips on the device.
  config.data.random_flip = False
  # Background processes decoding and cropping volumes (0: a background
  # thread of this process, the fastest on a 2-core CPU: 32 batches/s of
  # 2 x 128^3 patches, see docs/benchmarks.md; workers may pay off on
  # many-core hosts feeding a fast GPU, not measured yet).
  config.data.worker_count = 0
  config.data.prefetch_batches = 2

  config.model = ml_collections.ConfigDict()
  config.model.base_features = 16
  config.model.depth = 4
  # Per-stage pooling strides, e.g. ((2, 2, 1), (2, 2, 2), ...); empty: from
  # the target spacing (a coarse axis waits until the others catch up).
  config.model.strides = ()
  config.model.normalization = "instance"  # none (paper), group, instance, batch
  # Convolution initialisation: "he" (Kaiming normal, for ReLU) or "lecun".
  config.model.init = "he"
  # Bias of the last convolution: "zero", or "prior" (log class frequencies
  # of the training labels: the untrained network predicts them, not 1/K).
  # On the tiny phantoms "prior" made the paper's unnormalised network start
  # learning later in one seed of three (tests/test_real_data.py).
  config.model.head_bias = "zero"
  config.model.dtype = "float32"  # or bfloat16 (params stay float32)
  # 3x3x3 convolutions, all with the same parameters: "native" (cuDNN on
  # GPU), "onednn" (oneDNN on CPU, as fast as PyTorch's), "2d_sum" (three 2D
  # convolutions, 3-4x faster than native on CPU) or "auto" (onednn on one
  # CPU device where it can be built, else 2d_sum on CPU; native elsewhere).
  config.model.conv_impl = "auto"
  # nnU-Net deep supervision: extra logits heads on coarser decoder stages.
  config.model.deep_supervision = False

  config.loss = ml_collections.ConfigDict()
  # tversky, dice, focal_tversky, tversky_ce (Tversky + cross-entropy: the
  # cross-entropy keeps gradients alive where a patch has no foreground).
  config.loss.name = "tversky_ce"
  # alpha weighs false positives, beta false negatives (Salehi et al. 2017).
  config.loss.alpha = 0.3
  config.loss.beta = 0.7
  config.loss.gamma = 4.0 / 3.0  # focal_tversky only
  config.loss.ce_weight = 1.0  # tversky_ce only
  config.loss.smooth = 1e-5
  # Sum TP/FP/FN over the global batch before the ratio (batch Tversky).
  config.loss.pool_batch = True

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = "adam"  # adam, adamw, sgd
  config.optimizer.learning_rate = 3e-4
  # Learning rate multiplied by decay_rate every decay_steps (staircase).
  config.optimizer.decay_steps = 1000
  config.optimizer.decay_rate = 0.9
  # Linear warm-up of the learning rate from 0 over the first steps.
  config.optimizer.warmup_steps = 50
  config.optimizer.weight_decay = 0.0  # adamw only
  config.optimizer.momentum = 0.9  # sgd only
  config.optimizer.grad_clip_norm = 12.0  # 0 disables clipping

  # nnU-Net-style augmentation computed on the device inside the train step
  # (rotation, scaling, noise, blur, brightness, contrast, gamma, mirroring;
  # the fields of tversky_jax.data.augmentation.AugmentConfig).
  augment = dataclasses.asdict(augmentation.AugmentConfig())
  augment.pop("num_classes")  # the dataset's
  config.augment = ml_collections.ConfigDict(augment)

  config.train = ml_collections.ConfigDict()
  config.train.batch_size = 2  # global batch, split over all devices
  config.train.num_steps = 1000
  config.train.log_every = 10
  config.train.eval_every = 250
  config.train.checkpoint_every = 250
  config.train.keep_checkpoints = 3
  config.train.best_metric = "f2"  # dsc, sensitivity, precision, f2, apr
  # Stop a run whose loss stays near its untrained value with a vanishing
  # gradient for this many logged steps (0: never).
  config.train.stuck_patience = 200

  config.inference = ml_collections.ConfigDict()
  # Sliding window [x, y, z]; empty: the training patch shape.
  config.inference.window = ()
  config.inference.overlap = 0.5
  config.inference.batch_size = 2
  config.inference.mirror = False
  config.inference.threshold = 0.5
  return config
