"""The model, optimizer, loss and the jitted steps of training.

``create_train_state`` builds the U-Net and its optax optimizer as one NNX
state pytree, replicated over the mesh; ``make_train_step`` returns the one
jitted, donated, data-parallel optimisation step that consumes and returns
it; ``make_logits_fn`` the jitted forward pass for validation and
prediction.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any, Callable

import jax
import ml_collections
import optax
from flax import nnx

from tversky_jax import deep_supervision
from tversky_jax import losses
from tversky_jax import parallel
from tversky_jax.configuration import DTYPES
from tversky_jax.data import augmentation
from tversky_jax.models import unet3d

TrainState = Any  # nnx.State of (model, optimizer)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """What the network's shape depends on besides ``config.model``.

  Stored with every checkpoint, so that prediction rebuilds the same network.

  Attributes:
    in_channels: input channels (the dataset's modalities).
    num_classes: softmax classes, background included.
    strides: per-stage pooling strides ``((sx, sy, sz), ...)``; None:
      ``config.model.depth`` stages of 2x2x2 (the paper's network).
    head_bias: initial bias of the last convolution (one per class), or
      None for zeros.
  """

  in_channels: int
  num_classes: int = 2
  strides: tuple[tuple[int, int, int], ...] | None = None
  head_bias: tuple[float, ...] | None = None

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, values: dict[str, Any]) -> "ModelSpec":
    strides = values.get("strides")
    bias = values.get("head_bias")
    return cls(int(values["in_channels"]), int(values.get("num_classes", 2)),
               tuple(tuple(int(v) for v in s) for s in strides)
               if strides else None,
               tuple(float(b) for b in bias) if bias else None)

  def divisors(self, depth: int) -> tuple[int, int, int]:
    """Every spatial input size must be a multiple of these, per axis
    (``depth`` stages of 2x2x2 pooling when there are no ``strides``)."""
    return unet3d.required_divisors(
        self.strides or unet3d.default_strides(depth))


def build_model(config: ml_collections.ConfigDict, spec: ModelSpec,
                seed: int | jax.Array, num_devices: int | None = None
                ) -> unet3d.UNet3D:
  """The U-Net of ``config.model`` with the shape of ``spec``.

  ``model.conv_impl="auto"`` picks oneDNN's 3x3x3 convolutions on a
  single-device CPU (3-4x faster there than the three-2D-convolution form,
  which it picks on a CPU without oneDNN or with several devices; see
  bench/bench_conv3d.py) and the native 3D convolution (cuDNN) on GPU and
  TPU: ``unet3d.default_conv_impl``, for a mesh of ``num_devices``
  (default: all devices). The parameters are the same.
  """
  conv_impl = config.model.conv_impl
  if conv_impl == "auto":
    conv_impl = unet3d.default_conv_impl(num_devices)
  # The "rbg" generator initialises in seconds where the default threefry
  # compiles a kernel per parameter shape (~30 s for the paper's network on
  # CPU); only the initial values depend on it.
  return unet3d.UNet3D(
      in_channels=spec.in_channels, num_classes=spec.num_classes,
      base_features=config.model.base_features,
      depth=None if spec.strides else config.model.depth,
      strides=spec.strides, normalization=config.model.normalization,
      init=config.model.get("init", "lecun"), head_bias_init=spec.head_bias,
      dtype=DTYPES[config.model.dtype], conv_impl=conv_impl,
      deep_supervision=config.model.get("deep_supervision", False),
      rngs=nnx.Rngs(jax.random.key(seed, impl="rbg")))


def make_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Learning rate: linear warm-up from 0 over ``warmup_steps``, then x
  ``decay_rate`` every ``decay_steps`` steps (staircase; the paper's)."""
  opt = config.optimizer
  warmup = opt.get("warmup_steps", 0)
  if not warmup:
    return optax.exponential_decay(opt.learning_rate, opt.decay_steps,
                                   opt.decay_rate, staircase=True)
  return optax.warmup_exponential_decay_schedule(
      0.0, opt.learning_rate, warmup, opt.decay_steps, opt.decay_rate,
      staircase=True)


def augment_config(config, num_classes: int):
  """The on-device augmentation of ``config.augment``; None when it is off."""
  if not config.augment.enabled:
    return None
  return augmentation.AugmentConfig.from_dict(
      dict(config.augment.to_dict(), num_classes=num_classes))


# The layout of the train state in checkpoints, saved with each one. 2: the
# optimizer's state over one flat parameter vector (make_optimizer); the
# checkpoints of earlier versions (no number) hold it per parameter and can
# no longer resume training (their model still loads for prediction).
STATE_FORMAT = 2


def make_optimizer(config: ml_collections.ConfigDict
                   ) -> optax.GradientTransformation:
  """optax optimizer with the staircase exponential decay of the paper.

  The learning rate is multiplied by ``decay_rate`` every ``decay_steps``
  steps (the paper: 1e-4, x0.9 every 1000 steps, Adam).

  The optimizer works on all parameters as one vector (``optax.flatten``):
  its moments are one array each, not one per parameter. The updates are
  the same (up to the float rounding of the global norm); the train step
  has one update to compile instead of one per parameter. XLA:CPU compiled
  the step at 2 x 32^3 in a median 5.8 s instead of 7.2 s (demo network)
  and 4.1 s instead of 6.5 s (paper network), fresh processes taking turns
  on this project's 2-core CPU, at the same step time. Checkpoints store the
  optimizer's state in this form (:data:`STATE_FORMAT`).
  """
  opt = config.optimizer
  schedule = make_schedule(config)
  if opt.name == "adam":
    tx = optax.adam(schedule)
  elif opt.name == "adamw":
    tx = optax.adamw(schedule, weight_decay=opt.weight_decay)
  else:
    tx = optax.sgd(schedule, momentum=opt.momentum)
  if opt.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(opt.grad_clip_norm), tx)
  return optax.flatten(tx)


def make_loss_fn(config: ml_collections.ConfigDict
                 ) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """``loss(logits [b, x, y, z, K], labels [b, x, y, z]) -> scalar``.

  Softmax over the K classes; the background (class 0) is left out of the
  Tversky terms (and kept in the cross-entropy of ``tversky_ce``).

  alpha weighs false positives and beta false negatives (Salehi et al.).
  It is ``weighted_loss_fn(config)`` with ``loss_args(config)`` bound.
  """
  return functools.partial(weighted_loss_fn(config), **loss_args(config))


def loss_args(config: ml_collections.ConfigDict) -> dict[str, float]:
  """The loss weights the train step takes as arguments, not as constants.

  ``{"alpha": ..., "beta": ...}`` (alpha weighs false positives, beta false
  negatives) for the Tversky losses, ``{}`` for ``dice``. A step compiled
  once serves every alpha and beta: the sweep over them
  (:mod:`tversky_jax.experiments.sweep`) compiles one train step, not one
  per setting.
  """
  if config.loss.name == "dice":
    return {}
  return {"alpha": float(config.loss.alpha), "beta": float(config.loss.beta)}


def weighted_loss_fn(config: ml_collections.ConfigDict) -> Callable[..., jax.Array]:
  """``loss(logits, labels, **loss_args(config)) -> scalar``.

  As :func:`make_loss_fn`, with alpha and beta (Tversky losses) as keyword
  arguments, which may be traced. The same ``config.loss`` settings, alpha
  and beta aside, give the same function object, so that
  :func:`jitted_steps` can reuse a step traced for them.
  """
  section = config.loss.to_dict()
  for name in ("alpha", "beta"):
    section.pop(name, None)
  return _loss_fn(_frozen(ml_collections.ConfigDict(section)))


def _frozen(section: ml_collections.ConfigDict) -> str:
  """A hashable, order-independent form of a config section."""
  return json.dumps(section.to_dict(), sort_keys=True, default=repr)


@functools.lru_cache(maxsize=32)
def _loss_fn(frozen_loss: str) -> Callable[..., jax.Array]:
  cfg = ml_collections.ConfigDict(json.loads(frozen_loss))
  common = dict(smooth=cfg.smooth, pool_batch=cfg.pool_batch)
  if cfg.name == "dice":
    return lambda logits, labels: losses.dice_loss(logits, labels, **common)
  if cfg.name == "tversky":
    return lambda logits, labels, **weights: losses.tversky_loss(
        logits, labels, **weights, **common)
  if cfg.name == "focal_tversky":
    return lambda logits, labels, **weights: losses.focal_tversky_loss(
        logits, labels, gamma=cfg.gamma, **weights, **common)
  return lambda logits, labels, **weights: losses.tversky_ce_loss(
      logits, labels, ce_weight=cfg.ce_weight, **weights, **common)


def create_train_state(config: ml_collections.ConfigDict,
                       spec: ModelSpec | int, mesh: jax.sharding.Mesh
                       ) -> tuple[nnx.GraphDef, TrainState]:
  """Initialises model and optimizer, replicated over ``mesh``.

  Args:
    config: ``model`` and ``optimizer`` keys of ``configs/default.py``.
    spec: the network's :class:`ModelSpec` (an int: that many input channels,
      two classes, ``config.model.depth`` stages of 2x2x2 pooling).
    mesh: the devices to replicate over.

  Returns the graph definition (static structure) and the state pytree that
  the jitted step consumes and returns.

  The state is initialised by one jitted call on the default device, then
  copied to every device: the same values bit for bit as eager
  initialisation, which compiles a program per operation and parameter
  shape (on the 2-core CPU 6.5 instead of 10-12 s for the paper's and the
  default network, 4.3-5.4 instead of 8.1-8.6 s for the demo's). Later
  calls in the process with the same model, optimizer, network shape and
  device count (any seed) reuse it; the program does not depend on the
  convolution form or the learning rate, so with a persistent compilation
  cache such runs share its compilation too.
  """
  spec = ModelSpec(spec) if isinstance(spec, int) else spec
  key = (_frozen(config.model), _frozen(config.optimizer), spec, mesh.size)

  def make_init():
    captured = {}

    def init(seed):
      model = build_model(config, spec, seed, mesh.size)
      optimizer = nnx.Optimizer(model, make_optimizer(config), wrt=nnx.Param)
      captured["graphdef"], state = nnx.split((model, optimizer))
      return state

    return jax.jit(init), captured

  init, captured = _cached(_INITS, key, make_init)
  state = parallel.replicate(init(config.seed), mesh)
  return captured["graphdef"], state


# The jitted initialisations and steps of earlier runs in this process, by
# everything they depend on (at most _MAX_CACHED of each, oldest dropped
# first).
_INITS: dict[tuple, tuple[Callable, dict]] = {}
_STEPS: dict[tuple, tuple[Callable, Callable]] = {}
_MAX_CACHED = 8


def _cached(cache: dict, key: tuple, make: Callable[[], Any]) -> Any:
  if key not in cache:
    while len(cache) >= _MAX_CACHED:
      cache.pop(next(iter(cache)))
    cache[key] = make()
  return cache[key]


def jitted_steps(config: ml_collections.ConfigDict, spec: ModelSpec,
                 graphdef: nnx.GraphDef, num_classes: int,
                 mesh: jax.sharding.Mesh) -> tuple[Callable, Callable]:
  """``(make_train_step(...), make_logits_fn(graphdef))`` for ``config``.

  The train step is called as ``step(state, batch, loss_args(config))``.
  A second run in the same process with the same model, optimizer, loss
  (alpha and beta aside: they are arguments), augmentation, network shape
  and devices (a sweep's settings, folds and seeds, a resumed run, the
  tests) gets the same jitted functions back, so it skips tracing and
  compiling them again (about 3 s of tracing even for a tiny network on
  CPU). ``graphdef`` must be ``create_train_state(config, spec, mesh)``'s:
  the state pytree the steps consume depends only on these keys.
  """
  loss_fn = weighted_loss_fn(config)
  augment = augment_config(config, num_classes)
  key = (_frozen(config.model), _frozen(config.optimizer), loss_fn, augment,
         config.seed if augment is not None else None, spec, mesh)
  return _cached(_STEPS, key, lambda: (
      make_train_step(graphdef, loss_fn, mesh, augment=augment,
                      seed=config.seed),
      make_logits_fn(graphdef)))


# Separates the augmentation's random stream from every other use of the seed.
_AUGMENT_STREAM = 0x61756700


def make_train_step(graphdef: nnx.GraphDef, loss_fn: Callable,
                    mesh: jax.sharding.Mesh,
                    augment: augmentation.AugmentConfig | None = None,
                    seed: int = 0):
  """One jitted, donated, data-parallel optimisation step.

  ``step(state, batch, loss_args) -> (state, {"loss", "grad_norm"})`` with
  ``batch`` = ``{"image": [B, x, y, z, c], "label": [B, x, y, z]}`` sharded
  over the mesh's ``"data"`` axis, ``state`` replicated, and the loss
  ``loss_fn(logits, labels, **loss_args)``: ``loss_args`` is a dict of
  scalars (:func:`loss_args`: alpha, the false-positive weight, and beta,
  the false-negative weight; ``{}`` for a ``loss_fn`` that takes none,
  such as :func:`make_loss_fn`'s), traced, so new values do not compile
  the step again. With ``augment``, the batch is augmented on the device
  first (:func:`augmentation.augment`), with a key drawn from ``seed`` and
  the optimizer's step counter, so a resumed run sees exactly the
  augmentations of an uninterrupted one.
  """
  augmenting = augment is not None and not augment.is_identity

  def step(state, batch, loss_args):
    model, optimizer = nnx.merge(graphdef, state)
    image, label = batch["image"], batch["label"]
    if augmenting:
      key = jax.random.fold_in(
          jax.random.fold_in(jax.random.key(seed), _AUGMENT_STREAM),
          optimizer.step[...])
      image, label = augmentation.augment(key, image, label, augment)
    weighted = functools.partial(loss_fn, **loss_args)

    def loss_of(model):  # with deep supervision: the weighted multi-scale loss
      return deep_supervision.training_loss(model, image, label, weighted)

    loss, grads = nnx.value_and_grad(loss_of)(model)
    optimizer.update(model, grads)
    new_state = nnx.state((model, optimizer))
    return new_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

  replicated = parallel.replicated(mesh)
  return jax.jit(
      step, in_shardings=(replicated, parallel.batch_sharding(mesh), replicated),
      out_shardings=(replicated, replicated), donate_argnums=0)


def make_logits_fn(graphdef: nnx.GraphDef):
  """Jitted ``logits(state, images [n, x, y, z, c]) -> [n, x, y, z, K]``."""

  @jax.jit
  def logits(state, images):
    model, _ = nnx.merge(graphdef, state)
    model.eval()
    return model(images)

  return logits


def abstract_state(state: TrainState) -> TrainState:
  """``jax.ShapeDtypeStruct`` (with shardings) of every leaf: a restore target."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
      state)
