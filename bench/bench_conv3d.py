"""Speed of the U-Net's building blocks and of the whole model on this backend.

Forward+backward (gradients with respect to input and weights), jitted,
after two warm-up runs; the implementations of one comparison run
interleaved and the median of ``--repeats`` runs is reported, so a busy
machine slows both alike. Sections:

* ``conv``: 3x3x3 'SAME' convolution, ``lax.conv_general_dilated`` in 3D
  ("native") against ``unet3d.conv3d_as_2d_sum`` (three x-shifted 2D
  convolutions over (y, z), batch and x folded together) and
  ``unet3d.conv3d_onednn`` (oneDNN through XLA's FFI; bfloat16 goes to
  "2d_sum"). GFLOP/s counts 3 x the forward's 2*N*27*Cin*Cout multiply-adds.
* ``upconv``: transposed convolution with kernel = stride (2x2x2, and an
  anisotropic 2x2x1), ``lax.conv_transpose`` against
  ``unet3d.conv_transpose_strided`` (an einsum; what ``unet3d.UpConv``
  runs).
* ``pool``: max-pooling with window = stride (2x2x2, 2x2x1),
  ``lax.reduce_window`` against reshape + max (``unet3d._max_pool``).
* ``model``: one forward+backward of ``UNet3D`` (base 16 features) per
  ``conv_impl``.

Usage::

  python bench/bench_conv3d.py                     # everything
  python bench/bench_conv3d.py --sections conv,upconv --repeats 7
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from tversky_jax.models import unet3d

DN = ("NDHWC", "DHWIO", "NDHWC")


def native_conv(x: jax.Array, k: jax.Array) -> jax.Array:
  return lax.conv_general_dilated(x, k, (1, 1, 1), "SAME", dimension_numbers=DN)


def sum2d_conv(x: jax.Array, k: jax.Array) -> jax.Array:
  return unet3d.conv3d_as_2d_sum(x, k, (1, 1, 1), "SAME", dimension_numbers=DN)


def onednn_conv(x: jax.Array, k: jax.Array) -> jax.Array:
  return unet3d.conv3d_onednn(x, k, (1, 1, 1), "SAME", dimension_numbers=DN)


def transpose_upconv(x: jax.Array, k: jax.Array) -> jax.Array:
  return lax.conv_transpose(x, k, k.shape[:3], "SAME", dimension_numbers=DN)


def reduce_window_pool(x: jax.Array, window=(2, 2, 2)) -> jax.Array:
  return nnx.max_pool(x, window, window)


def fwd_bwd(f: Callable, *args: jax.Array) -> Callable:
  """Jitted value and gradients (w.r.t. every arg) of ``sum(f(*args) * g)``."""
  out = jax.eval_shape(f, *args)
  g = jax.random.normal(jax.random.key(99), out.shape, out.dtype)

  def loss(*a):
    return jnp.sum((f(*a) * g).astype(jnp.float32))

  return jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(args)))))


def interleaved_medians(fns: dict[str, Callable], args: dict[str, tuple],
                        repeats: int) -> dict[str, float]:
  """Median seconds per call of each ``fns[name](*args[name])``."""
  for name, fn in fns.items():
    for _ in range(2):  # compile + one warm run
      jax.block_until_ready(fn(*args[name]))
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(*args[name]))
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(t) for name, t in times.items()}


def _rel_diff(a, b) -> float:
  """max |a - b| / max |b| over all leaves of two pytrees."""
  a, b = jax.tree.leaves(a), jax.tree.leaves(b)
  diff = max(float(jnp.max(jnp.abs(u.astype(jnp.float32) - v.astype(jnp.float32))))
             for u, v in zip(a, b))
  return diff / max(float(jnp.max(jnp.abs(v.astype(jnp.float32)))) for v in b)


def _compare(title: str, impls: dict[str, Callable], arrays: Sequence[jax.Array],
             flops: float, repeats: int) -> None:
  """Times fwd+bwd of each impl on ``arrays``; prints ms, GFLOP/s, and the
  max abs difference to the first impl relative to its max abs value."""
  fns = {name: fwd_bwd(f, *arrays) for name, f in impls.items()}
  medians = interleaved_medians(fns, {n: tuple(arrays) for n in fns}, repeats)
  names = list(impls)
  ref_out = impls[names[0]](*arrays)
  ref_grad = fns[names[0]](*arrays)[1]
  for name in names:
    sec = medians[name]
    line = f"  {title:42s} {name:17s} {sec * 1e3:9.1f} ms"
    if flops:
      line += f" {flops / sec / 1e9:7.1f} GFLOP/s"
    if name != names[0]:
      line += (f"  rel. diff out {_rel_diff(impls[name](*arrays), ref_out):.1e}"
               f" grads {_rel_diff(fns[name](*arrays)[1], ref_grad):.1e}")
    print(line, flush=True)


def bench_conv(repeats: int) -> None:
  print("3x3x3 conv, fwd+bwd (GFLOP/s = 3 x forward flops / time)")
  cases = [((2, 64, 64, 64, 16), 16, jnp.float32),
           ((2, 32, 32, 32, 32), 32, jnp.float32),
           ((2, 16, 16, 16, 64), 64, jnp.float32),
           ((1, 64, 64, 64, 32), 16, jnp.float32),
           ((2, 32, 32, 32, 32), 32, jnp.bfloat16)]
  for shape, cout, dtype in cases:
    x = jax.random.normal(jax.random.key(0), shape, dtype)
    k = (jax.random.normal(jax.random.key(1), (3, 3, 3, shape[-1], cout))
         / np.sqrt(27 * shape[-1])).astype(dtype)
    flops = 3 * 2 * np.prod(shape[:-1]) * 27 * shape[-1] * cout
    title = f"{list(shape)}->{cout} {jnp.dtype(dtype).name}"
    _compare(title, {"native": native_conv, "2d_sum": sum2d_conv,
                     "onednn": onednn_conv}, (x, k), flops, repeats)


def bench_upconv(repeats: int) -> None:
  print("transposed conv with kernel = stride, fwd+bwd")
  cases = [((1, 32, 32, 32, 32), 16, jnp.float32, (2, 2, 2)),
           ((1, 16, 16, 16, 64), 32, jnp.float32, (2, 2, 2)),
           ((1, 8, 8, 8, 128), 64, jnp.float32, (2, 2, 2)),
           ((1, 32, 32, 32, 32), 16, jnp.bfloat16, (2, 2, 2)),
           ((1, 32, 32, 16, 32), 16, jnp.float32, (2, 2, 1))]
  for shape, cout, dtype, stride in cases:
    x = jax.random.normal(jax.random.key(0), shape, dtype)
    k = jax.random.normal(jax.random.key(1), (*stride, shape[-1], cout), dtype)
    flops = 3 * 2 * np.prod(shape[:-1]) * np.prod(stride) * shape[-1] * cout
    title = f"{list(shape)}->{cout} stride {stride} {jnp.dtype(dtype).name}"
    _compare(title, {"conv_transpose": transpose_upconv,
                     "einsum": unet3d.conv_transpose_strided}, (x, k), flops,
             repeats)


def bench_pool(repeats: int) -> None:
  print("max-pool with window = stride, fwd+bwd")
  for shape, window in [((1, 64, 64, 64, 16), (2, 2, 2)),
                        ((2, 32, 32, 32, 32), (2, 2, 2)),
                        ((2, 64, 64, 32, 16), (2, 2, 1))]:
    x = jax.random.normal(jax.random.key(0), shape)
    _compare(f"{list(shape)} window {window} float32",
             {"reduce_window": lambda x, w=window: reduce_window_pool(x, w),
              "reshape+max": lambda x, w=window: unet3d._max_pool(x, w)},
             (x,), 0.0, repeats)


def bench_model(repeats: int, sizes: Sequence[int], depths: Sequence[int],
                base_features: int) -> None:
  print(f"UNet3D fwd+bwd (grads of all params), base_features={base_features}, "
        "batch 1, 3 channels")
  for size in sizes:
    for depth in depths:
      x = jax.random.normal(jax.random.key(0), (1, size, size, size, 3))
      target = jax.random.normal(jax.random.key(1), (1, size, size, size, 2))
      fns, args, params = {}, {}, None
      for impl in unet3d.CONV_IMPLS:
        model = unet3d.UNet3D(in_channels=3, base_features=base_features,
                              depth=depth, conv_impl=impl,
                              rngs=nnx.Rngs(jax.random.key(0, impl="rbg")))
        graphdef, p, rest = nnx.split(model, nnx.Param, ...)
        params = p if params is None else params  # same params for both

        def step(params, x, graphdef=graphdef, rest=rest):
          def loss(params):
            return jnp.mean(nnx.merge(graphdef, params, rest)(x) * target)
          return jax.value_and_grad(loss)(params)

        fns[impl], args[impl] = jax.jit(step), (params, x)
      medians = interleaved_medians(fns, args, repeats)
      n_params = sum(int(a.size) for a in jax.tree.leaves(params))
      for impl, sec in medians.items():
        print(f"  [1, {size}, {size}, {size}, 3] depth {depth} "
              f"({n_params / 1e6:.2f} M params) {impl:7s} {sec * 1e3:9.1f} ms",
              flush=True)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sections", default="conv,upconv,pool,model",
                      help="comma-separated subset of conv,upconv,pool,model")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--model_sizes", default="32,64")
  parser.add_argument("--model_depths", default="3,4")
  parser.add_argument("--base_features", type=int, default=16)
  args = parser.parse_args()

  print(f"jax {jax.__version__}, backend {jax.default_backend()}, "
        f"{jax.devices()[0].device_kind}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f}; medians of {args.repeats}")
  sections = args.sections.split(",")
  unknown = set(sections) - {"conv", "upconv", "pool", "model"}
  if unknown:
    parser.error(f"unknown sections {sorted(unknown)}")
  if "conv" in sections:
    bench_conv(args.repeats)
  if "upconv" in sections:
    bench_upconv(args.repeats)
  if "pool" in sections:
    bench_pool(args.repeats)
  if "model" in sections:
    bench_model(args.repeats, [int(s) for s in args.model_sizes.split(",")],
                [int(d) for d in args.model_depths.split(",")],
                args.base_features)


if __name__ == "__main__":
  main()
