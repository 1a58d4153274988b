"""Plans (and optionally preprocesses) a dataset: ``python -m tversky_jax.plan``.

Usage::

  python -m tversky_jax.plan --data data/Dataset800_MNILesions \
      [--out DIR] [--memory-gb N] [--preprocess] [--force]

Prints the plan (spacings, target spacing, normalisation per channel, patch,
batch and pooling, class frequencies) and writes ``plans.json`` and
``dataset_fingerprint.json`` into ``--out`` (default
``<dataset>/../<dataset folder name>_preprocessed``); with ``--preprocess``
also the preprocessed cases into ``<out>/cases/``. Both are reused while the
dataset files and the arguments are unchanged (see
:mod:`tversky_jax.data.planning` and :mod:`tversky_jax.data.preprocessing`).

The memory budget defaults to the accelerator memory jax reports, else a
quarter of host RAM. JAX is not allowed to preallocate accelerator memory
here (``XLA_PYTHON_CLIENT_PREALLOCATE=false`` unless set), so planning next
to a training run does not take its memory.

Exit status: 0 on success, 1 for a dataset or planning problem (a one-line
``error: ...``), 2 for invalid arguments.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
from collections.abc import Sequence

from tversky_jax.data import nifti
from tversky_jax.data import planning
from tversky_jax.data import preprocessing


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m tversky_jax.plan",
      description="Fingerprint a dataset (nnU-Net v2 raw layout), plan spacing, "
      "normalisation, patch, batch and pooling, and optionally preprocess it.")
  parser.add_argument("--data", required=True, help="dataset folder (holds dataset.json)")
  parser.add_argument("--out", help="output folder (default: <dataset>/../<name>_preprocessed)")
  parser.add_argument("--memory-gb", type=float, help="memory budget of one train step, GiB "
                      "(default: accelerator memory x 0.9, else host RAM x 0.25)")
  parser.add_argument("--base-features", type=int, default=16)
  parser.add_argument("--max-features", type=int, help="cap on features per stage (default none)")
  parser.add_argument("--conv-impl", default="auto",
                      choices=("auto", *planning.ACTIVATION_COPIES),
                      help="convolution the memory estimate assumes (auto: what the "
                      "trainer picks: onednn on one CPU device, native on GPU/TPU)")
  parser.add_argument("--normalization", help="comma-separated scheme per channel "
                      "(ct, zscore, none), overriding the channel names")
  parser.add_argument("--image-order", type=int, default=3, help="spline order for images")
  parser.add_argument("--label-order", type=int, default=1, choices=(0, 1),
                      help="0: nearest, 1: one-hot linear then argmax")
  parser.add_argument("--preprocess", action="store_true", help="also write the cases cache")
  parser.add_argument("--force", action="store_true", help="recompute even if cached")
  parser.add_argument("--workers", type=int, help="reading / preprocessing threads")
  parser.add_argument("--no-progress", action="store_true", help="no progress bars")
  return parser


def _options(args: argparse.Namespace) -> planning.PlanOptions:
  memory = None if args.memory_gb is None else int(args.memory_gb * 2**30)
  normalization = None
  if args.normalization:
    normalization = tuple(s.strip().lower() for s in args.normalization.split(","))
  return planning.PlanOptions(
      memory_bytes=memory, base_features=args.base_features, max_features=args.max_features,
      conv_impl=args.conv_impl, normalization=normalization, image_order=args.image_order,
      label_order=args.label_order)


def _triple(values: Sequence[float], fmt: str = "g") -> str:
  return " x ".join(format(v, fmt) for v in values)


def format_plan(plan: planning.Plan, fingerprint: planning.Fingerprint) -> str:
  """The plan as readable text."""
  spacing_counts = collections.Counter(fingerprint.spacings)
  spacings = ", ".join(f"{_triple(s)} ({n})" for s, n in spacing_counts.most_common())
  rule = ("median" if plan.anisotropic_axis is None else
          f"median; axis {'xyz'[plan.anisotropic_axis]}: 10th percentile (anisotropic)")
  norms = ", ".join(f"{name}: {scheme}" for name, scheme in
                    zip(plan.channel_names, plan.normalization))
  strides = ", ".join("[" + ",".join(map(str, s)) + "]" for s in plan.pool_strides)
  classes = ", ".join(f"{name} {100 * f:.3g}%" for name, f in plan.class_frequencies.items())
  ct = [f"{n}: clip [{s.percentile_00_5:.4g}, {s.percentile_99_5:.4g}], mean {s.mean:.4g}, "
        f"std {s.std:.4g}" for n, s, k in zip(plan.channel_names, plan.intensity,
                                             plan.normalization) if k == "ct"]
  lines = [
      f"{plan.dataset_name}: {plan.num_training} training cases, {plan.num_channels} "
      f"channel(s), {plan.num_classes} classes",
      f"  spacings (mm, x y z):  {spacings}",
      f"  median spacing:        {_triple(plan.median_spacing)}",
      f"  target spacing:        {_triple(plan.target_spacing)}   ({rule})",
      f"  median shape:          {_triple(plan.median_shape)} cropped, "
      f"{_triple(plan.resampled_median_shape)} resampled",
      f"  normalisation:         {norms}",
      *(f"                         {line}" for line in ct),
      f"  patch size:            {_triple(plan.patch_size)}",
      f"  batch size:            {plan.batch_size}",
      f"  poolings per axis:     {_triple(plan.num_pool_per_axis)}",
      f"  pool strides:          {strides}",
      f"  features per stage:    {', '.join(map(str, plan.features_per_stage))}",
      f"  memory:                ~{plan.estimated_memory_bytes / 2**30:.2f} GiB of "
      f"{plan.memory_budget_bytes / 2**30:.2f} GiB ({plan.memory_source}; "
      f"conv {plan.conv_impl})",
      f"  class frequencies:     {classes}",
  ]
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the command line; returns the exit status."""
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  parser = build_parser()
  args = parser.parse_args(argv)
  try:
    options = _options(args)
    out_dir = args.out or planning.default_output_dir(args.data)
    dataset = nifti.read_dataset(args.data)
    plan, fingerprint = planning.plan_dataset(
        dataset, out_dir, options, force=args.force, num_workers=args.workers,
        progress=not args.no_progress)
    print(format_plan(plan, fingerprint))
    print(f"plan: {os.path.join(out_dir, planning.PLANS_FILE)}")
    if args.preprocess:
      summary = preprocessing.preprocess_dataset(
          dataset, plan, out_dir, force=args.force, num_workers=args.workers,
          progress=not args.no_progress)
      print(f"preprocessed {len(summary.built)} case(s), reused {len(summary.reused)}, "
            f"in {summary.folder}")
  except (ValueError, OSError) as error:  # nifti.DatasetError is a ValueError.
    print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
