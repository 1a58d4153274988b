"""A PyTorch twin of `tversky_jax.models.unet3d.UNet3D`, for benchmarks only.

Same stages, features, strides, normalisation and activation as the Flax
model, with the Flax model's weights copied in (`copy_weights`), so both
compute the same function: `bench/side_by_side.py` checks the parameter
count and the outputs on the same input before it times anything.

Layouts: ours is channels-last ``[b, x, y, z, c]``; the twin takes
``[b, c, x, y, z]`` in PyTorch's ``channels_last_3d`` memory format (the
fastest oneDNN layout on CPU and cuDNN's on GPU), so the bytes in memory are
in the same order as ours. Kernels: ours ``[kx, ky, kz, in, out]``, PyTorch's
``[out, in, kx, ky, kz]`` (``ConvTranspose3d``: ``[in, out, kx, ky, kz]``,
and ``lax.conv_transpose`` does not flip the kernel where PyTorch's
transposed convolution effectively does, hence the ``[::-1]`` flips).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

LEAKY_RELU_SLOPE = 0.01


def _activation(kind: str) -> nn.Module:
  return nn.LeakyReLU(LEAKY_RELU_SLOPE) if kind == "leaky_relu" else nn.ReLU()


def _norm(kind: str, features: int, eps: float) -> nn.Module:
  if kind == "none":
    return nn.Identity()
  if kind == "instance":
    return nn.InstanceNorm3d(features, eps=eps, affine=True)
  if kind == "group":
    return nn.GroupNorm(int(np.gcd(features, 8)), features, eps=eps)
  if kind == "batch":
    return nn.BatchNorm3d(features, eps=eps, momentum=0.1)
  raise ValueError(f"unknown normalization {kind!r}")


class ConvBlock(nn.Sequential):
  """Two 3x3x3 'same' convolutions, each followed by [norm and] activation."""

  def __init__(self, cin: int, cout: int, normalization: str, activation: str,
               eps: float):
    bias = normalization == "none"
    super().__init__(
        nn.Conv3d(cin, cout, 3, padding=1, bias=bias),
        _norm(normalization, cout, eps), _activation(activation),
        nn.Conv3d(cout, cout, 3, padding=1, bias=bias),
        _norm(normalization, cout, eps), _activation(activation))


class TwinUNet3D(nn.Module):
  """``[b, c, x, y, z] -> [b, num_classes, x, y, z]`` logits."""

  def __init__(self, model):
    """Builds the twin of the Flax ``UNet3D`` ``model`` (structure only)."""
    super().__init__()
    features, strides = model.features_per_stage, model.strides
    eps = 1e-6  # Flax's InstanceNorm / GroupNorm default (BatchNorm: 1e-5)
    if model.normalization == "batch":
      eps = 1e-5
    block = lambda cin, cout: ConvBlock(cin, cout, model.normalization,
                                        model.activation, eps)
    self.strides = strides
    depth = len(strides)
    self.encoder = nn.ModuleList(
        [block(model.in_channels if level == 0 else features[level - 1],
               features[level]) for level in range(depth)])
    self.bottleneck = block(
        model.in_channels if depth == 0 else features[depth - 1],
        features[depth])
    self.ups = nn.ModuleList(
        [nn.ConvTranspose3d(features[level + 1], features[level],
                            strides[level], stride=strides[level])
         for level in reversed(range(depth))])
    self.decoder = nn.ModuleList(
        [block(2 * features[level], features[level])
         for level in reversed(range(depth))])
    self.head = nn.Conv3d(features[0], model.num_classes, 1)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    skips = []
    for block, stride in zip(self.encoder, self.strides):
      x = block(x)
      skips.append(x)
      x = F.max_pool3d(x, stride, stride)
    x = self.bottleneck(x)
    for up, block, skip in zip(self.ups, self.decoder, reversed(skips)):
      x = block(torch.cat([up(x), skip], dim=1))
    return self.head(x)


def _conv_weight(kernel) -> torch.Tensor:
  """``[kx, ky, kz, in, out]`` -> ``[out, in, kx, ky, kz]``."""
  return torch.from_numpy(np.ascontiguousarray(
      np.transpose(np.asarray(kernel, np.float32), (4, 3, 0, 1, 2))))


def _up_weight(kernel) -> torch.Tensor:
  """``[sx, sy, sz, in, out]`` (lax, unflipped) -> ``[in, out, sx, sy, sz]``."""
  flipped = np.asarray(kernel, np.float32)[::-1, ::-1, ::-1]
  return torch.from_numpy(np.ascontiguousarray(
      np.transpose(flipped, (3, 4, 0, 1, 2))))


def _tensor(x) -> torch.Tensor:
  return torch.tensor(np.array(x, np.float32))


def _copy_block(theirs: ConvBlock, ours) -> None:
  for conv, norm, our_conv, our_norm in (
      (theirs[0], theirs[1], ours.conv1, ours.norm1),
      (theirs[3], theirs[4], ours.conv2, ours.norm2)):
    conv.weight.copy_(_conv_weight(our_conv.kernel[...]))
    if conv.bias is not None:
      conv.bias.copy_(_tensor(our_conv.bias[...]))
    if our_norm is not None:
      norm.weight.copy_(_tensor(our_norm.scale[...]))
      norm.bias.copy_(_tensor(our_norm.bias[...]))


@torch.no_grad()
def copy_weights(twin: TwinUNet3D, model) -> TwinUNet3D:
  """Copies the Flax ``model``'s parameters into ``twin``; returns it."""
  for theirs, ours in zip(twin.encoder, model.encoder):
    _copy_block(theirs, ours)
  _copy_block(twin.bottleneck, model.bottleneck)
  for up, block, ours in zip(twin.ups, twin.decoder, model.decoder):
    up.weight.copy_(_up_weight(ours.up.kernel[...]))
    up.bias.copy_(_tensor(ours.up.bias[...]))
    _copy_block(block, ours.block)
  twin.head.weight.copy_(_conv_weight(model.head.kernel[...]))
  twin.head.bias.copy_(_tensor(model.head.bias[...]))
  return twin


def twin_of(model) -> TwinUNet3D:
  """The twin of ``model`` with its weights, in ``channels_last_3d`` memory."""
  twin = copy_weights(TwinUNet3D(model), model)
  return twin.to(memory_format=torch.channels_last_3d)


def to_torch(x: np.ndarray) -> torch.Tensor:
  """Channels-last ``[b, x, y, z, c]`` -> ``[b, c, x, y, z]`` view in
  ``channels_last_3d`` memory (no copy of the bytes' order)."""
  return torch.from_numpy(np.asarray(x, np.float32)).permute(0, 4, 1, 2, 3)


def num_parameters(module: nn.Module) -> int:
  return sum(p.numel() for p in module.parameters())


def tversky_loss(logits: torch.Tensor, labels: torch.Tensor, alpha: float,
                 beta: float, smooth: float = 1e-5) -> torch.Tensor:
  """Tversky loss of the foreground classes, per case then averaged.

  ``logits [b, K, x, y, z]``, integer ``labels [b, x, y, z]``; softmax over
  K, background (class 0) dropped. alpha weighs false positives and beta
  false negatives (Salehi et al. 2017). The same formula as
  ``tversky_jax.losses.tversky_loss(pool_batch=False)``; the benchmark also
  times MONAI's ``TverskyLoss`` on its own.
  """
  probs = torch.softmax(logits, dim=1)[:, 1:]
  onehot = F.one_hot(labels.long(), logits.shape[1]).permute(0, 4, 1, 2, 3)
  onehot = onehot[:, 1:].to(probs.dtype)
  dims = (2, 3, 4)
  tp = (probs * onehot).sum(dims)
  fp = (probs * (1 - onehot)).sum(dims)
  fn = ((1 - probs) * onehot).sum(dims)
  index = (tp + smooth) / (tp + alpha * fp + beta * fn + smooth)
  return (1 - index).mean()
