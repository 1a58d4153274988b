"""Time of the jitted on-device augmentation (tversky_jax.data.augmentation).

Usage: python bench/bench_augmentation.py [--sizes 32 64 128] [--batch 2]
       [--channels 1] [--repeats 15]

For each cubic patch size prints the median (and minimum) milliseconds of one
jitted forward call on a ``[batch, n, n, n, channels]`` float32 batch and its
int32 label:

* ``nothing``: a jitted function returning its inputs (dispatch overhead);
* ``defaults``: :func:`augment` with the nnU-Net default probabilities; the
  cost depends on what is drawn (transforms no sample draws are skipped), so
  every call uses a new key;
* ``all p=1``: every transform applied to every sample (the worst case);
* one row per transform alone with probability 1;
* ``map_coordinates``: the spatial transform with
  ``jax.scipy.ndimage.map_coordinates`` (image order 1, label order 0), the
  reference for the ``spatial`` rows.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy import ndimage

from tversky_jax.data import augmentation as aug

ALL = aug.AugmentConfig(p_rotation=1.0, p_scaling=1.0, p_noise=1.0, p_blur=1.0,
                        p_blur_per_channel=1.0, p_brightness=1.0,
                        p_contrast=1.0, p_inverted_gamma=1.0, p_gamma=1.0,
                        p_mirror=1.0)
ONLY = aug.AugmentConfig.identity
ROWS = {
    "defaults": aug.AugmentConfig(),
    "all p=1": ALL,
    "spatial (linear label)": ONLY(p_rotation=1.0, p_scaling=1.0),
    "spatial (nearest label)": ONLY(p_rotation=1.0, p_scaling=1.0,
                                    label_interpolation="nearest"),
    "noise": ONLY(p_noise=1.0),
    "blur (all channels)": ONLY(p_blur=1.0, p_blur_per_channel=1.0),
    "brightness": ONLY(p_brightness=1.0),
    "contrast": ONLY(p_contrast=1.0),
    "gamma + inverted gamma": ONLY(p_gamma=1.0, p_inverted_gamma=1.0),
    "mirror (all axes)": ONLY(p_mirror=1.0),
}


def map_coordinates_spatial(key, image, label):
  """The spatial transform of ``ROWS['spatial (nearest label)']`` with
  ``jax.scipy.ndimage.map_coordinates``."""
  config = ROWS["spatial (nearest label)"]
  params = aug.sample_batch_params(key, config, image.shape[0],
                                   image.shape[-1])

  def one(image, label, matrix):
    shape = image.shape[:3]
    coords = aug._sample_coordinates(matrix, shape, shape)  # pylint: disable=protected-access
    coords = [jnp.broadcast_to(q, shape) for q in coords]
    channels = [ndimage.map_coordinates(image[..., k], coords, order=1,
                                        mode="constant")
                for k in range(image.shape[-1])]
    return (jnp.stack(channels, -1),
            ndimage.map_coordinates(label, coords, order=0, mode="constant"))

  return jax.vmap(one)(image, label, params["matrix"])


def time_fn(fn, image, label, repeats):
  """Median and minimum ms of ``fn(key_i, image, label)`` over new keys."""
  jax.block_until_ready(fn(jax.random.key(0), image, label))
  times = []
  for i in range(repeats):
    key = jax.random.key(i + 1)
    start = time.perf_counter()
    jax.block_until_ready(fn(key, image, label))
    times.append(time.perf_counter() - start)
  return 1e3 * float(np.median(times)), 1e3 * float(np.min(times))


def bench_size(n, batch, channels, repeats):
  rng = np.random.default_rng(0)
  image = jnp.asarray(rng.normal(size=(batch, n, n, n, channels)), jnp.float32)
  label = jnp.asarray(rng.random((batch, n, n, n)) < 0.1, jnp.int32)
  fns = {"nothing": jax.jit(lambda key, image, label: (image, label))}
  for name, config in ROWS.items():
    fns[name] = jax.jit(lambda key, image, label, config=config:
                        aug.augment(key, image, label, config))
  fns["map_coordinates (spatial ref.)"] = jax.jit(map_coordinates_spatial)
  results = {}
  for name, fn in fns.items():
    results[name] = time_fn(fn, image, label, repeats)
  return results


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128])
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--channels", type=int, default=1)
  parser.add_argument("--repeats", type=int, default=15)
  args = parser.parse_args()
  print(f"backend {jax.default_backend()}, {jax.device_count()} device(s), "
        f"batch {args.batch}, {args.channels} channel(s), float32, "
        f"{args.repeats} calls per row; ms per batch, median (min)")
  table = {n: bench_size(n, args.batch, args.channels, args.repeats)
           for n in args.sizes}
  names = list(next(iter(table.values())))
  width = max(map(len, names))
  print(f"{'':{width}}" + "".join(f"{f'{n}^3':>18}" for n in args.sizes))
  for name in names:
    cells = "".join(f"{f'{table[n][name][0]:.1f} ({table[n][name][1]:.1f})':>18}"
                    for n in args.sizes)
    print(f"{name:{width}}{cells}")


if __name__ == "__main__":
  main()
