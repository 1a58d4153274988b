"""Seconds per volume and peak memory of whole-volume U-Net prediction.

Usage: python bench/bench_predict.py [--config configs/demo.py]
           [--base-features N] [--depth D] [--window X Y Z] [--overlap F]
           [--batch-size B] [--conv-impl {auto,native,2d_sum,onednn}]
           [--dtype {float32,bfloat16}] [--shape 128 224 256]
           [--mirror {off,on,both}] [--repeats 1]

Times ``tversky_jax.predict.Predictor.predict_probability`` (the sliding-window
inference that ``tversky-predict`` runs per case) on one random normalised
three-channel volume of the paper's size, 128x224x256, for a freshly
initialised model of the config (default configs/demo.py: base_features 8,
depth 3, window = the 32^3 training patch, overlap 0.5, batch 2), so no
trained run is needed. Each setting is compiled on a one-window volume,
then timed on the full volume (--repeats times, median).
Peak host memory is the process's ru_maxrss so far (so with --mirror both,
the second row's peak includes the first row's); on an accelerator the peak
device memory is printed too.
"""

import argparse
import importlib.util
import os
import resource
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tversky_jax import train_state  # pylint: disable=g-import-not-at-top
from tversky_jax import inference  # pylint: disable=g-import-not-at-top
from tversky_jax import parallel  # pylint: disable=g-import-not-at-top
from tversky_jax import predict  # pylint: disable=g-import-not-at-top
from tversky_jax.data import nifti  # pylint: disable=g-import-not-at-top


def load_config(path):
  spec = importlib.util.spec_from_file_location("bench_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def device_peak_mib():
  stats = jax.local_devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return None if peak is None else peak / 2**20


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default=os.path.join(
      os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
      "configs", "demo.py"))
  parser.add_argument("--base-features", type=int)
  parser.add_argument("--depth", type=int)
  parser.add_argument("--window", type=int, nargs=3)
  parser.add_argument("--overlap", type=float)
  parser.add_argument("--batch-size", type=int)
  parser.add_argument("--conv-impl", choices=("auto", "native", "2d_sum", "onednn"))
  parser.add_argument("--dtype", choices=("float32", "bfloat16"))
  parser.add_argument("--shape", type=int, nargs=3, default=[128, 224, 256])
  parser.add_argument("--mirror", choices=("off", "on", "both"),
                      default="both")
  parser.add_argument("--repeats", type=int, default=1)
  args = parser.parse_args()

  config = load_config(args.config)
  for key, value in (("base_features", args.base_features),
                     ("depth", args.depth), ("conv_impl", args.conv_impl),
                     ("dtype", args.dtype)):
    if value is not None:
      config.model[key] = value
  devices = jax.local_devices()
  start = time.perf_counter()
  graphdef, state = train_state.create_train_state(
      config, 3, parallel.make_mesh(devices))
  init_s = time.perf_counter() - start

  rng = np.random.default_rng(0)
  raw = rng.uniform(0, 1000, size=(*args.shape, 3)).astype(np.float32)
  start = time.perf_counter()
  image = nifti.normalize_image(raw)
  normalise_s = time.perf_counter() - start
  del raw

  mirrors = {"off": [False], "on": [True], "both": [False, True]}[args.mirror]
  print(f"devices: {devices}")
  for mirror in mirrors:
    predictor = predict.Predictor(
        config, graphdef, state, channel_names=("T1", "T2", "FLAIR"),
        window=args.window, overlap=args.overlap, batch_size=args.batch_size,
        mirror=mirror, devices=devices)
    window = predictor.window_for(args.shape)
    n_windows = len(inference.window_starts(args.shape, window,
                                            predictor.overlap))
    if mirror == mirrors[0]:
      print(f"model: base_features {config.model.base_features}, depth "
            f"{config.model.depth}, {config.model.conv_impl} conv, "
            f"{config.model.dtype}; init {init_s:.1f} s")
      print(f"volume {tuple(args.shape)} x 3 channels, window {window}, "
            f"overlap {predictor.overlap}, {n_windows} windows, batch size "
            f"{predictor.batch_size}; normalise_image {normalise_s:.2f} s")
    # Compile on a one-window volume: the compiled shapes (one batch of
    # windows) do not depend on the volume size.
    start = time.perf_counter()
    predictor.predict_probability(image[:window[0], :window[1], :window[2]])
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(args.repeats):
      start = time.perf_counter()
      prob = predictor.predict_probability(image)
      times.append(time.perf_counter() - start)
    assert prob.shape == tuple(args.shape)
    seconds = float(np.median(times))
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    device_peak = device_peak_mib()
    print(f"mirror={str(mirror):5s}  {seconds:8.2f} s/volume  "
          f"(compile {compile_s:.1f} s)  "
          f"{n_windows * (8 if mirror else 1) / seconds:7.1f} "
          f"forward windows/s  peak host RSS {peak_mib:,.0f} MiB"
          + (f"  peak device {device_peak:,.0f} MiB"
             if device_peak is not None else ""), flush=True)


if __name__ == "__main__":
  main()
