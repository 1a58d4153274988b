"""Ours vs PyTorch on the same network and input, in one run.

Usage (torch and MONAI come with the optional extra: pip install -e ".[bench]"):
  python bench/side_by_side.py                      # everything, 5 repeats
  python bench/side_by_side.py --work step32 infer --repeats 7
  python bench/side_by_side.py --memory             # + peak memory per work

Works (each ours vs theirs):
  step32  one training step, batch 2 x 32^3, 3 channels, 2 classes
  step64  one training step, batch 1 x 64^3
  infer   sliding-window inference of a 64x112x128 volume, 64^3 windows,
          overlap 0.5, 4 windows per call, Gaussian blending (ours:
          tversky_jax.inference; theirs: MONAI's sliding_window_inference)
  loss    Tversky loss forward + backward on [2, 128^3, 2] logits (ours:
          tversky_jax.losses; theirs: MONAI's TverskyLoss)

The network is the paper's U-Net (`--model paper`: base 16, depth 4, no
normalisation, Tversky loss) or the default recipe's (`--model default`:
instance norm, Tversky + cross-entropy, gradient clipping); ours is built by
tversky_jax.train_state from that config, theirs is `bench/torch_twin.py`
with our weights copied in, checked before timing: same parameter count,
same logits on the same input. Our train step is the trainer's own jitted,
donated step, with on-device augmentation switched off (the twin has none)
and the host-to-device copy of the batch included. Both sides use Adam.

Timing: every work of both sides is warmed up (compiled) first, then the
repetitions are interleaved (ours, theirs, ours, theirs, ...) so that a
change of machine load hits both; the table gives medians and the ratio
ours / theirs (below 1: we are faster). `--memory` runs each work of each
side again in a fresh process and reports its peak resident memory minus
the process's resident memory just before the work's first call.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from flax import nnx  # noqa: E402

import torch_twin  # noqa: E402
from configs import default as default_config  # noqa: E402
from configs import paper as paper_config  # noqa: E402
from tversky_jax import inference, losses, parallel, train_state  # noqa: E402

WORKS = ("step32", "step64", "infer", "loss")
CHANNELS = 3
STEP_SHAPES = {"step32": (2, (32, 32, 32)), "step64": (1, (64, 64, 64))}
INFER_SHAPE, INFER_WINDOW, INFER_BATCH = (64, 112, 128), (64, 64, 64), 4
LOSS_SHAPE = (2, 128, 128, 128)


def make_config(model: str):
  config = (paper_config if model == "paper" else default_config).get_config()
  config.augment.enabled = False
  config.model.conv_impl = "auto"
  config.optimizer.warmup_steps = 0
  return config


def rss_mb() -> float:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def random_batch(batch: int, shape, seed: int = 0):
  rng = np.random.default_rng(seed)
  image = rng.normal(size=(batch, *shape, CHANNELS)).astype(np.float32)
  label = np.zeros((batch, *shape), np.int32)
  centre = tuple(s // 2 for s in shape)
  label[(slice(None),) + tuple(slice(c - 3, c + 3) for c in centre)] = 1
  return image, label


class Ours:
  """Our model and its jitted functions for one config."""

  def __init__(self, config):
    self.config = config
    self.mesh = parallel.make_mesh()
    self.graphdef, self.state = train_state.create_train_state(
        config, CHANNELS, self.mesh)
    self.model = nnx.merge(self.graphdef, self.state)[0]
    self.logits = train_state.make_logits_fn(self.graphdef)

  def step_fn(self, batch: int, shape):
    step = train_state.make_train_step(
        self.graphdef, train_state.make_loss_fn(self.config), self.mesh)
    image, label = random_batch(batch, shape)
    holder = {"state": jax.tree.map(jnp.copy, self.state)}

    def run():
      arrays = parallel.global_batch({"image": image, "label": label}, self.mesh)
      holder["state"], metrics = step(holder["state"], arrays)
      jax.block_until_ready(metrics)
    return run

  def infer_fn(self):
    volume = np.random.default_rng(1).normal(
        size=(*INFER_SHAPE, CHANNELS)).astype(np.float32)
    logits_fn = lambda x: self.logits(self.state, x)  # noqa: E731
    return lambda: inference.sliding_window_inference(
        logits_fn, volume, window=INFER_WINDOW, overlap=0.5,
        batch_size=INFER_BATCH)


class Theirs:
  """The PyTorch twin of ``Ours`` with the same weights."""

  def __init__(self, ours: Ours):
    self.config = ours.config
    self.model = torch_twin.twin_of(ours.model)

  def loss(self, logits, labels):
    cfg = self.config.loss
    loss = torch_twin.tversky_loss(logits, labels, cfg.alpha, cfg.beta,
                                   cfg.smooth)
    if cfg.name == "tversky_ce":
      loss = loss + cfg.ce_weight * torch.nn.functional.cross_entropy(
          logits, labels.long())
    return loss

  def step_fn(self, batch: int, shape):
    image, label = random_batch(batch, shape)
    x = torch_twin.to_torch(image)
    y = torch.from_numpy(label)
    optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-4)
    clip = self.config.optimizer.grad_clip_norm

    def run():
      optimizer.zero_grad(set_to_none=True)
      loss = self.loss(self.model(x), y)
      loss.backward()
      if clip > 0:
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
      optimizer.step()
    return run

  def infer_fn(self):
    from monai.inferers import sliding_window_inference
    volume = np.random.default_rng(1).normal(
        size=(*INFER_SHAPE, CHANNELS)).astype(np.float32)
    x = torch_twin.to_torch(volume[None])
    model = self.model.eval()

    def run():
      with torch.inference_mode():
        logits = sliding_window_inference(
            x, INFER_WINDOW, INFER_BATCH, model, overlap=0.5, mode="gaussian",
            sigma_scale=0.125)
        return torch.softmax(logits, dim=1)
    return run


def loss_fns():
  """Our Tversky loss and MONAI's, forward + backward on the same logits."""
  from monai.losses import TverskyLoss
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(*LOSS_SHAPE, 2)).astype(np.float32)
  labels = (rng.random(LOSS_SHAPE) < 0.01).astype(np.int32)
  grad = jax.jit(jax.value_and_grad(
      lambda p, y: losses.tversky_loss(p, y, alpha=0.3, beta=0.7)))
  p, y = jnp.asarray(logits), jnp.asarray(labels)
  ours = lambda: jax.block_until_ready(grad(p, y))  # noqa: E731
  monai_loss = TverskyLoss(softmax=True, to_onehot_y=True,
                           include_background=False, alpha=0.3, beta=0.7)
  t_logits = torch.from_numpy(logits).permute(0, 4, 1, 2, 3).contiguous()
  t_labels = torch.from_numpy(labels)[:, None]

  def theirs():
    q = t_logits.detach().requires_grad_(True)
    monai_loss(q, t_labels).backward()
  return ours, theirs


def check_twin(ours: Ours, theirs: Theirs) -> str:
  """Same parameter count and logits; raises if not. Returns a summary."""
  n_ours = sum(x.size for x in jax.tree.leaves(nnx.state(ours.model, nnx.Param)))
  n_theirs = torch_twin.num_parameters(theirs.model)
  if n_ours != n_theirs:
    raise SystemExit(f"parameter counts differ: ours {n_ours}, twin {n_theirs}")
  image, _ = random_batch(1, (32, 32, 32), seed=3)
  a = np.asarray(ours.logits(ours.state, jnp.asarray(image)))
  with torch.no_grad():
    b = theirs.model.eval()(torch_twin.to_torch(image)).permute(0, 2, 3, 4, 1)
  diff = float(np.max(np.abs(a - b.numpy())) / np.max(np.abs(a)))
  if not diff < 1e-3:
    raise SystemExit(f"twin logits differ from ours: max rel. diff {diff:.2e}")
  return f"{n_ours:,} parameters each; logits max |diff| / max |logit| = {diff:.1e}"


def make_works(model: str, works) -> tuple[dict, str]:
  """``{(work, side): callable}`` for the requested works, and the twin check."""
  ours = Ours(make_config(model))
  theirs = Theirs(ours)
  summary = check_twin(ours, theirs)
  fns = {}
  for work in works:
    if work in STEP_SHAPES:
      fns[work, "ours"] = ours.step_fn(*STEP_SHAPES[work])
      fns[work, "torch"] = theirs.step_fn(*STEP_SHAPES[work])
    elif work == "infer":
      fns[work, "ours"], fns[work, "torch"] = ours.infer_fn(), theirs.infer_fn()
    elif work == "loss":
      fns[work, "ours"], fns[work, "torch"] = loss_fns()
  return fns, summary


def time_interleaved(fns: dict, repeats: int) -> dict:
  for fn in fns.values():  # compile / warm up
    fn()
  times = {key: [] for key in fns}
  for _ in range(repeats):
    for key, fn in fns.items():
      start = time.perf_counter()
      fn()
      times[key].append(time.perf_counter() - start)
  return times


def memory_of(model: str, work: str, side: str) -> float:
  """Peak RSS growth (MB) of one work on one side, in a fresh process."""
  out = subprocess.run(
      [sys.executable, __file__, "--model", model, "--one", f"{work}:{side}"],
      capture_output=True, text=True, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]


def run_one(model: str, spec: str) -> None:
  work, side = spec.split(":")
  fns, _ = make_works(model, [work])
  fn = fns[work, side]
  base = rss_mb()
  fn()
  fn()
  print(json.dumps({"peak_mb": peak_rss_mb() - base}))


def header() -> str:
  return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} "
          f"cores, load {os.getloadavg()[0]:.2f}; jax {jax.__version__} "
          f"({jax.devices()[0].platform}), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads)")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="paper", choices=("paper", "default"))
  parser.add_argument("--work", nargs="+", default=list(WORKS), choices=WORKS)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--memory", action="store_true")
  parser.add_argument("--one", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.one:
    return run_one(args.model, args.one)
  print(header())
  fns, summary = make_works(args.model, args.work)
  print(f"model {args.model}: {summary}")
  times = time_interleaved(fns, args.repeats)
  print(f"median of {args.repeats} interleaved repetitions, load after "
        f"{os.getloadavg()[0]:.2f}")
  print(f"{'work':8s} {'ours_ms':>9s} {'torch_ms':>9s} {'ratio':>6s}"
        + (f" {'ours_MB':>8s} {'torch_MB':>8s}" if args.memory else ""))
  for work in args.work:
    a, b = (float(np.median(times[work, s])) * 1e3 for s in ("ours", "torch"))
    line = f"{work:8s} {a:9.1f} {b:9.1f} {a / b:6.2f}"
    if args.memory:
      line += (f" {memory_of(args.model, work, 'ours'):8.0f}"
               f" {memory_of(args.model, work, 'torch'):8.0f}")
    print(line, flush=True)


if __name__ == "__main__":
  main()
