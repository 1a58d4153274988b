"""Test setup: four simulated CPU devices, so multi-device code is exercised.

XLA reads its flags when the backend starts, so they must be set before jax
initialises; pytest imports this file before any test module. The train.py
subprocesses of the tests inherit them (``helpers.subprocess_env``).

``--xla_cpu_use_fusion_emitters=false``: XLA:CPU's older fusion emitters
compile the tiny train step about 40 % faster; the tests check results,
never speed. Newer XLA versions (jaxlib 0.12) no longer know the flag, and
XLA aborts the whole process on an unknown flag in ``XLA_FLAGS``, so it is
tried in a subprocess first and set only where this XLA accepts it. The
probe runs once: pytest-xdist's workers inherit the controller's
environment.

Not used on purpose: ``--xla_backend_optimization_level=0`` compiles the
tiny train step about 3x faster, but with it the tiny run's loss turned NaN
at step 3 where the default level trains normally (jaxlib 0.10.2, CPU).
"""

import collections
import os
import subprocess
import sys

_DEVICES_FLAG = "--xla_force_host_platform_device_count=4"
_OPTIONAL_FLAGS = ("--xla_cpu_use_fusion_emitters=false",)
# Set once the probe has run (inherited by pytest-xdist's workers).
_PROBED = "TVERSKY_JAX_TEST_XLA_FLAGS_PROBED"


def _xla_accepts(flag):
  """Whether this jaxlib's XLA starts with ``flag`` in ``XLA_FLAGS``."""
  flags = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
  env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
  try:
    return subprocess.run(
        [sys.executable, "-c", "import jax; jax.devices()"], env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        timeout=300).returncode == 0
  except subprocess.TimeoutExpired:
    return False


def _add_xla_flag(flag):
  if flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " "
                               + flag).strip()


_add_xla_flag(_DEVICES_FLAG)
if _PROBED not in os.environ:
  os.environ[_PROBED] = "1"
  for _flag in _OPTIONAL_FLAGS:
    if _xla_accepts(_flag):
      _add_xla_flag(_flag)
os.environ.setdefault("JAX_PLATFORMS", "cpu")


import pytest  # noqa: E402  (after the XLA flag on purpose)

StraightRun = collections.namedtuple("StraightRun", "step params losses")


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
  """Five 24^3 synthetic phantom cases in the nnU-Net layout."""
  from tversky_jax.data import synthetic  # pylint: disable=import-outside-toplevel
  root = tmp_path_factory.mktemp("data") / "Dataset901_Tiny"
  synthetic.make_synthetic_dataset(root, num_cases=5, shape=(24, 24, 24),
                                   seed=3)
  return str(root)


def _session_folder(tmp_path_factory):
  """A folder all pytest-xdist workers of this test session share."""
  base = tmp_path_factory.getbasetemp()
  # Under pytest-xdist each worker's base temp is <run>/popen-gwN.
  return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def straight_run(tiny_dataset, tmp_path_factory):
  """An uninterrupted 6-step run on all 4 devices: (step, params, losses).

  ``losses`` are the logged training losses (steps 2, 4 and 6).

  Trained once per test session: the first pytest-xdist worker that needs
  it trains while holding a lock and saves the result; the others wait for
  it and read that file (their tiny datasets are identical: same seed).
  """
  # pylint: disable=import-outside-toplevel
  import fcntl
  import json
  import numpy as np
  from tests import helpers
  from tversky_jax import train_lib
  # pylint: enable=import-outside-toplevel
  folder = _session_folder(tmp_path_factory)
  saved = folder / "straight_run.npz"
  with open(folder / "straight_run.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
    if not saved.exists():
      workdir = str(tmp_path_factory.mktemp("straight"))
      config = helpers.tiny_config(tiny_dataset)
      summary = train_lib.train_and_evaluate(config, workdir, progress=False)
      assert summary.step == 6 and not summary.interrupted
      step, params = helpers.saved_params(workdir, config)
      with open(os.path.join(workdir, "metrics.jsonl")) as f:
        losses = [json.loads(line)["train/loss"] for line in f
                  if "train/loss" in line]
      partial = folder / "straight_run.partial.npz"
      np.savez(partial, step, np.array(losses), *params)
      os.replace(partial, saved)
  with np.load(saved) as arrays:
    step, losses, *params = [arrays[f"arr_{i}"]
                             for i in range(len(arrays.files))]
  return StraightRun(int(step), params, losses)


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
  """One persistent XLA compilation cache for the session.

  Many tests compile the same train step (same config, same shapes); with
  the cache each distinct program compiles once per test session, in this
  process, in the other pytest-xdist worker and in the train.py subprocesses
  the tests start.
  """
  import jax  # pylint: disable=import-outside-toplevel
  # The pytest-xdist workers share it. JAX does not write entries atomically,
  # but an entry read while another process writes it fails to decode, and
  # JAX then warns and compiles (jax_raise_persistent_cache_errors is off).
  base = _session_folder(tmp_path_factory)
  path = str(base / "jax_cache")
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = path
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
  # The oneDNN convolution library (models/onednn_conv.py): built once per
  # test session, shared the same way, never in the user's ~/.cache.
  os.environ["TVERSKY_JAX_CACHE"] = str(base / "tversky_jax_cache")
  return path
