"""Train-step time, voxels/s and peak memory of the demo and paper models.

Usage:
  python bench/bench_train_step.py                      # demo + paper, f32 + bf16
  python bench/bench_train_step.py --models paper --shape 128 224 256 --batch 1
  python bench/bench_train_step.py --conv-impl native    # compare convolutions

Runs the real jitted, donated, data-parallel train step of train_lib on
whatever devices are present (CPU or GPU), so the same script serves both.
Peak memory is the device's peak_bytes_in_use where the backend reports it
(GPU/TPU), else the process's peak resident memory so far (CPU; it only
grows, so run one model and dtype per process for exact CPU figures).
"""

import argparse
import resource
import sys
import time

import jax
import numpy as np

sys.path.insert(0, ".")
from configs import demo as demo_config  # noqa: E402
from configs import paper as paper_config  # noqa: E402
from tversky_jax import train_state  # noqa: E402
from tversky_jax import parallel  # noqa: E402


def peak_memory_mb() -> tuple[float, str]:
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return stats["peak_bytes_in_use"] / 2**20, "device peak"
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "host RSS"


def bench(name, config, shape, batch, dtype, conv_impl, repeats):
  config.model.dtype = dtype
  config.model.conv_impl = conv_impl
  config.train.batch_size = batch
  mesh = parallel.make_mesh()
  graphdef, state = train_state.create_train_state(config, 3, mesh)
  step = train_state.make_train_step(
      graphdef, train_state.weighted_loss_fn(config), mesh)
  loss_args = train_state.loss_args(config)
  rng = np.random.default_rng(0)
  local = {"image": rng.normal(size=(batch, *shape, 3)).astype(np.float32),
           "label": (rng.random((batch, *shape)) < 0.003).astype(np.int32)}
  start = time.perf_counter()
  state, metrics = step(state, parallel.global_batch(local, mesh), loss_args)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    batch_arrays = parallel.global_batch(local, mesh)
    start = time.perf_counter()
    state, metrics = step(state, batch_arrays, loss_args)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  seconds = float(np.median(times))
  memory, kind = peak_memory_mb()
  voxels = batch * int(np.prod(shape))
  print(f"{name:6s} {dtype:8s} {conv_impl:7s} {str(list(shape)):16s} "
        f"{batch:5d} {compile_s:9.1f} {seconds * 1e3:9.1f} "
        f"{voxels / seconds / 1e6:9.3f} {memory:9.0f} ({kind})", flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", nargs="+", default=["demo", "paper"],
                      choices=["demo", "paper"])
  parser.add_argument("--shape", type=int, nargs=3, default=[64, 64, 64])
  parser.add_argument("--batch", type=int, default=None,
                      help="global batch (default: the device count)")
  parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
  parser.add_argument("--conv-impl", default="auto",
                      choices=["auto", "native", "2d_sum", "onednn"])
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  batch = args.batch or jax.device_count()
  print(f"jax {jax.__version__}, {jax.device_count()} x "
        f"{jax.devices()[0].device_kind}; median of {args.repeats} steps")
  print(f"{'model':6s} {'dtype':8s} {'conv':7s} {'shape':16s} {'batch':>5s} "
        f"{'compile_s':>9s} {'step_ms':>9s} {'Mvox/s':>9s} {'peak_MB':>9s}")
  configs = {"demo": demo_config.get_config, "paper": paper_config.get_config}
  for name in args.models:
    for dtype in args.dtypes:
      bench(name, configs[name](), tuple(args.shape), batch, dtype,
            args.conv_impl, args.repeats)


if __name__ == "__main__":
  main()
