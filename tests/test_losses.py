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
  np.testing.assert_allclose(
      losses.tversky_loss(logits, labels, pool_batch=True, reduction="none"),
      pooled[None], rtol=2e-5)
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


def test_out_of_range_labels_under_jit_are_not_checked_but_do_not_crash():
  # Values cannot be checked on traced labels; the shape checks still run.
  logits, labels = random_case(20, (2, 6, 6, 6), 2)
  jitted = jax.jit(losses.tversky_loss)
  assert np.isfinite(jitted(logits, labels))
  with pytest.raises(ValueError, match="class map has shape"):
    jitted(logits, labels[:, :3])


def test_forward_mode_and_second_order_derivatives():
  # jvp (and so jax.hessian) works: nothing here is a custom VJP.
  logits, labels = random_case(21, (1, 3, 4, 5), 4)
  f = lambda z: losses.tversky_loss(z, labels)  # noqa: E731
  direction = np.random.default_rng(21).normal(size=logits.shape).astype(
      np.float32)
  _, forward = jax.jvp(f, (logits,), (direction,))
  reverse = np.sum(np.asarray(jax.grad(f)(logits)) * direction)
  np.testing.assert_allclose(forward, reverse, rtol=1e-5)
  hessian = jax.hessian(f)(logits)
  assert hessian.shape == logits.shape * 2
  assert np.all(np.isfinite(hessian))
