"""Shared pieces of the trainer tests: a tiny config and reading checkpoints."""

import os

import jax
import numpy as np

from tversky_jax import train_state
from tversky_jax import checkpoint
from tversky_jax import parallel
# Re-exported: the tests take it from here with the other helpers.
from tests.tiny_config import tiny_config  # noqa: F401

# The repository root: where train.py is, the working directory of the
# subprocesses the tests start.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def normal(seed, shape):
  """``jax.random.normal(jax.random.key(seed), shape)``, the same values,
  drawn flat and reshaped: XLA:CPU compiles a 5-D draw in seconds per
  shape, a flat one in a fraction of that."""
  size = int(np.prod(shape))
  return jax.random.normal(jax.random.key(seed), (size,)).reshape(shape)


def subprocess_env(devices=4):
  """The environment for a train.py subprocess: CPU, ``devices`` simulated
  devices, the other XLA flags of conftest (and its compilation cache)."""
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  flags.append(f"--xla_force_host_platform_device_count={devices}")
  return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join(flags))


def tiny_train_flags(dataset_root, workdir, **overrides):
  """train.py flags for ``tiny_config(dataset_root)`` plus dotted overrides."""
  return (["--config", f"tests/tiny_config.py:{dataset_root}",
           f"--workdir={workdir}"]
          + [f"--config.{key}={value}" for key, value in overrides.items()])


def saved_params(workdir, config, step=None):
  """(step, flat list of arrays) of the train state saved in ``workdir``."""
  mesh = parallel.make_mesh(jax.devices()[:1])
  # The restore target: shapes only, nothing initialised or compiled.
  shapes = jax.eval_shape(
      lambda: train_state.create_train_state(config, 3, mesh)[1])
  manager = checkpoint.CheckpointManager(
      os.path.join(workdir, "checkpoints"), async_save=False)
  restored = manager.restore(
      jax.tree.map(lambda x: jax.ShapeDtypeStruct(
          x.shape, x.dtype, sharding=parallel.replicated(mesh)), shapes),
      step=step)
  manager.close()
  assert restored is not None, f"no checkpoint in {workdir}"
  return restored.step, [np.asarray(x) for x in jax.tree.leaves(restored.state)]
