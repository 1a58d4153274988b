"""Forward+backward time of tversky_loss against a naive jnp version and optax.

Usage: python bench/bench_losses.py [--shape 2 128 128 128] [--classes 2]

Prints, for each implementation, the median time of a jitted
value_and_grad over the logits and the voxels processed per second. The
"memory bound" row is a streaming kernel that reads the logits and the labels
once and writes one logits-sized array, i.e. the least memory traffic a
fused forward+backward can do; the ratio column compares every row with it.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tversky_jax import losses


def naive_tversky(logits, labels, alpha=0.3, beta=0.7, smooth=1e-5):
  """The textbook formula: softmax, one-hot, three sums, lesion classes."""
  probs = jax.nn.softmax(logits, axis=-1)
  onehot = jax.nn.one_hot(labels, logits.shape[-1])
  axes = tuple(range(1, logits.ndim - 1))
  tp = jnp.sum(probs * onehot, axes)
  fp = jnp.sum(probs * (1 - onehot), axes)
  fn = jnp.sum((1 - probs) * onehot, axes)
  index = (tp + smooth) / (tp + alpha * fp + beta * fn + smooth)
  return jnp.mean(1 - index[:, 1:])


def optax_dice(logits, labels, alpha=0.3, beta=0.7):
  onehot = jax.nn.one_hot(labels, logits.shape[-1])
  return jnp.mean(optax.losses.dice_loss(logits, onehot, alpha=alpha,
                                         beta=beta, ignore_background=True))


def ours(logits, labels):
  return losses.tversky_loss(logits, labels, alpha=0.3, beta=0.7)


def memory_bound(logits, labels):
  return jnp.sum(logits * labels[..., None].astype(logits.dtype))


def time_value_and_grad(fn, logits, labels, repeats):
  step = jax.jit(jax.value_and_grad(fn))
  jax.block_until_ready(step(logits, labels))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(step(logits, labels))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shape", type=int, nargs="+", default=[2, 128, 128, 128],
                      help="batch and spatial sizes")
  parser.add_argument("--classes", type=int, default=2)
  parser.add_argument("--repeats", type=int, default=20)
  args = parser.parse_args()

  shape = tuple(args.shape)
  logits = jax.random.normal(jax.random.PRNGKey(0), shape + (args.classes,))
  labels = jax.random.randint(jax.random.PRNGKey(1), shape, 0, args.classes)
  voxels = int(np.prod(shape))
  print(f"jax {jax.__version__} on {jax.devices()[0].platform} "
        f"({jax.device_count()} device(s)); logits {list(logits.shape)} "
        f"float32, int32 labels; forward+backward, median of {args.repeats}")
  rows = [("tversky_jax.losses.tversky_loss", ours),
          ("naive jnp (softmax + one_hot)", naive_tversky),
          ("optax.losses.dice_loss", optax_dice),
          ("memory bound (streaming kernel)", memory_bound)]
  times = {name: time_value_and_grad(fn, logits, labels, args.repeats)
           for name, fn in rows}
  bound = times["memory bound (streaming kernel)"]
  print(f"{'implementation':34s} {'ms':>8s} {'Gvoxel/s':>9s} {'x bound':>8s}")
  for name, seconds in times.items():
    print(f"{name:34s} {seconds * 1e3:8.1f} {voxels / seconds / 1e9:9.3f} "
          f"{seconds / bound:8.2f}")
  ours_s = times["tversky_jax.losses.tversky_loss"]
  print(f"speed-up over optax dice_loss: "
        f"{times['optax.losses.dice_loss'] / ours_s:.2f}x; over naive jnp: "
        f"{times['naive jnp (softmax + one_hot)'] / ours_s:.2f}x")


if __name__ == "__main__":
  main()
