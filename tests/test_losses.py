"""Tests of tversky_jax.losses against a float64 NumPy reference of Eq. 3."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from tversky_jax import losses

# --------------------------------------------------------------------------
# NumPy reference (float64), written from the paper's formula.
# --------------------------------------------------------------------------


def np_softmax(z):
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def np_sigmoid(z):
  return 1.0 / (1.0 + np.exp(-z))


def np_stats(probs, onehot, weight=None, soft_label=False):
  """Eq. 3 sums per case and class; probs/onehot [B, *spatial, C]."""
  axes = tuple(range(1, probs.ndim - 1))
  w = 1.0 if weight is None else weight[..., None]
  if soft_label:
    tp = np.sum(w * np.minimum(probs, onehot), axes)
    fp = np.sum(w * np.maximum(probs - onehot, 0), axes)
    fn = np.sum(w * np.maximum(onehot - probs, 0), axes)
  else:
    tp = np.sum(w * probs * onehot, axes)
    fp = np.sum(w * probs * (1 - onehot), axes)
    fn = np.sum(w * (1 - probs) * onehot, axes)
  return tp, fp, fn


def np_tversky(tp, fp, fn, alpha, beta, smooth=1e-5):
  return (tp + smooth) / (tp + alpha * fp + beta * fn + smooth)


def random_case(seed, shape, num_classes, foreground=0.1):
  rng = np.random.default_rng(seed)
  logits = rng.normal(scale=2.0, size=shape + (num_classes,)).astype(np.float32)
  labels = rng.integers(1, num_classes, size=shape) * (
      rng.random(shape) < foreground * (num_classes - 1))
  return logits, labels.astype(np.int32)


def onehot(labels, num_classes):
  return np.eye(num_classes)[labels]


# --------------------------------------------------------------------------
# Values against the reference
# --------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 9, 10, 11), (3, 12, 13)],
                         ids=["3d", "2d"])
@pytest.mark.parametrize("num_classes", [2, 4])
@pytest.mark.parametrize("include_background", [False, True])
@pytest.mark.parametrize("alpha,beta", [(0.3, 0.7), (0.5, 0.5), (0.9, 0.1)])
def test_softmax_matches_reference(shape, num_classes, include_background,
                                   alpha, beta):
  logits, labels = random_case(0, shape, num_classes)
  tp, fp, fn = np_stats(np_softmax(logits.astype(np.float64)),
                        onehot(labels, num_classes))
  expected = 1 - np_tversky(tp, fp, fn, alpha, beta)
  if not include_background:
    expected = expected[:, 1:]
  got = losses.tversky_loss(logits, labels, alpha=alpha, beta=beta,
                            include_background=include_background,
                            reduction="none")
  np.testing.assert_allclose(got, expected, rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(
      losses.tversky_loss(logits, labels, alpha=alpha, beta=beta,
                          include_background=include_background),
      expected.mean(), rtol=2e-5)
  np.testing.assert_allclose(
      losses.tversky_loss(logits, labels, alpha=alpha, beta=beta,
                          include_background=include_background,
                          reduction="sum"),
      expected.sum(), rtol=2e-5)


def test_binary_default_is_the_papers_lesion_class_loss():
  # Two-class softmax: T = sum p0 g0 / (sum p0 g0 + a sum p0 g1 + b sum p1 g0)
  # with p0, g0 the lesion class (our class 1).
  logits, labels = random_case(1, (2, 16, 16, 16), 2, foreground=0.02)
  p = np_softmax(logits.astype(np.float64))
  p_lesion, g_lesion = p[..., 1], (labels == 1).astype(np.float64)
  axes = (1, 2, 3)
  tp = np.sum(p_lesion * g_lesion, axes)
  t = tp / (tp + 0.3 * np.sum(p_lesion * (1 - g_lesion), axes)
            + 0.7 * np.sum((1 - p_lesion) * g_lesion, axes))
  np.testing.assert_allclose(losses.tversky_loss(logits, labels),
                             np.mean(1 - t), rtol=1e-5)


@pytest.mark.parametrize("labels_kind", ["dense", "binary_map"])
def test_sigmoid_matches_reference(labels_kind):
  rng = np.random.default_rng(2)
  num_channels = 3 if labels_kind == "dense" else 1
  logits = rng.normal(size=(2, 8, 9, 10, num_channels)).astype(np.float32)
  targets = (rng.random((2, 8, 9, 10, num_channels)) < 0.2).astype(np.float32)
  tp, fp, fn = np_stats(np_sigmoid(logits.astype(np.float64)), targets)
  expected = 1 - np_tversky(tp, fp, fn, 0.2, 0.8)
  labels = targets if labels_kind == "dense" else targets[..., 0].astype(int)
  got = losses.tversky_loss(logits, labels, alpha=0.2, beta=0.8,
                            activation="sigmoid", reduction="none")
  np.testing.assert_allclose(got, expected, rtol=2e-5)


def test_probabilities_and_soft_labels():
  rng = np.random.default_rng(3)
  probs = np_softmax(rng.normal(size=(2, 7, 8, 9, 3)))
  soft = np_softmax(rng.normal(size=(2, 7, 8, 9, 3)) * 3)
  for soft_label in (False, True):
    tp, fp, fn = np_stats(probs, soft, soft_label=soft_label)
    expected = 1 - np_tversky(tp, fp, fn, 0.3, 0.7)[:, 1:]
    got = losses.tversky_loss(probs.astype(np.float32), soft.astype(np.float32),
                              from_logits=False, soft_label=soft_label,
                              reduction="none")
    np.testing.assert_allclose(got, expected, rtol=2e-5)


def test_soft_label_form_is_zero_at_the_target_and_equal_on_hard_labels():
  rng = np.random.default_rng(4)
  probs = np_softmax(rng.normal(size=(2, 6, 6, 6, 2))).astype(np.float32)
  # A soft target equal to the prediction is a perfect score only in L1 form.
  l1 = losses.tversky_loss(probs, probs, from_logits=False, soft_label=True)
  product = losses.tversky_loss(probs, probs, from_logits=False)
  assert float(l1) < 1e-6
  assert float(product) > 0.05
  labels = (rng.random((2, 6, 6, 6)) < 0.3).astype(np.int32)
  np.testing.assert_allclose(
      losses.tversky_loss(probs, labels, from_logits=False, soft_label=True),
      losses.tversky_loss(probs, labels, from_logits=False), rtol=1e-6)


def test_mask_and_ignore_index_drop_voxels():
  logits, labels = random_case(5, (2, 10, 10, 10), 3)
  rng = np.random.default_rng(5)
  keep = rng.random(labels.shape) < 0.7
  tp, fp, fn = np_stats(np_softmax(logits.astype(np.float64)),
                        onehot(labels, 3), weight=keep.astype(np.float64))
  expected = (1 - np_tversky(tp, fp, fn, 0.3, 0.7))[:, 1:]
  by_mask = losses.tversky_loss(logits, labels, mask=keep, reduction="none")
  np.testing.assert_allclose(by_mask, expected, rtol=2e-5)
  ignored = np.where(keep, labels, 255)
  by_index = losses.tversky_loss(logits, ignored, ignore_index=255,
                                 reduction="none")
  np.testing.assert_allclose(by_index, expected, rtol=2e-5)
  # Dropped voxels get no gradient.
  grad = jax.grad(losses.tversky_loss)(logits, ignored, ignore_index=255)
  assert np.all(np.asarray(grad)[~keep] == 0)
  assert np.any(np.asarray(grad)[keep] != 0)


def test_pool_batch_and_class_weights():
  logits, labels = random_case(6, (3, 8, 8, 8), 3)
  tp, fp, fn = np_stats(np_softmax(logits.astype(np.float64)),
                        onehot(labels, 3))
  pooled = 1 - np_tversky(tp.sum(0), fp.sum(0), fn.sum(0), 0.3, 0.7)[1:]
  # reduction="none" with pool_batch: one value per class, [classes'].
  got = losses.tversky_loss(logits, labels, pool_batch=True, reduction="none")
  assert got.shape == (2,)
  np.testing.assert_allclose(got, pooled, rtol=2e-5)
  weights = np.array([1.0, 3.0])
  per_case = (1 - np_tversky(tp, fp, fn, 0.3, 0.7))[:, 1:]
  np.testing.assert_allclose(
      losses.tversky_loss(logits, labels, class_weights=weights),
      np.sum(per_case * weights) / (3 * weights.sum()), rtol=2e-5)
  np.testing.assert_allclose(
      losses.tversky_loss(logits, labels, class_weights=weights,
                          reduction="none"), per_case * weights, rtol=2e-5)


def test_confusion_stats_shapes_and_values():
  logits, labels = random_case(7, (2, 5, 6, 7), 3)
  tp, fp, fn = losses.confusion_stats(logits, labels)
  assert tp.shape == fp.shape == fn.shape == (2, 2)
  ref = np_stats(np_softmax(logits.astype(np.float64)), onehot(labels, 3))
  for got, want in zip((tp, fp, fn), ref):
    np.testing.assert_allclose(got, want[:, 1:], rtol=1e-5)
  pooled = losses.confusion_stats(logits, labels, pool_batch=True,
                                  include_background=True)
  assert pooled[0].shape == (1, 3)
  np.testing.assert_allclose(pooled[0][0], ref[0].sum(0), rtol=1e-5)


# --------------------------------------------------------------------------
# Special cases of the index
# --------------------------------------------------------------------------


def hard_masks(seed, shape=(2, 12, 12, 12)):
  rng = np.random.default_rng(seed)
  pred = rng.random(shape) < 0.2
  truth = rng.random(shape) < 0.15
  probs = np.stack([1.0 - pred, pred], -1).astype(np.float32)
  return probs, truth.astype(np.int32), pred, truth


def counts(pred, truth):
  axes = (1, 2, 3)
  return (np.sum(pred & truth, axes), np.sum(pred & ~truth, axes),
          np.sum(~pred & truth, axes))


def test_half_half_is_dice_and_one_one_is_jaccard():
  probs, labels, pred, truth = hard_masks(8)
  tp, fp, fn = counts(pred, truth)
  dice = 2 * tp / (2 * tp + fp + fn)
  jaccard = tp / (tp + fp + fn)
  kw = dict(from_logits=False, smooth=0.0, reduction="none")
  np.testing.assert_allclose(
      losses.tversky_loss(probs, labels, alpha=0.5, beta=0.5, **kw)[:, 0],
      1 - dice, rtol=1e-6)
  np.testing.assert_allclose(losses.dice_loss(probs, labels, **kw)[:, 0],
                             1 - dice, rtol=1e-6)
  np.testing.assert_allclose(
      losses.tversky_loss(probs, labels, alpha=1.0, beta=1.0, **kw)[:, 0],
      1 - jaccard, rtol=1e-6)
  np.testing.assert_allclose(losses.jaccard_loss(probs, labels, **kw)[:, 0],
                             1 - jaccard, rtol=1e-6)


@pytest.mark.parametrize("f", [0.5, 1.0, 2.0, 3.0])
def test_alpha_plus_beta_one_is_f_beta(f):
  probs, labels, pred, truth = hard_masks(9)
  tp, fp, fn = counts(pred, truth)
  f_score = (1 + f**2) * tp / ((1 + f**2) * tp + f**2 * fn + fp)
  alpha, beta = 1 / (1 + f**2), f**2 / (1 + f**2)
  got = losses.tversky_loss(probs, labels, alpha=alpha, beta=beta, smooth=0.0,
                            from_logits=False, reduction="none")[:, 0]
  np.testing.assert_allclose(1 - got, f_score, rtol=1e-6)


@pytest.mark.parametrize("alpha,beta", [(0.5, 0.5), (0.3, 0.7), (0.1, 0.9)])
@pytest.mark.parametrize("num_classes", [2, 3])
def test_agrees_with_optax_dice_loss(alpha, beta, num_classes):
  logits, labels = random_case(10, (2, 8, 9, 10), num_classes)
  targets = onehot(labels, num_classes).astype(np.float32)
  expected = optax.losses.dice_loss(logits, targets, alpha=alpha, beta=beta,
                                    smooth=1.0)
  got = losses.tversky_loss(logits, labels, alpha=alpha, beta=beta, smooth=1.0,
                            include_background=True, reduction="none")
  np.testing.assert_allclose(got.mean(-1), expected, rtol=2e-5)


def test_empty_class_has_zero_loss_and_finite_gradient():
  probs = np.zeros((1, 6, 6, 6, 2), np.float32)
  probs[..., 0] = 1.0
  labels = np.zeros((1, 6, 6, 6), np.int32)
  assert float(losses.tversky_loss(probs, labels, from_logits=False)) == 0.0
  for fn in (losses.tversky_loss, losses.focal_tversky_loss,
             losses.tversky_ce_loss):
    g = jax.grad(fn)(probs, labels, from_logits=False)
    assert np.all(np.isfinite(g))


@pytest.mark.parametrize("scale", [1e4, -1e4])
@pytest.mark.parametrize("case", ["all_background", "all_foreground", "mixed"])
@pytest.mark.parametrize("loss_fn", [losses.tversky_loss,
                                     losses.focal_tversky_loss,
                                     losses.tversky_ce_loss,
                                     losses.dice_loss])
def test_gradient_finite_everywhere(scale, case, loss_fn):
  rng = np.random.default_rng(11)
  shape = (2, 6, 6, 6)
  labels = {"all_background": np.zeros(shape, np.int32),
            "all_foreground": np.ones(shape, np.int32),
            "mixed": (rng.random(shape) < 0.1).astype(np.int32)}[case]
  logits = np.stack([np.zeros(shape), scale * np.sign(rng.normal(size=shape))],
                    -1).astype(np.float32)
  value, grad = jax.value_and_grad(loss_fn)(logits, labels)
  assert np.isfinite(value)
  assert np.all(np.isfinite(grad))


def test_focal_tversky():
  logits, labels = random_case(12, (2, 8, 8, 8), 3)
  tp, fp, fn = np_stats(np_softmax(logits.astype(np.float64)),
                        onehot(labels, 3))
  tversky = (1 - np_tversky(tp, fp, fn, 0.3, 0.7))[:, 1:]
  np.testing.assert_allclose(
      losses.focal_tversky_loss(logits, labels, gamma=4 / 3, reduction="none"),
      tversky ** 0.75, rtol=2e-5)
  np.testing.assert_allclose(
      losses.focal_tversky_loss(logits, labels, gamma=1.0),
      losses.tversky_loss(logits, labels), rtol=1e-6)
  # Finite gradient as TI -> 1: a nearly perfect prediction.
  perfect = 40.0 * (2 * onehot(labels, 3) - 1).astype(np.float32)
  grad = jax.grad(losses.focal_tversky_loss)(perfect, labels)
  assert np.all(np.isfinite(grad))
  assert float(losses.focal_tversky_loss(perfect, labels)) < 1e-3


def test_tversky_ce_matches_reference():
  logits, labels = random_case(13, (2, 8, 8, 8), 3)
  labels[0, 0, 0, :4] = -1
  valid = labels != -1
  p = np_softmax(logits.astype(np.float64))
  oh = onehot(np.where(valid, labels, 0), 3)
  tp, fp, fn = np_stats(p, oh, weight=valid.astype(np.float64))
  region = (1 - np_tversky(tp, fp, fn, 0.3, 0.7))[:, 1:]
  voxel_ce = -np.sum(oh * np.log(p), -1)
  ce_mean = np.sum(voxel_ce * valid) / valid.sum()
  got = losses.tversky_ce_loss(logits, labels, ce_weight=0.5, ignore_index=-1)
  np.testing.assert_allclose(got, region.mean() + 0.5 * ce_mean, rtol=2e-5)
  per_case = losses.tversky_ce_loss(logits, labels, ignore_index=-1,
                                    reduction="none")
  case_ce = np.sum(voxel_ce * valid, (1, 2, 3)) / valid.sum((1, 2, 3))
  np.testing.assert_allclose(per_case, region.mean(-1) + case_ce, rtol=2e-5)


def test_tversky_ce_sigmoid_uses_binary_cross_entropy():
  rng = np.random.default_rng(14)
  logits = rng.normal(size=(2, 6, 6, 6, 2)).astype(np.float32)
  targets = (rng.random(logits.shape) < 0.3).astype(np.float32)
  p = np_sigmoid(logits.astype(np.float64))
  bce = -(targets * np.log(p) + (1 - targets) * np.log(1 - p)).mean(-1).mean()
  region = 1 - np_tversky(*np_stats(p, targets), 0.3, 0.7)
  got = losses.tversky_ce_loss(logits, targets, activation="sigmoid")
  np.testing.assert_allclose(got, region.mean() + bce, rtol=2e-5)


def test_bfloat16_inputs_accumulate_in_float32():
  logits, labels = random_case(15, (2, 16, 16, 16), 2)
  low = jnp.asarray(logits, jnp.bfloat16)
  got = losses.tversky_loss(low, labels)
  assert got.dtype == jnp.float32
  reference = losses.tversky_loss(np.asarray(low.astype(jnp.float32)), labels)
  np.testing.assert_allclose(got, reference, rtol=1e-6)
  assert jax.grad(losses.tversky_loss)(low, labels).dtype == jnp.bfloat16


# --------------------------------------------------------------------------
# Gradients and transformations
# --------------------------------------------------------------------------


@pytest.mark.parametrize("loss_name", ["tversky_loss", "focal_tversky_loss",
                                       "tversky_ce_loss"])
@pytest.mark.parametrize("options", [
    dict(), dict(activation="sigmoid"), dict(pool_batch=True),
    dict(soft_label=True, from_logits=False)], ids=["softmax", "sigmoid",
                                                    "pooled", "soft_probs"])
def test_gradient_matches_finite_differences(loss_name, options):
  with jax.enable_x64(True):
    rng = np.random.default_rng(16)
    shape = (2, 4, 5, 3)
    if options.get("activation") == "sigmoid":
      x = rng.normal(size=shape + (2,))
      labels = (rng.random(shape + (2,)) < 0.3).astype(np.float64)
    elif options.get("from_logits") is False:
      x = np_softmax(rng.normal(size=shape + (3,)))
      labels = np_softmax(3 * rng.normal(size=shape + (3,)))
    else:
      x = rng.normal(size=shape + (3,))
      labels = rng.integers(0, 3, size=shape)
    loss_fn = functools.partial(getattr(losses, loss_name), labels=labels,
                                **options)
    f = lambda v: loss_fn(v)  # noqa: E731
    grad = np.asarray(jax.grad(f)(jnp.asarray(x)))
    assert grad.dtype == np.float64
    eps = 1e-6
    for _ in range(3):
      direction = rng.normal(size=x.shape)
      numeric = (f(x + eps * direction) - f(x - eps * direction)) / (2 * eps)
      np.testing.assert_allclose(np.sum(grad * direction), numeric,
                                 rtol=1e-6, atol=1e-9)


def test_jit_and_vmap_over_alpha_beta():
  logits, labels = random_case(17, (2, 8, 8, 8), 2)
  alphas = jnp.array([0.5, 0.4, 0.3, 0.2, 0.1])
  betas = 1.0 - alphas

  @jax.jit
  def grid(a, b):
    return jax.vmap(lambda a_, b_: losses.tversky_loss(
        logits, labels, alpha=a_, beta=b_))(a, b)

  got = grid(alphas, betas)
  expected = [losses.tversky_loss(logits, labels, alpha=float(a), beta=float(b))
              for a, b in zip(alphas, betas)]
  np.testing.assert_allclose(got, expected, rtol=1e-6)
  grad_grid = jax.jit(jax.vmap(
      lambda b: jax.grad(losses.tversky_loss)(logits, labels, beta=b)))(betas)
  assert grad_grid.shape == (5,) + logits.shape
  np.testing.assert_allclose(
      grad_grid[2], jax.grad(losses.tversky_loss)(logits, labels, beta=0.7),
      rtol=1e-5, atol=1e-9)
  traced_beta = jax.jit(lambda b: losses.focal_tversky_loss(
      logits, labels, beta=b, gamma=b * 2))(0.7)
  assert np.isfinite(traced_beta)


def _sharded_inputs():
  logits, labels = random_case(18, (8, 6, 6, 6), 2, foreground=0.05)
  return jnp.asarray(logits), jnp.asarray(labels)


@pytest.mark.parametrize("pool_batch", [True, False])
def test_pmap_with_axis_name_equals_unsharded(pool_batch):
  assert jax.device_count() == 4
  logits, labels = _sharded_inputs()
  expected = losses.tversky_loss(logits, labels, pool_batch=pool_batch)
  per_device = jax.pmap(
      lambda z, y: losses.tversky_loss(z, y, pool_batch=pool_batch,
                                       axis_name="d"),
      axis_name="d")(logits.reshape(4, 2, 6, 6, 6, 2),
                     labels.reshape(4, 2, 6, 6, 6))
  np.testing.assert_allclose(per_device, np.full(4, expected), rtol=1e-6)


@pytest.mark.parametrize("pool_batch", [True, False])
def test_pmap_gradient_needs_the_usual_pmean(pool_batch):
  # Under pmap, per-device gradients of the global (axis_name) loss average
  # (pmean) to the unsharded gradient, as with any data-parallel pmap step.
  logits, labels = _sharded_inputs()
  expected = jax.grad(losses.tversky_loss)(logits, labels,
                                           pool_batch=pool_batch)

  def grad_per_device(scale, z, y):
    g = jax.grad(lambda s: losses.tversky_loss(
        z * s, y, pool_batch=pool_batch, axis_name="d"))(scale)
    return jax.lax.pmean(g, "d")

  scale_grad = jax.pmap(grad_per_device, axis_name="d", in_axes=(None, 0, 0))(
      1.0, logits.reshape(4, 2, 6, 6, 6, 2), labels.reshape(4, 2, 6, 6, 6))
  np.testing.assert_allclose(scale_grad, np.full(4, np.sum(expected * logits)),
                             rtol=1e-5)


@pytest.mark.parametrize("pool_batch", [True, False])
@pytest.mark.parametrize("loss_name", ["tversky_loss", "tversky_ce_loss"])
def test_shard_map_value_and_gradient_equal_unsharded(pool_batch, loss_name):
  loss_fn = getattr(losses, loss_name)
  logits, labels = _sharded_inputs()
  mesh = jax.make_mesh((4,), ("data",))

  def global_loss(scale, z, y, **kw):
    return loss_fn(z * scale, y, pool_batch=pool_batch, **kw)

  expected, expected_grad = jax.value_and_grad(global_loss)(1.3, logits,
                                                            labels)

  # The gradient is taken inside shard_map, with a replicated parameter: its
  # cotangent is summed over devices automatically, so the loss itself must
  # be the global mean (axis_name) for the gradient to be exact.
  @functools.partial(jax.shard_map, mesh=mesh,
                     in_specs=(P(), P("data"), P("data")), out_specs=P())
  def sharded(scale, z, y):
    return jax.value_and_grad(global_loss)(scale, z, y, axis_name="data")

  shard = jax.sharding.NamedSharding(mesh, P("data"))
  value, grad = jax.jit(sharded)(jnp.float32(1.3),
                                 jax.device_put(logits, shard),
                                 jax.device_put(labels, shard))
  np.testing.assert_allclose(value, expected, rtol=1e-6)
  np.testing.assert_allclose(grad, expected_grad, rtol=1e-5)


# --------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
  logits, labels = random_case(19, (2, 6, 6, 6), 2)
  cases = [
      (dict(labels=labels[:, :5]), r"`labels` class map has shape \(2, 5, 6, 6\)"),
      (dict(labels=labels[..., None].repeat(3, -1)), r"`labels` has shape"),
      (dict(labels=labels[0]), r"`labels` has shape \(6, 6, 6\)"),
      (dict(labels=labels + 1), r"`labels` contains values \[2\] outside"),
      (dict(labels=labels - 1), r"`labels` contains values \[-1\] outside"),
      (dict(labels=labels.astype(np.float32)), "integer dtype"),
      (dict(alpha=-0.1), r"`alpha` must be >= 0"),
      (dict(beta=-1.0), r"`beta` must be >= 0"),
      (dict(smooth=-1.0), r"`smooth` must be >= 0"),
      (dict(activation="softplus"), r"unknown `activation`='softplus'"),
      (dict(reduction="avg"), r"unknown `reduction`='avg'"),
      (dict(mask=np.ones((2, 6, 6), bool)), r"`mask` has shape \(2, 6, 6\)"),
      (dict(class_weights=[1.0, 2.0]), r"`class_weights` has shape \(2,\)"),
      (dict(ignore_index=1), r"`ignore_index`=1 is a class index"),
      (dict(activation="sigmoid"), "activation='sigmoid'"),
  ]
  for overrides, message in cases:
    kwargs = dict(labels=labels)
    kwargs.update(overrides)
    with pytest.raises(ValueError, match=message):
      losses.tversky_loss(logits, **kwargs)
  with pytest.raises(ValueError, match="must lie in"):
    losses.tversky_loss(logits, 2 * onehot(labels, 2))
  with pytest.raises(ValueError, match="floating point"):
    losses.tversky_loss(labels[..., None], labels)
  with pytest.raises(ValueError, match=r"`gamma` must be > 0"):
    losses.focal_tversky_loss(logits, labels, gamma=0.0)
  with pytest.raises(ValueError, match="pool_batch"):
    losses.tversky_ce_loss(logits, labels, reduction="none", pool_batch=True)
  with pytest.raises(TypeError, match="unexpected keyword"):
    losses.tversky_loss(logits, labels, apply_softmax=True)


def test_out_of_range_labels_under_jit_are_dropped_like_ignore_index():
  # Values cannot be checked on traced labels: voxels whose label is not a
  # class are dropped from every sum (issue 9), as the metrics do. The shape
  # checks still run.
  logits, labels = random_case(20, (2, 6, 6, 6), 3)
  rng = np.random.default_rng(20)
  bad = rng.random(labels.shape) < 0.2
  corrupted = np.where(bad, rng.choice([-3, 3, 7, 255], labels.shape), labels)
  corrupted = corrupted.astype(np.int32)
  for loss_fn in (losses.tversky_loss, losses.focal_tversky_loss,
                  losses.tversky_ce_loss, losses.dice_loss):
    jitted = jax.jit(functools.partial(loss_fn, reduction="none"))
    np.testing.assert_allclose(
        jitted(logits, corrupted),
        loss_fn(logits, labels, mask=~bad, reduction="none"), rtol=1e-5)
  # Dropped voxels get no gradient.
  grad = jax.jit(jax.grad(losses.tversky_loss))(logits, corrupted)
  assert np.all(np.asarray(grad)[bad] == 0)
  # Single sigmoid channel: the binary map takes 0 and 1 only.
  binary = np.where(bad, 2, labels > 0).astype(np.int32)
  sig = logits[..., :1]
  np.testing.assert_allclose(
      jax.jit(functools.partial(losses.tversky_loss, activation="sigmoid"))(
          sig, binary),
      losses.tversky_loss(sig, (labels > 0).astype(np.int32), mask=~bad,
                          activation="sigmoid"), rtol=1e-5)
  with pytest.raises(ValueError, match="class map has shape"):
    jax.jit(losses.tversky_loss)(logits, labels[:, :3])


@pytest.mark.parametrize("loss_name", ["confusion_stats", "tversky_loss",
                                       "tversky_ce_loss"])
def test_out_of_range_labels_raise_when_concrete(loss_name):
  logits, labels = random_case(20, (2, 6, 6, 6), 3)
  labels[0, 0, 0, 0] = 3
  labels[1, 0, 0, 0] = -2
  with pytest.raises(ValueError) as info:
    getattr(losses, loss_name)(logits, labels)
  message = str(info.value)
  assert "\n" not in message
  assert "[-2, 3]" in message and "(3 classes)" in message
  # ignore_index values are allowed, others still raise.
  labels[1, 0, 0, 0] = 255
  with pytest.raises(ValueError, match=r"values \[3\] outside"):
    getattr(losses, loss_name)(logits, labels, ignore_index=255)
  labels[0, 0, 0, 0] = 255
  assert np.all(np.isfinite(
      getattr(losses, loss_name)(logits, labels, ignore_index=255)))


def test_forward_mode_and_second_order_derivatives():
  # jvp (and so jax.hessian) works: nothing here is a custom VJP.
  logits, labels = random_case(21, (1, 3, 4, 5), 4)
  f = lambda z: losses.tversky_loss(z, labels)  # noqa: E731
  direction = np.random.default_rng(21).normal(size=logits.shape).astype(
      np.float32)
  # Jitted: op by op, the hessian compiles hundreds of small programs.
  _, forward = jax.jit(lambda z, d: jax.jvp(f, (z,), (d,)))(logits, direction)
  reverse = np.sum(np.asarray(jax.jit(jax.grad(f))(logits)) * direction)
  np.testing.assert_allclose(forward, reverse, rtol=1e-5)
  hessian = jax.jit(jax.hessian(f))(logits)
  assert hessian.shape == logits.shape * 2
  assert np.all(np.isfinite(hessian))


# --------------------------------------------------------------------------
# Options for MONAI / optax users
# --------------------------------------------------------------------------


LOSS_NAMES = ["tversky_loss", "dice_loss", "jaccard_loss",
              "focal_tversky_loss", "tversky_ce_loss"]


def np_squared_stats(probs, targets, weight=None):
  """MONAI's squared_pred counts: TP = sum pg, FP = sum p^2 - TP, FN = ..."""
  axes = tuple(range(1, probs.ndim - 1))
  w = 1.0 if weight is None else weight[..., None]
  tp = np.sum(w * probs * targets, axes)
  return (tp, np.sum(w * probs**2, axes) - tp,
          np.sum(w * targets**2, axes) - tp)


@pytest.mark.parametrize("smooth_nr,smooth_dr", [(0.0, 1e-5), (1.0, 2.0),
                                                 (None, 0.5), (0.25, None)])
def test_smooth_nr_and_smooth_dr(smooth_nr, smooth_dr):
  logits, labels = random_case(30, (2, 6, 7, 8), 3)
  tp, fp, fn = np_stats(np_softmax(logits.astype(np.float64)),
                        onehot(labels, 3))
  smooth = 0.125
  nr = smooth if smooth_nr is None else smooth_nr
  dr = smooth if smooth_dr is None else smooth_dr
  expected = 1 - (tp + nr) / (tp + 0.3 * fp + 0.7 * fn + dr)
  got = losses.tversky_loss(logits, labels, smooth=smooth, smooth_nr=smooth_nr,
                            smooth_dr=smooth_dr, reduction="none")
  np.testing.assert_allclose(got, np.maximum(expected[:, 1:], 0), rtol=2e-5)
  np.testing.assert_allclose(
      losses.tversky_index(tp, fp, fn, smooth=smooth, smooth_nr=smooth_nr,
                           smooth_dr=smooth_dr),
      (tp + nr) / (tp + 0.3 * fp + 0.7 * fn + dr), rtol=1e-6)


def test_smooth_alone_means_both_and_empty_class_rules():
  probs = np.zeros((1, 4, 4, 4, 2), np.float32)
  probs[..., 0] = 1.0
  # Empty lesion class, none predicted.
  labels = np.zeros((1, 4, 4, 4), np.int32)
  kw = dict(from_logits=False, reduction="none")
  assert float(losses.tversky_loss(probs, labels, **kw)[0, 0]) == 0.0
  # MONAI's common smooth_nr=0: an empty class has index 0, loss 1.
  np.testing.assert_allclose(
      losses.tversky_loss(probs, labels, smooth_nr=0.0, **kw), [[1.0]])
  np.testing.assert_allclose(
      losses.tversky_loss(probs, labels, smooth=2.0, smooth_dr=4.0, **kw),
      [[0.5]])
  grad = jax.grad(losses.tversky_loss)(probs, labels, smooth_nr=0.0,
                                       from_logits=False)
  assert np.all(np.isfinite(grad))


@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
@pytest.mark.parametrize("alpha,beta", [(0.3, 0.7), (0.5, 0.5), (1.0, 1.0)])
def test_squared_pred_matches_reference(activation, alpha, beta):
  rng = np.random.default_rng(31)
  logits = rng.normal(scale=2.0, size=(2, 6, 7, 8, 3)).astype(np.float32)
  if activation == "softmax":
    labels = rng.integers(0, 3, size=(2, 6, 7, 8)).astype(np.int32)
    probs, targets = np_softmax(logits.astype(np.float64)), onehot(labels, 3)
  else:
    targets = (rng.random(logits.shape) < 0.3).astype(np.float32)
    labels, probs = targets, np_sigmoid(logits.astype(np.float64))
  keep = rng.random(logits.shape[:-1]) < 0.8
  tp, fp, fn = np_squared_stats(probs, targets, keep.astype(np.float64))
  expected = 1 - (tp + 1e-5) / (tp + alpha * fp + beta * fn + 1e-5)
  got = losses.tversky_loss(logits, labels, alpha=alpha, beta=beta,
                            squared_pred=True, activation=activation,
                            include_background=True, mask=keep,
                            reduction="none")
  np.testing.assert_allclose(got, expected, rtol=2e-5, atol=1e-6)
  stats = losses.confusion_stats(logits, labels, squared_pred=True,
                                 activation=activation,
                                 include_background=True, mask=keep)
  for g, want in zip(stats, (tp, fp, fn)):
    np.testing.assert_allclose(g, want, rtol=2e-5, atol=1e-4)


def test_squared_pred_dice_is_monai_vnet_dice():
  # MONAI DiceLoss(squared_pred=True, smooth_nr=a, smooth_dr=b):
  # 1 - (2 sum pg + a) / (sum p^2 + sum g^2 + b), per case and class.
  rng = np.random.default_rng(32)
  logits = rng.normal(size=(2, 5, 6, 7, 3)).astype(np.float32)
  labels = rng.integers(0, 3, size=(2, 5, 6, 7)).astype(np.int32)
  p, g = np_softmax(logits.astype(np.float64)), onehot(labels, 3)
  axes = (1, 2, 3)
  a, b = 1e-5, 1e-3
  monai = 1 - (2 * np.sum(p * g, axes) + a) / (
      np.sum(p**2, axes) + np.sum(g**2, axes) + b)
  got = losses.dice_loss(logits, labels, squared_pred=True, smooth_nr=a / 2,
                         smooth_dr=b / 2, include_background=True,
                         reduction="none")
  np.testing.assert_allclose(got, monai, rtol=2e-5)
  # Jaccard: MONAI DiceLoss(jaccard=True, squared_pred=True).
  inter = np.sum(p * g, axes)
  monai_j = 1 - (2 * inter + a) / (
      2 * (np.sum(p**2, axes) + np.sum(g**2, axes) - inter) + b)
  got_j = losses.jaccard_loss(logits, labels, squared_pred=True,
                              smooth_nr=a / 2, smooth_dr=b / 2,
                              include_background=True, reduction="none")
  np.testing.assert_allclose(got_j, monai_j, rtol=2e-5)


def test_squared_pred_scores_soft_target_equal_to_prediction_as_perfect():
  rng = np.random.default_rng(33)
  probs = np_softmax(rng.normal(size=(2, 5, 5, 5, 3))).astype(np.float32)
  kw = dict(from_logits=False, squared_pred=True)
  assert float(losses.dice_loss(probs, probs, **kw)) < 1e-6
  # soft_label changes nothing in the squared form (as in MONAI).
  labels = np_softmax(3 * rng.normal(size=probs.shape)).astype(np.float32)
  np.testing.assert_array_equal(
      losses.tversky_loss(probs, labels, soft_label=True, **kw),
      losses.tversky_loss(probs, labels, **kw))


def test_squared_pred_index_above_one_is_not_clipped():
  # With alpha = 0.9, beta = 0.1 the squared form exceeds 1 for p = 0.55 on a
  # lesion: TI = 0.55 / (0.9 * 0.3025 + 0.1) > 1. The loss is then negative
  # (not clipped, so its gradient is not zeroed); the focal loss clips at 0.
  probs = np.full((1, 4, 1), 0.55, np.float32)
  labels = np.ones((1, 4, 1), np.float32)
  kw = dict(alpha=0.9, beta=0.1, from_logits=False, activation="sigmoid",
            smooth=0.0, squared_pred=True)
  expected = 1 - 0.55 / (0.9 * 0.55**2 + 0.1)
  assert expected < 0
  np.testing.assert_allclose(losses.tversky_loss(probs, labels, **kw),
                             expected, rtol=1e-6)
  assert float(jax.grad(losses.tversky_loss)(probs, labels, **kw).sum()) != 0
  assert float(losses.focal_tversky_loss(probs, labels, **kw)) == 0.0
  # Without squared_pred the index is <= 1 and the loss >= 0.
  plain = dict(kw, squared_pred=False)
  assert float(losses.tversky_loss(probs, labels, **plain)) >= 0.0


@pytest.mark.parametrize("loss_name", ["tversky_loss", "dice_loss",
                                       "focal_tversky_loss",
                                       "tversky_ce_loss"])
def test_squared_pred_gradient_matches_finite_differences(loss_name):
  with jax.enable_x64(True):
    rng = np.random.default_rng(34)
    x = rng.normal(size=(2, 4, 5, 3, 3))
    labels = rng.integers(0, 3, size=(2, 4, 5, 3))
    f = lambda v: getattr(losses, loss_name)(  # noqa: E731
        v, labels, squared_pred=True, smooth_nr=0.5, smooth_dr=1.0)
    grad = np.asarray(jax.grad(f)(jnp.asarray(x)))
    direction = rng.normal(size=x.shape)
    eps = 1e-6
    numeric = (f(x + eps * direction) - f(x - eps * direction)) / (2 * eps)
    np.testing.assert_allclose(np.sum(grad * direction), numeric, rtol=1e-6,
                               atol=1e-9)


@pytest.mark.parametrize("loss_name", LOSS_NAMES[:4])
@pytest.mark.parametrize("pool_batch", [False, True])
def test_reduction_none_mean_sum_and_class_weights(loss_name, pool_batch):
  loss_fn = getattr(losses, loss_name)
  logits, labels = random_case(35, (3, 6, 6, 6), 4)
  kw = dict(pool_batch=pool_batch)
  per = np.asarray(loss_fn(logits, labels, reduction="none", **kw))
  assert per.shape == ((3,) if pool_batch else (3, 3))
  rows = per[None] if pool_batch else per
  np.testing.assert_allclose(loss_fn(logits, labels, **kw), rows.mean(),
                             rtol=1e-6)
  np.testing.assert_allclose(loss_fn(logits, labels, reduction="sum", **kw),
                             rows.sum(), rtol=1e-6)
  # Documented weighted mean: sum w_c L_bc / (cases * sum w_c).
  w = np.array([0.5, 2.0, 0.0])
  np.testing.assert_allclose(
      loss_fn(logits, labels, class_weights=w, reduction="none", **kw),
      per * w, rtol=1e-6)
  np.testing.assert_allclose(
      loss_fn(logits, labels, class_weights=w, **kw),
      np.sum(rows * w) / (rows.shape[0] * w.sum()), rtol=1e-6)
  np.testing.assert_allclose(
      loss_fn(logits, labels, class_weights=w, reduction="sum", **kw),
      np.sum(rows * w), rtol=1e-6)
  # Scaling the weights does not change the mean.
  np.testing.assert_allclose(
      loss_fn(logits, labels, class_weights=3 * w, **kw),
      loss_fn(logits, labels, class_weights=w, **kw), rtol=1e-6)


def test_include_background_false_drops_channel_zero_for_sigmoid():
  rng = np.random.default_rng(36)
  logits = rng.normal(size=(2, 6, 6, 6, 3)).astype(np.float32)
  targets = (rng.random(logits.shape) < 0.3).astype(np.float32)
  tp, fp, fn = np_stats(np_sigmoid(logits.astype(np.float64)), targets)
  full = 1 - np_tversky(tp, fp, fn, 0.3, 0.7)
  kw = dict(activation="sigmoid", reduction="none")
  np.testing.assert_allclose(
      losses.tversky_loss(logits, targets, include_background=False, **kw),
      full[:, 1:], rtol=2e-5)
  # Default (None) and True keep every sigmoid channel.
  for include in (None, True):
    np.testing.assert_allclose(
        losses.tversky_loss(logits, targets, include_background=include, **kw),
        full, rtol=2e-5)
  assert losses.confusion_stats(logits, targets, activation="sigmoid",
                                include_background=False)[0].shape == (2, 2)
  with pytest.raises(ValueError, match=r"class_weights.*\(2,\)"):
    losses.tversky_loss(logits, targets, activation="sigmoid",
                        include_background=False, class_weights=[1., 1., 1.])
  # Softmax: False is the default behaviour, True keeps class 0.
  logits3, labels3 = random_case(36, (2, 6, 6, 6), 3)
  np.testing.assert_array_equal(
      losses.tversky_loss(logits3, labels3, include_background=False,
                          reduction="none"),
      losses.tversky_loss(logits3, labels3, reduction="none"))
  assert losses.tversky_loss(logits3, labels3, include_background=True,
                             reduction="none").shape == (2, 3)


def test_single_channel_is_kept_with_include_background_false():
  rng = np.random.default_rng(37)
  logits = rng.normal(size=(2, 5, 5, 5, 1)).astype(np.float32)
  labels = (rng.random((2, 5, 5, 5)) < 0.3).astype(np.int32)
  with pytest.warns(UserWarning, match="single channel"):
    dropped = losses.tversky_loss(logits, labels, activation="sigmoid",
                                  include_background=False, reduction="none")
  np.testing.assert_array_equal(
      dropped, losses.tversky_loss(logits, labels, activation="sigmoid",
                                   reduction="none"))
  assert dropped.shape == (2, 1)


@pytest.mark.parametrize("loss_name", LOSS_NAMES + ["confusion_stats"])
def test_signatures_are_explicit(loss_name):
  import inspect  # pylint: disable=import-outside-toplevel
  params = inspect.signature(getattr(losses, loss_name)).parameters
  kinds = {p.kind for p in params.values()}
  assert inspect.Parameter.VAR_KEYWORD not in kinds
  assert inspect.Parameter.VAR_POSITIONAL not in kinds
  common = {"from_logits", "activation", "include_background", "mask",
            "ignore_index", "soft_label", "squared_pred", "pool_batch",
            "axis_name"}
  assert common <= set(params)
  if loss_name != "confusion_stats":
    assert {"smooth", "smooth_nr", "smooth_dr", "class_weights",
            "reduction"} <= set(params)
  with pytest.raises(TypeError, match="unexpected keyword"):
    getattr(losses, loss_name)(np.zeros((1, 2, 2)), np.zeros((1, 2), int),
                               apply_softmax=True)


@pytest.mark.parametrize("loss_name", LOSS_NAMES)
def test_inputs_are_checked_once_per_call(loss_name, monkeypatch):
  calls = []
  original = losses._prepare  # pylint: disable=protected-access

  def counting(*args, **kwargs):
    calls.append(kwargs["fn"])
    return original(*args, **kwargs)

  monkeypatch.setattr(losses, "_prepare", counting)
  logits, labels = random_case(38, (1, 4, 4, 4), 2)
  getattr(losses, loss_name)(logits, labels)
  assert calls == [loss_name]


def test_bad_new_options_raise():
  logits, labels = random_case(39, (1, 4, 4, 4), 2)
  for overrides, message in [
      (dict(smooth_nr=-1.0), r"`smooth_nr` must be >= 0"),
      (dict(smooth_dr=-1e-3), r"`smooth_dr` must be >= 0"),
      (dict(squared_pred="yes"), r"`squared_pred` must be a Python bool"),
      (dict(include_background=0), r"`include_background` must be a Python "
       r"bool or None"),
      (dict(reduction="batch"), r"unknown `reduction`='batch'")]:
    with pytest.raises(ValueError, match=message):
      losses.tversky_loss(logits, labels, **overrides)
  with pytest.raises(ValueError, match=r"`smooth_dr` must be >= 0"):
    losses.tversky_index(1.0, 1.0, 1.0, smooth_dr=-1.0)
  with pytest.raises(ValueError, match=r"unknown `reduction`='sum'"):
    losses.tversky_ce_loss(logits, labels, reduction="sum")
