"""Ours vs PyTorch on the same network and input, in one run.

Usage (torch and MONAI come with the optional extra: pip install -e ".[bench]"):
  python bench/side_by_side.py                      # the CPU works, 5 repeats
  python bench/side_by_side.py --work step32 infer --repeats 7
  python bench/side_by_side.py --memory             # + peak memory per work
  python bench/side_by_side.py --work whole step128 infer_whole \
      --dtype bfloat16 --memory                     # GPU sizes (gpu_side_by_side.sh)

Works (each ours vs theirs):
  step32  one training step, batch 2 x 32^3, 3 channels, 2 classes
  step64  one training step, batch 1 x 64^3
  infer   sliding-window inference of a 64x112x128 volume, 64^3 windows,
          overlap 0.5, 4 windows per call, Gaussian blending (ours:
          tversky_jax.inference; theirs: MONAI's sliding_window_inference)
  loss    Tversky loss forward + backward on [2, 128^3, 2] logits (ours:
          tversky_jax.losses; theirs: MONAI's TverskyLoss)
  whole   one training step on the paper's whole volume, 1 x 128x224x256
  step128 one training step, batch 2 x 128^3
  infer_whole  sliding-window inference of a 128x224x256 volume, 128^3
          windows, overlap 0.5, 2 windows per call

With ``--dtype bfloat16`` our layers compute in bfloat16 (parameters and the
loss stay float32) and the twin runs under ``torch.autocast(bfloat16)``.
On a GPU both sides run there (torch on "cuda" when jax's backend is a GPU).

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
side again in a fresh process: on CPU once to warm up (compilation is not
counted), then the peak resident memory of a second call minus the resident
memory just before it (for our train steps: the compiled step's temporary
buffer, see ``run_one``); on a GPU the device's peak allocation minus what
was allocated before the first call. For train steps on CPU the table adds
what each side holds between steps (``*_held``: parameters and Adam's
moments, and PyTorch's ``.grad``, which its growth leaves out while ours are
in the step's buffer): held + growth is the peak of training.
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

CPU_WORKS = ("step32", "step64", "infer", "loss")
WORKS = CPU_WORKS + ("whole", "step128", "infer_whole")
CHANNELS = 3
STEP_SHAPES = {"step32": (2, (32, 32, 32)), "step64": (1, (64, 64, 64)),
               "whole": (1, (128, 224, 256)), "step128": (2, (128, 128, 128))}
# volume, window, windows per call
INFER = {"infer": ((64, 112, 128), (64, 64, 64), 4),
         "infer_whole": ((128, 224, 256), (128, 128, 128), 2)}
LOSS_SHAPE = (2, 128, 128, 128)
ON_GPU = jax.default_backend() == "gpu"
TORCH_DEVICE = torch.device("cuda" if ON_GPU and torch.cuda.is_available()
                            else "cpu")
# cuDNN picks its fastest algorithms for the fixed shapes, as a PyTorch user
# would have it.
torch.backends.cudnn.benchmark = TORCH_DEVICE.type == "cuda"


def make_config(model: str, dtype: str = "float32"):
  config = (paper_config if model == "paper" else default_config).get_config()
  config.augment.enabled = False
  config.model.conv_impl = "auto"
  config.model.dtype = dtype
  config.optimizer.warmup_steps = 0
  return config


def sync() -> None:
  if TORCH_DEVICE.type == "cuda":
    torch.cuda.synchronize()


def rss_mb() -> float:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
  """Peak resident memory since the last ``reset_peak_rss`` (VmHWM)."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) / 1024
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> None:
  """Forgets the peak resident memory of the set-up (building both models,
  checking the twin) so that only the work's own peak counts (Linux)."""
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")


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
        self.graphdef, train_state.weighted_loss_fn(self.config), self.mesh)
    loss_args = train_state.loss_args(self.config)
    image, label = random_batch(batch, shape)
    holder = {"state": jax.tree.map(jnp.copy, self.state)}

    def run():
      arrays = parallel.global_batch({"image": image, "label": label}, self.mesh)
      holder["state"], metrics = step(holder["state"], arrays, loss_args)
      jax.block_until_ready(metrics)

    def temp_bytes():
      arrays = parallel.global_batch({"image": image, "label": label}, self.mesh)
      compiled = step.lower(holder["state"], arrays, loss_args).compile()
      return compiled.memory_analysis().temp_size_in_bytes

    def held_bytes():  # parameters and Adam's moments (gradients: temp)
      return sum(x.nbytes for x in jax.tree.leaves(holder["state"]))

    run.temp_bytes = temp_bytes
    run.held_bytes = held_bytes
    return run

  def infer_fn(self, work: str):
    shape, window, batch = INFER[work]
    volume = np.random.default_rng(1).normal(
        size=(*shape, CHANNELS)).astype(np.float32)
    logits_fn = lambda x: self.logits(self.state, x)  # noqa: E731
    return lambda: inference.sliding_window_inference(
        logits_fn, volume, window=window, overlap=0.5, batch_size=batch)


class Theirs:
  """The PyTorch twin of ``Ours`` with the same weights."""

  def __init__(self, ours: Ours):
    self.config = ours.config
    self.model = torch_twin.twin_of(ours.model).to(TORCH_DEVICE)
    self.autocast = torch.autocast(
        TORCH_DEVICE.type, dtype=torch.bfloat16,
        enabled=ours.config.model.dtype == "bfloat16")

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
    x = torch_twin.to_torch(image).to(TORCH_DEVICE)
    y = torch.from_numpy(label).to(TORCH_DEVICE)
    optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-4)
    clip = self.config.optimizer.grad_clip_norm

    def run():
      optimizer.zero_grad(set_to_none=True)
      with self.autocast:
        logits = self.model(x)
      loss = self.loss(logits.float(), y)
      loss.backward()
      if clip > 0:
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
      optimizer.step()
      sync()

    def held_bytes():  # parameters, their .grad and Adam's moments
      tensors = list(self.model.parameters())
      tensors += [p.grad for p in tensors if p.grad is not None]
      tensors += [v for state in optimizer.state.values()
                  for v in state.values() if torch.is_tensor(v)]
      return sum(t.numel() * t.element_size() for t in tensors)

    run.held_bytes = held_bytes
    return run

  def infer_fn(self, work: str):
    from monai.inferers import sliding_window_inference
    shape, window, batch = INFER[work]
    volume = np.random.default_rng(1).normal(
        size=(*shape, CHANNELS)).astype(np.float32)
    x = torch_twin.to_torch(volume[None])  # on the host, like ours
    model = self.model.eval()

    def run():
      with torch.inference_mode(), self.autocast:
        logits = sliding_window_inference(
            x, window, batch, model, overlap=0.5, mode="gaussian",
            sigma_scale=0.125, sw_device=TORCH_DEVICE, device="cpu")
        probs = torch.softmax(logits.float(), dim=1)
      sync()
      return probs
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
  t_logits = t_logits.to(TORCH_DEVICE)
  t_labels = torch.from_numpy(labels)[:, None].to(TORCH_DEVICE)

  def theirs():
    q = t_logits.detach().requires_grad_(True)
    monai_loss(q, t_labels).backward()
    sync()
  return ours, theirs


def check_twin(ours: Ours, theirs: Theirs) -> str:
  """Same parameter count and logits; raises if not. Returns a summary."""
  n_ours = sum(x.size for x in jax.tree.leaves(nnx.state(ours.model, nnx.Param)))
  n_theirs = torch_twin.num_parameters(theirs.model)
  if n_ours != n_theirs:
    raise SystemExit(f"parameter counts differ: ours {n_ours}, twin {n_theirs}")
  image, _ = random_batch(1, (32, 32, 32), seed=3)
  a = np.asarray(ours.logits(ours.state, jnp.asarray(image)))
  with torch.no_grad(), theirs.autocast:
    b = theirs.model.eval()(torch_twin.to_torch(image).to(TORCH_DEVICE))
  b = b.float().permute(0, 2, 3, 4, 1).cpu().numpy()
  diff = float(np.max(np.abs(a - b)) / np.max(np.abs(a)))
  tolerance = 1e-3 if ours.config.model.dtype == "float32" else 5e-2
  if not diff < tolerance:
    raise SystemExit(f"twin logits differ from ours: max rel. diff {diff:.2e}")
  return (f"{n_ours:,} parameters each; logits max |diff| / max |logit| = "
          f"{diff:.1e}; our convolutions: {ours.model.conv_impl}")


def make_works(model: str, works, dtype: str = "float32") -> tuple[dict, str]:
  """``{(work, side): callable}`` for the requested works, and the twin check."""
  ours = Ours(make_config(model, dtype))
  theirs = Theirs(ours)
  summary = check_twin(ours, theirs)
  fns = {}
  for work in works:
    if work in STEP_SHAPES:
      fns[work, "ours"] = ours.step_fn(*STEP_SHAPES[work])
      fns[work, "torch"] = theirs.step_fn(*STEP_SHAPES[work])
    elif work in INFER:
      fns[work, "ours"] = ours.infer_fn(work)
      fns[work, "torch"] = theirs.infer_fn(work)
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


def memory_of(model: str, work: str, side: str, dtype: str) -> dict:
  """``{"peak_mb": growth[, "held_mb": training state]}`` (MB) of one work
  on one side, in a fresh process (see ``run_one``)."""
  # glibc keeps freed memory mapped (its mmap threshold grows with use), so
  # a second call could reuse the first call's pages unseen; a fixed
  # threshold returns every large buffer to the system when it is freed,
  # and the resident memory then follows what both sides hold.
  env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
  out = subprocess.run(
      [sys.executable, __file__, "--model", model, "--dtype", dtype,
       "--one", f"{work}:{side}"], capture_output=True, text=True, check=True,
      env=env)
  return json.loads(out.stdout.strip().splitlines()[-1])


def device_mb(side: str, peak: bool) -> float:
  """The accelerator's allocated (or peak allocated) memory of one side."""
  if side == "torch":
    value = (torch.cuda.max_memory_allocated() if peak
             else torch.cuda.memory_allocated())
  else:
    stats = jax.devices()[0].memory_stats()
    value = stats["peak_bytes_in_use" if peak else "bytes_in_use"]
  return value / 2**20


def run_one(model: str, spec: str, dtype: str) -> None:
  """Prints the peak memory growth of one work on one side as JSON.

  CPU: the work runs once first (compilation, first-call allocations), then
  the peak resident memory is reset and the growth during a second call over
  the memory held before it is reported. XLA:CPU keeps a train step's
  temporary buffer from one call to the next, so a second call's growth
  misses it: for our train steps the compiled step's own figure is reported
  instead (``memory_analysis().temp_size_in_bytes``, what one step allocates
  beyond its inputs and donated outputs). GPU: the device's peak allocation
  over two calls minus what was allocated before them (JAX's peak cannot be
  reset).

  For train steps on CPU also ``held_mb``, the training state each side
  holds between steps, which the growth leaves out: parameters and Adam's
  moments, and for PyTorch the parameters' ``.grad`` too (``zero_grad``
  frees them and the step allocates them again, so they are in the
  resident memory before and after it; ours are in the step's temporary
  buffer). ``held_mb + peak_mb`` compares the peaks of training.
  """
  work, side = spec.split(":")
  fns, _ = make_works(model, [work], dtype)
  fn = fns[work, side]
  held = {}
  if not ON_GPU and work in STEP_SHAPES:
    fn()
    held = {"held_mb": fn.held_bytes() / 2**20}
    if side == "ours":
      print(json.dumps({"peak_mb": fn.temp_bytes() / 2**20, **held}))
      return
  if ON_GPU:
    if side == "torch":
      torch.cuda.reset_peak_memory_stats()
    base = device_mb(side, peak=False)
    fn()
  else:
    fn()
    reset_peak_rss()
    base = rss_mb()
  fn()
  peak = device_mb(side, peak=True) if ON_GPU else peak_rss_mb()
  print(json.dumps({"peak_mb": peak - base, **held}))


def header() -> str:
  return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} "
          f"cores, load {os.getloadavg()[0]:.2f}; jax {jax.__version__} "
          f"({jax.devices()[0].device_kind}), torch {torch.__version__} "
          f"({TORCH_DEVICE}, {torch.get_num_threads()} threads)")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="paper", choices=("paper", "default"))
  parser.add_argument("--work", nargs="+", default=list(CPU_WORKS),
                      choices=WORKS)
  parser.add_argument("--dtype", default="float32",
                      choices=("float32", "bfloat16"))
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--memory", action="store_true")
  parser.add_argument("--one", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.one:
    return run_one(args.model, args.one, args.dtype)
  print(header())
  fns, summary = make_works(args.model, args.work, args.dtype)
  print(f"model {args.model}, {args.dtype}: {summary}")
  times = time_interleaved(fns, args.repeats)
  print(f"median of {args.repeats} interleaved repetitions, load after "
        f"{os.getloadavg()[0]:.2f}")
  print(f"{'work':8s} {'ours_ms':>9s} {'torch_ms':>9s} {'ratio':>6s}"
        + (f" {'ours_MB':>8s} {'torch_MB':>8s} {'ours_held':>9s}"
           f" {'torch_held':>10s}" if args.memory else ""))
  for work in args.work:
    a, b = (float(np.median(times[work, s])) * 1e3 for s in ("ours", "torch"))
    line = f"{work:8s} {a:9.1f} {b:9.1f} {a / b:6.2f}"
    if args.memory:
      mem = [memory_of(args.model, work, side, args.dtype)
             for side in ("ours", "torch")]
      line += "".join(f" {m['peak_mb']:8.0f}" for m in mem)
      line += "".join(f" {m['held_mb']:{w}.0f}" if "held_mb" in m
                      else f" {'-':>{w}s}" for m, w in zip(mem, (9, 10)))
    print(line, flush=True)


if __name__ == "__main__":
  main()
