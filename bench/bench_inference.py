"""Seconds per volume and peak host memory of sliding-window inference.

Usage: python bench/bench_inference.py [--shape 128 224 256] [--channels 3]
           [--window 64 64 64] [--overlap 0.5] [--batch-size 4]
           [--mirror {off,on,both}] [--repeats 1]

The model is a small stand-in for the U-Net (two 3x3x3 convolutions with 8
features and ReLU, then a 1x1x1 convolution to 2 classes), jitted. Each
setting is run once to compile, then timed. Peak host memory is the process's
ru_maxrss so far, so with --mirror both the second row's peak includes the
first row's.
"""

import argparse
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np

from tversky_jax import inference

_DIMS = ("NXYZC", "XYZIO", "NXYZC")


def make_logits_fn(channels, features=8, classes=2, seed=0):
  rng = np.random.default_rng(seed)

  def kernel(size, cin, cout):
    scale = np.sqrt(2.0 / (size**3 * cin))
    return jnp.asarray(
        rng.normal(scale=scale, size=(size, size, size, cin, cout)),
        jnp.float32)

  kernels = [kernel(3, channels, features), kernel(3, features, features),
             kernel(1, features, classes)]

  @jax.jit
  def logits_fn(x):
    for i, k in enumerate(kernels):
      x = jax.lax.conv_general_dilated(x, k, (1, 1, 1), "SAME",
                                       dimension_numbers=_DIMS)
      if i < len(kernels) - 1:
        x = jax.nn.relu(x)
    return x

  return logits_fn


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shape", type=int, nargs=3, default=[128, 224, 256])
  parser.add_argument("--channels", type=int, default=3)
  parser.add_argument("--window", type=int, nargs=3, default=[64, 64, 64])
  parser.add_argument("--overlap", type=float, default=0.5)
  parser.add_argument("--batch-size", type=int, default=4)
  parser.add_argument("--mirror", choices=("off", "on", "both"),
                      default="both")
  parser.add_argument("--repeats", type=int, default=1)
  args = parser.parse_args()

  image = np.random.default_rng(0).normal(
      size=(*args.shape, args.channels)).astype(np.float32)
  logits_fn = make_logits_fn(args.channels)
  n_windows = len(inference.window_starts(args.shape, args.window,
                                          args.overlap))
  print(f"devices: {jax.devices()}")
  print(f"volume {tuple(args.shape)} x {args.channels} channels, window "
        f"{tuple(args.window)}, overlap {args.overlap}, {n_windows} windows, "
        f"batch size {args.batch_size}")
  mirrors = {"off": [False], "on": [True], "both": [False, True]}[args.mirror]
  for mirror in mirrors:
    def run():
      return inference.sliding_window_inference(
          logits_fn, image, window=args.window, overlap=args.overlap,
          batch_size=args.batch_size, mirror=mirror)

    run()  # compile
    times = []
    for _ in range(args.repeats):
      start = time.perf_counter()
      run()
      times.append(time.perf_counter() - start)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"mirror={str(mirror):5s}  {np.median(times):8.2f} s/volume  "
          f"{n_windows / np.median(times):7.1f} windows/s  "
          f"peak host RSS {peak_mib:,.0f} MiB")


if __name__ == "__main__":
  main()
