"""Time planning and preprocessing of a dataset; seconds per case.

Usage:
  python bench/bench_preprocess.py                      # Dataset800 if present
  python bench/bench_preprocess.py --data data/Dataset001_X --workers 4
  python bench/bench_preprocess.py --check-memory       # + real U-Net memory vs estimate

The dataset defaults to ../shared/data/Dataset800_MNILesions (beside the
repository) when present, else 8 generated 64^3 phantoms. Output
goes to a temporary folder unless --out is given. Timed: the fingerprint, the
plan, plan_dataset forced and cached, preprocessing with one thread (clean per-case
seconds), with --workers threads, the cached rerun, and putting softmax
probabilities back on each scan's grid (resample_to_original).

--check-memory compiles the real train step (tversky_jax.models.unet3d, Adam,
float32) with each convolution implementation for a few isotropic patches and
prints the planner's estimate over XLA's memory_analysis() (temp + arguments)
and the activation copies the step needed.
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, ".")
from tversky_jax.data import nifti  # noqa: E402
from tversky_jax.data import planning  # noqa: E402
from tversky_jax.data import preprocessing  # noqa: E402

# shared/ beside the repository (the project's layout), from any working dir.
_CANDIDATES = (Path(__file__).resolve().parents[2] / "shared" / "data"
               / "Dataset800_MNILesions",)


def default_dataset(tmp: Path) -> Path:
  for candidate in _CANDIDATES:
    if (Path(candidate) / "dataset.json").is_file():
      return Path(candidate)
  from tversky_jax.data import synthetic  # pylint: disable=import-outside-toplevel
  print("Dataset800 not found: generating 8 phantoms of 64^3")
  return synthetic.make_synthetic_dataset(tmp / "Dataset900_Bench", num_cases=8, shape=(64,) * 3)


def timed(fn, *args, **kwargs):
  start = time.perf_counter()
  result = fn(*args, **kwargs)
  return result, time.perf_counter() - start


def bench_plan(dataset, out, workers):
  _, t_budget = timed(planning.default_memory_budget)  # Starts jax (once per process).
  fingerprint, t_fingerprint = timed(planning.compute_fingerprint, dataset,
                                     num_workers=workers, progress=False)
  _, t_plan = timed(planning.make_plan, dataset, fingerprint)
  _, t_total = timed(planning.plan_dataset, dataset, out, force=True, num_workers=workers,
                     progress=False)
  (plan, _), t_cached = timed(planning.plan_dataset, dataset, out, progress=False)
  n = len(fingerprint.case_ids)
  print(f"fingerprint: {t_fingerprint:.2f} s ({t_fingerprint / n:.3f} s/case, {workers} "
        f"thread(s)); plan: {t_plan * 1e3:.1f} ms; jax start for the memory budget: "
        f"{t_budget:.2f} s")
  print(f"plan_dataset: forced {t_total:.2f} s, cached {t_cached * 1e3:.1f} ms")
  return plan


def bench_preprocess(dataset, plan, out, workers):
  one, t_one = timed(preprocessing.preprocess_dataset, dataset, plan, out, force=True,
                     num_workers=1, progress=False)
  _, t_many = timed(preprocessing.preprocess_dataset, dataset, plan, out, force=True,
                    num_workers=workers, progress=False)
  again, t_cached = timed(preprocessing.preprocess_dataset, dataset, plan, out, progress=False)
  n = len(one.built)
  print(f"preprocess: 1 thread {t_one:.2f} s ({t_one / n:.3f} s/case); {workers} threads "
        f"{t_many:.2f} s ({t_many / n:.3f} s/case); cached rerun {t_cached * 1e3:.1f} ms "
        f"({len(again.reused)} reused)")
  print(f"{'case':<16} {'spacing (mm)':<16} {'original':<14} {'preprocessed':<14} "
        f"{'prep s':>7} {'back s':>7}")
  for case_id in one.built:
    _, _, meta = preprocessing.load_preprocessed(one.folder, case_id)
    probabilities = np.full((*meta.preprocessed_shape, plan.num_classes),
                            1 / plan.num_classes, np.float32)
    _, t_back = timed(preprocessing.resample_to_original, probabilities, meta)
    print(f"{case_id:<16} {'x'.join(f'{s:g}' for s in meta.original_spacing):<16} "
          f"{'x'.join(map(str, meta.original_shape)):<14} "
          f"{'x'.join(map(str, meta.preprocessed_shape)):<14} "
          f"{one.seconds[case_id]:7.3f} {t_back:7.3f}")


def check_memory():
  """Planner estimate vs the compiled train step's memory, isotropic patches,
  for every convolution implementation; prints the activation copies each
  step needed (``planning.ACTIVATION_COPIES`` holds the planner's)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from tversky_jax.models import unet3d  # pylint: disable=import-outside-toplevel

  print(f"memory check on {jax.default_backend()} (float32, Adam):")
  for conv_impl in planning.ACTIVATION_COPIES:
    for shape, batch, base, depth in (((32,) * 3, 1, 8, 3), ((64,) * 3, 2, 16, 4)):
      model = unet3d.UNet3D(in_channels=1, num_classes=2, base_features=base,
                            depth=depth, conv_impl=conv_impl,
                            rngs=nnx.Rngs(jax.random.key(0, impl="rbg")))
      optimizer = nnx.Optimizer(model, optax.adam(1e-4), wrt=nnx.Param)
      graphdef, state = nnx.split((model, optimizer))

      def step(state, x, y, graphdef=graphdef):
        model, optimizer = nnx.merge(graphdef, state)
        loss_of = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
        loss, grads = nnx.value_and_grad(loss_of)(model)
        optimizer.update(model, grads)
        return nnx.state((model, optimizer)), loss

      x = jax.ShapeDtypeStruct((batch, *shape, 1), jnp.float32)
      y = jax.ShapeDtypeStruct((batch, *shape), jnp.int32)
      stats = jax.jit(step, donate_argnums=0).lower(state, x, y).compile().memory_analysis()
      real = stats.temp_size_in_bytes + stats.argument_size_in_bytes
      strides = [(2, 2, 2)] * depth
      estimate, params = (planning.estimate_memory_bytes(
          shape, strides, b, 1, 2, base, conv_impl=conv_impl) for b in (batch, 0))
      # The bytes of one copy of the activations, and how many the step needed.
      one_copy = (estimate - params) / planning.ACTIVATION_COPIES[conv_impl]
      print(f"  {conv_impl:7s} patch {shape} batch {batch} base {base} depth {depth}: "
            f"compiled {real / 2**20:.1f} MiB, estimate {estimate / 2**20:.1f} MiB "
            f"(x{estimate / real:.2f}); {(real - params) / one_copy:.1f} activation "
            f"copies (planner: {planning.ACTIVATION_COPIES[conv_impl]})")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data", help="dataset folder (default: Dataset800 or generated)")
  parser.add_argument("--out", help="output folder (default: a temporary one)")
  parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
  parser.add_argument("--check-memory", action="store_true")
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    data = Path(args.data) if args.data else default_dataset(Path(tmp))
    out = Path(args.out) if args.out else Path(tmp) / "preprocessed"
    dataset = nifti.read_dataset(data)
    print(f"{dataset.root.name}: {len(dataset.training_cases)} training cases, "
          f"{os.cpu_count()} CPU(s)")
    plan = bench_plan(dataset, out, args.workers)
    print(f"target spacing {plan.target_spacing}, patch {plan.patch_size}, "
          f"batch {plan.batch_size}")
    bench_preprocess(dataset, plan, out, args.workers)
    if args.check_memory:
      check_memory()


if __name__ == "__main__":
  main()
