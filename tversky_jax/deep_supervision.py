"""nnU-Net-style deep supervision: a loss on every decoder stage's logits.

With ``UNet3D(deep_supervision=True)`` the network also predicts logits at
each coarser decoder stage (``UNet3D.multi_scale``). The training loss is
then a weighted sum of one loss per scale, each against the labels pooled to
that scale's grid, with the weights of nnU-Net (Isensee et al. 2021): scale
``i`` (0 = finest) weighs ``1 / 2**i``, the coarsest scale 0, normalised to
sum 1. Only training uses the coarser scales; validation and prediction read
the finest logits (``UNet3D.__call__``).

Arrays are channels-last, ``[batch, x, y, z, channels]``, spatial axes in
NIfTI voxel order. nnU-Net downsamples the segmentation with nearest
neighbours; here each coarse voxel gets the fraction of each class in its
block (soft labels), which the Tversky loss family accepts as targets.

Example::

  >>> import jax.numpy as jnp
  >>> scale_weights(3)
  array([0.66666667, 0.33333333, 0.        ])
  >>> downsample_labels(jnp.zeros((1, 4, 4, 2), int), 2, (2, 2, 1)).shape
  (1, 2, 2, 2, 2)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
LossFn = Callable[[Array, Array], Array]


def scale_weights(num_scales: int) -> np.ndarray:
  """nnU-Net's loss weight per scale, finest first: ``[num_scales]``.

  Scale ``i`` weighs ``1 / 2**i``; with more than one scale the coarsest
  weighs 0 (nnU-Net leaves the lowest-resolution output out); then the
  weights are normalised to sum 1. E.g. 1 scale: ``[1]``; 2: ``[1, 0]``;
  3: ``[2/3, 1/3, 0]``; 4: ``[4/7, 2/7, 1/7, 0]``.

  Raises:
    ValueError: for ``num_scales < 1``.
  """
  if num_scales < 1:
    raise ValueError(f"num_scales must be >= 1, got {num_scales}.")
  weights = 1.0 / 2.0 ** np.arange(num_scales)
  if num_scales > 1:
    weights[-1] = 0.0
  return weights / weights.sum()


def scale_factors(strides: Sequence[Sequence[int]],
                  num_scales: int) -> list[tuple[int, int, int]]:
  """Per scale, finest first, the ``(fx, fy, fz)`` its grid is coarser by.

  Scale ``i`` is the per-axis product of the pooling strides ``strides[:i]``
  (``UNet3D.strides``, finest stage first): ``(1, 1, 1)`` for scale 0.

  Raises:
    ValueError: when ``strides`` has fewer than ``num_scales - 1`` stages.
  """
  if len(strides) < num_scales - 1:
    raise ValueError(
        f"{num_scales} scales need at least {num_scales - 1} stages of "
        f"strides, got {len(strides)}: {tuple(strides)}.")
  factors = [(1, 1, 1)]
  for stride in strides[:num_scales - 1]:
    factors.append(tuple(f * int(s) for f, s in zip(factors[-1], stride)))
  return factors


def downsample_labels(labels: Array, num_classes: int,
                      factors: Sequence[int]) -> Array:
  """Soft labels on a grid coarser by ``factors``: one-hot, block-averaged.

  Args:
    labels: ``[b, x, y, z]`` integer class map, values in
      ``[0, num_classes)`` (other values count as no class).
    num_classes: ``K``, background included.
    factors: ``(fx, fy, fz)``, positive ints dividing ``x, y, z``.

  Returns:
    ``[b, x / fx, y / fy, z / fz, K]`` float32: per coarse voxel, the
    fraction of the ``fx * fy * fz`` voxels of its block in each class
    (average pooling of the one-hot labels, window = stride = ``factors``).

  Raises:
    ValueError: when a factor does not divide its axis.
  """
  b, *sizes = labels.shape
  factors = tuple(int(f) for f in factors)
  if len(sizes) != 3 or len(factors) != 3 or any(
      f < 1 or n % f for n, f in zip(sizes, factors)):
    raise ValueError(
        f"downsample_labels: labels [b, x, y, z] of shape {labels.shape} "
        f"cannot be pooled by factors {factors} (x, y, z).")
  one_hot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  blocks = [v for n, f in zip(sizes, factors) for v in (n // f, f)]
  return one_hot.reshape(b, *blocks, num_classes).mean(axis=(2, 4, 6))


def deep_supervision_loss(loss_fn: LossFn, logits_list: Sequence[Array],
                          labels: Array, num_classes: int,
                          strides: Sequence[Sequence[int]]) -> Array:
  """``sum_i w_i * loss_fn(logits_i, labels_i)`` with ``w = scale_weights``.

  Args:
    loss_fn: ``loss(logits [b, x, y, z, K], labels) -> scalar``, taking an
      integer class map ``[b, x, y, z]`` and soft labels ``[b, x, y, z, K]``
      alike, e.g. ``train_state.make_loss_fn(config)``: every loss of
      ``tversky_jax.losses`` does (alpha weighs false positives, beta false
      negatives). ``tversky_ce_loss`` then uses the soft cross-entropy
      ``-sum_c g_c log p_c`` and the product-form soft counts
      ``TP = sum p g``, ``FP = sum p (1 - g)``, ``FN = sum (1 - p) g``.
    logits_list: ``UNet3D.multi_scale`` output, finest first: ``[b, x, y,
      z, K]``, then the scales coarser by ``scale_factors(strides, n)``.
    labels: ``[b, x, y, z]`` integer class map at the finest scale, used as
      given there; coarser scales get ``downsample_labels`` of it.
    num_classes: ``K``.
    strides: the network's pooling strides per stage, finest first.

  Returns:
    The scalar loss. Scales of weight 0 (the coarsest) are not computed.

  Raises:
    ValueError: when a scale's logits do not have the grid its factors give.
  """
  weights = scale_weights(len(logits_list))
  factors = scale_factors(strides, len(logits_list))
  total = jnp.zeros((), jnp.float32)
  for scale, (weight, logits, factor) in enumerate(
      zip(weights, logits_list, factors)):
    expected = tuple(n // f for n, f in zip(labels.shape[1:], factor))
    if tuple(logits.shape[1:4]) != expected:
      raise ValueError(
          f"deep_supervision_loss: scale {scale} logits of shape "
          f"{logits.shape}, expected grid {expected} (labels "
          f"{labels.shape} pooled by {factor}).")
    if weight == 0:
      continue
    target = (labels if scale == 0
              else downsample_labels(labels, num_classes, factor))
    total = total + float(weight) * loss_fn(logits, target)
  return total


def training_loss(model, image: Array, labels: Array,
                  loss_fn: LossFn) -> Array:
  """The train step's loss of ``model`` (a ``UNet3D``) on one batch.

  ``image: [b, x, y, z, c]``, ``labels: [b, x, y, z]`` integer class map.
  ``loss_fn(model(image), labels)``, or with ``model.deep_supervision``
  :func:`deep_supervision_loss` of ``model.multi_scale(image)``.
  """
  if not getattr(model, "deep_supervision", False):
    return loss_fn(model(image), labels)
  return deep_supervision_loss(loss_fn, model.multi_scale(image), labels,
                               model.num_classes, model.strides)
