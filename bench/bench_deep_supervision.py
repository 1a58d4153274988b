"""Train-step time with and without deep supervision, interleaved.

Usage:
  python bench/bench_deep_supervision.py                 # the demo's step
  python bench/bench_deep_supervision.py --config configs/default.py --repeats 9

Builds the trainer's jitted step (`train_state.make_train_step`, on-device
augmentation as in the config) twice from one config, once with
`model.deep_supervision=False` and once with True, compiles both, then
alternates them step by step on the same random batch and prints the median
step time of each and their ratio (with / without).
"""

import argparse
import importlib
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from tversky_jax import parallel  # noqa: E402
from tversky_jax import train_state  # noqa: E402


def _step_and_state(config, deep_supervision, spec, mesh):
  config.model.deep_supervision = deep_supervision
  graphdef, state = train_state.create_train_state(config, spec, mesh)
  step = train_state.make_train_step(
      graphdef, train_state.weighted_loss_fn(config), mesh,
      augment=train_state.augment_config(config, spec.num_classes),
      seed=config.seed)
  loss_args = train_state.loss_args(config)  # alpha, beta: step arguments
  return (lambda state, batch: step(state, batch, loss_args)), state


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/demo.py")
  parser.add_argument("--repeats", type=int, default=15)
  args = parser.parse_args()
  module = args.config.replace("/", ".").removesuffix(".py")
  config = importlib.import_module(module).get_config()
  shape = tuple(config.data.patch_shape)
  batch_size = config.train.batch_size
  mesh = parallel.make_mesh(jax.devices()[:1])
  spec = train_state.ModelSpec(3, 2)
  rng = np.random.default_rng(0)
  batch = {"image": rng.normal(size=(batch_size, *shape, 3)).astype(np.float32),
           "label": (rng.random((batch_size, *shape)) < 0.01).astype(np.int32)}
  runs = {}
  for deep in (False, True):
    step, state = _step_and_state(config, deep, spec, mesh)
    state, metrics = step(state, batch)  # compiles
    jax.block_until_ready(metrics)
    runs[deep] = [step, state, []]
  for _ in range(args.repeats):
    for deep in (False, True):
      step, state, times = runs[deep]
      start = time.perf_counter()
      state, metrics = step(state, batch)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - start)
      runs[deep][1] = state
  without, with_ = (1e3 * np.median(runs[d][2]) for d in (False, True))
  print(f"{args.config}: batch {batch_size} x {shape}, median of "
        f"{args.repeats} interleaved steps: without deep supervision "
        f"{without:.0f} ms, with {with_:.0f} ms, ratio {with_ / without:.2f}")


if __name__ == "__main__":
  main()
