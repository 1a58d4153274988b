"""The model, optimizer, loss and the jitted steps of training.

``create_train_state`` builds the U-Net and its optax optimizer as one NNX
state pytree, replicated over the mesh; ``make_train_step`` returns the one
jitted, donated, data-parallel optimisation step that consumes and returns
it; ``make_logits_fn`` the jitted forward pass for validation and
prediction.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import ml_collections
import optax
from flax import nnx

from tversky_jax import losses
from tversky_jax import parallel
from tversky_jax.configuration import DTYPES
from tversky_jax.models import unet3d

TrainState = Any  # nnx.State of (model, optimizer)


def build_model(config: ml_collections.ConfigDict, in_channels: int,
                seed: int) -> unet3d.UNet3D:
  """The U-Net of ``config.model`` for ``in_channels`` input channels.

  ``model.conv_impl="auto"`` picks the three-2D-convolution form of the 3x3x3
  convolutions on CPU (3-4x faster there, see bench/bench_conv3d.py) and the
  native 3D convolution (cuDNN) on GPU and TPU; the parameters are the same.
  """
  conv_impl = config.model.conv_impl
  if conv_impl == "auto":
    conv_impl = "2d_sum" if jax.default_backend() == "cpu" else "native"
  # The "rbg" generator initialises in seconds where the default threefry
  # compiles a kernel per parameter shape (~30 s for the paper's network on
  # CPU); only the initial values depend on it.
  return unet3d.UNet3D(
      in_channels=in_channels, num_classes=2,
      base_features=config.model.base_features, depth=config.model.depth,
      normalization=config.model.normalization,
      dtype=DTYPES[config.model.dtype], conv_impl=conv_impl,
      rngs=nnx.Rngs(jax.random.key(seed, impl="rbg")))


def make_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Learning rate x ``decay_rate`` every ``decay_steps`` steps (staircase)."""
  opt = config.optimizer
  return optax.exponential_decay(opt.learning_rate, opt.decay_steps,
                                 opt.decay_rate, staircase=True)


def make_optimizer(config: ml_collections.ConfigDict
                   ) -> optax.GradientTransformation:
  """optax optimizer with the staircase exponential decay of the paper.

  The learning rate is multiplied by ``decay_rate`` every ``decay_steps``
  steps (the paper: 1e-4, x0.9 every 1000 steps, Adam).
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
  return tx


def make_loss_fn(config: ml_collections.ConfigDict
                 ) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """``loss(logits [b, x, y, z, 2], labels [b, x, y, z]) -> scalar``.

  alpha weighs false positives and beta false negatives (Salehi et al.).
  """
  cfg = config.loss
  common = dict(smooth=cfg.smooth, pool_batch=cfg.pool_batch)
  if cfg.name == "dice":
    return lambda logits, labels: losses.dice_loss(logits, labels, **common)
  common.update(alpha=cfg.alpha, beta=cfg.beta)
  if cfg.name == "tversky":
    return lambda logits, labels: losses.tversky_loss(logits, labels, **common)
  if cfg.name == "focal_tversky":
    return lambda logits, labels: losses.focal_tversky_loss(
        logits, labels, gamma=cfg.gamma, **common)
  return lambda logits, labels: losses.tversky_ce_loss(
      logits, labels, ce_weight=cfg.ce_weight, **common)


def create_train_state(config: ml_collections.ConfigDict, in_channels: int,
                       mesh: jax.sharding.Mesh
                       ) -> tuple[nnx.GraphDef, TrainState]:
  """Initialises model and optimizer, replicated over ``mesh``.

  Returns the graph definition (static structure) and the state pytree that
  the jitted step consumes and returns.
  """
  model = build_model(config, in_channels, config.seed)
  optimizer = nnx.Optimizer(model, make_optimizer(config), wrt=nnx.Param)
  graphdef, state = nnx.split((model, optimizer))
  return graphdef, parallel.replicate(state, mesh)


def make_train_step(graphdef: nnx.GraphDef, loss_fn: Callable,
                    mesh: jax.sharding.Mesh):
  """One jitted, donated, data-parallel optimisation step.

  ``step(state, batch) -> (state, {"loss", "grad_norm"})`` with ``batch`` =
  ``{"image": [B, x, y, z, c], "label": [B, x, y, z]}`` sharded over the
  mesh's ``"data"`` axis and ``state`` replicated.
  """

  def step(state, batch):
    model, optimizer = nnx.merge(graphdef, state)

    def loss_of(model):
      return loss_fn(model(batch["image"]), batch["label"])

    loss, grads = nnx.value_and_grad(loss_of)(model)
    optimizer.update(model, grads)
    new_state = nnx.state((model, optimizer))
    return new_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

  replicated = parallel.replicated(mesh)
  return jax.jit(step, in_shardings=(replicated, parallel.batch_sharding(mesh)),
                 out_shardings=(replicated, replicated), donate_argnums=0)


def make_logits_fn(graphdef: nnx.GraphDef):
  """Jitted ``logits(state, images [n, x, y, z, c]) -> [n, x, y, z, 2]``."""

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
