"""Batches/s of the training input pipeline on paper-sized cached cases.

Usage:
  python bench/bench_pipeline.py                      # 4 phantoms of 128x224x256
  python bench/bench_pipeline.py --cases 8 --workers 0 2 --batches 30

Writes phantoms of the paper's volume size (3 channels) as a NIfTI dataset,
plans and preprocesses them into the memory-mapped cache the trainer reads
(`tversky_jax.data.preprocessing`), then times the grain iterator of
`tversky_jax.data.pipeline.make_train_iterator` for the paper's two input
shapes: whole volumes (batch 1, zero-padded to a multiple of 16) and
2 x 128^3 patches (one third centred on foreground), with 0 (a background
thread) and with N grain worker processes. As in the default config, the
pipeline does not flip (the train step mirrors on the device);
`--random-flip` adds the host flips of `config.data.random_flip`. Each
figure is batches/s over `--batches` batches after `--warmup` batches, i.e.
what the pipeline can feed; compare it with 1 / (train-step time) of the
device.

`--monai` then compares ours with MONAI's patch sampling on the same work
(2 x 128^3 patches, one third centred on foreground, from the same cases),
both synchronous in this thread, with interleaved repetitions (ours, MONAI,
ours, ...): MONAI's `RandCropByPosNegLabeld` (pos 1, neg 2) with the
foreground/background indices precomputed once per case
(`FgBgToIndicesd`, as a `CacheDataset` would) on the cases held in memory
channel first and padded once to the patch size (`SpatialPadd`), then
`list_data_collate`. That is MONAI at its best here: no padding or index
search per sample. Needs the `bench` extra (torch, MONAI).
"""

import argparse
import itertools
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tversky_jax.data import pipeline  # noqa: E402
from tversky_jax.data import planning  # noqa: E402
from tversky_jax.data import preprocessing  # noqa: E402
from tversky_jax.data import synthetic  # noqa: E402

SHAPE = (128, 224, 256)


def cached_cases(root: Path, num_cases: int):
  """Phantoms -> plan -> preprocessed cache -> memory-mapped training cases."""
  start = time.perf_counter()
  data = synthetic.make_synthetic_dataset(
      root / "Dataset903_PaperSize", num_cases=num_cases, shape=SHAPE, seed=0)
  made = time.perf_counter()
  plan, _ = planning.plan_dataset(data, root / "pre", progress=False)
  summary = preprocessing.preprocess_dataset(data, plan, root / "pre",
                                             progress=False)
  cases = pipeline.load_preprocessed_cases(
      summary.folder, summary.built + summary.reused, plan.num_classes,
      progress=False)
  done = time.perf_counter()
  print(f"{num_cases} phantoms {SHAPE}: written in {made - start:.1f} s, "
        f"planned + preprocessed in {done - made:.1f} s "
        f"({(done - made) / num_cases:.2f} s/case); cached shape "
        f"{cases[0].image.shape}")
  return cases


def batches_per_second(cases, *, batch, patch, workers, warmup, count,
                       random_flip):
  iterator = pipeline.make_train_iterator(
      cases, global_batch_size=batch, patch_shape=patch, divisor=16,
      foreground_fraction=0.33, random_flip=random_flip, seed=0,
      worker_count=workers, prefetch_batches=2)
  try:
    for _ in range(warmup):
      next(iterator)
    start = time.perf_counter()
    for _ in range(count):
      item = next(iterator)
    seconds = time.perf_counter() - start
  finally:
    if hasattr(iterator, "close"):
      iterator.close()
  megabytes = item["image"].nbytes / 2**20
  return count / seconds, item["image"].shape, megabytes


def monai_vs_ours(cases, *, count: int, warmup: int, repeats: int = 3):
  """Median batches/s of ours and of MONAI's patch sampling, interleaved."""
  # pylint: disable=import-outside-toplevel
  from monai.data import list_data_collate
  from monai.transforms import FgBgToIndicesd, RandCropByPosNegLabeld, SpatialPadd
  # pylint: enable=import-outside-toplevel
  patch = (128, 128, 128)
  prepare = [SpatialPadd(["image", "label"], patch),
             FgBgToIndicesd("label", fg_postfix="_fg", bg_postfix="_bg")]
  items = []
  for case in cases:  # MONAI's layout: channel first, in memory
    item = {"image": np.ascontiguousarray(np.moveaxis(case.image, -1, 0)),
            "label": np.asarray(case.label)[None]}
    for transform in prepare:
      item = transform(item)
    items.append(item)
  crop = RandCropByPosNegLabeld(
      ["image", "label"], "label", patch, pos=1, neg=2, num_samples=1,
      fg_indices_key="label_fg", bg_indices_key="label_bg")
  crop.set_random_state(seed=0)
  samples = itertools.cycle(items)

  def monai_batch():
    return list_data_collate([crop(next(samples))[0] for _ in range(2)])

  ours = pipeline.make_train_iterator(
      cases, global_batch_size=2, patch_shape=patch, divisor=16,
      foreground_fraction=1 / 3, random_flip=False, seed=0, prefetch_batches=0)
  rates = {"ours": [], "monai": []}
  for name, fn in (("ours", lambda: next(ours)), ("monai", monai_batch)):
    for _ in range(warmup):
      fn()
  for _ in range(repeats):
    for name, fn in (("ours", lambda: next(ours)), ("monai", monai_batch)):
      start = time.perf_counter()
      for _ in range(count):
        batch = fn()
      rates[name].append(count / (time.perf_counter() - start))
  print(f"2 x 128^3 patches, synchronous, median of {repeats} interleaved "
        f"runs of {count} batches: ours {np.median(rates['ours']):.2f}, "
        f"MONAI {np.median(rates['monai']):.2f} batches/s "
        f"(MONAI's batch: image {tuple(batch['image'].shape)}, "
        f"label {batch['label'].dtype}; ours: label int32)")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--cases", type=int, default=4)
  parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
  parser.add_argument("--batches", type=int, default=20)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--random-flip", action="store_true",
                      help="flip on the host too (config.data.random_flip)")
  parser.add_argument("--monai", action="store_true",
                      help="then compare with MONAI's patch sampling")
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    cases = cached_cases(Path(tmp), args.cases)
    print(f"{'input':18s} {'workers':>7s} {'batches/s':>9s} {'batch shape':24s}"
          f" {'MB/batch':>8s}")
    for name, batch, patch in (("whole volume", 1, None),
                               ("2 x 128^3 patches", 2, (128, 128, 128))):
      for workers in args.workers:
        rate, shape, megabytes = batches_per_second(
            cases, batch=batch, patch=patch, workers=workers,
            warmup=args.warmup, count=args.batches,
            random_flip=args.random_flip)
        print(f"{name:18s} {workers:7d} {rate:9.2f} {str(shape):24s} "
              f"{megabytes:8.1f}", flush=True)
    if args.monai:
      monai_vs_ours(cases, count=args.batches, warmup=args.warmup)


if __name__ == "__main__":
  main()
