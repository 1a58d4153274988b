"""Device mesh and shardings for data-parallel training.

All devices of all processes form a 1-D mesh with axis ``"data"``. The global
batch is split along its first axis over that axis; parameters and optimizer
state are replicated. ``jax.jit`` with these shardings is data parallelism as
XLA does it today: each device computes the gradient of its shard and the
compiler inserts the all-reduce (``jax.pmap`` is a legacy layer over the same
machinery).
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import jax
from jax.experimental import multihost_utils
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh named ``"data"`` over ``devices`` (default: all devices)."""
  devices = list(jax.devices() if devices is None else devices)
  return jax.make_mesh((len(devices),), (DATA_AXIS,),
                       axis_types=(AxisType.Auto,), devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
  """Sharding of parameters and optimizer state: a full copy per device."""
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of a batch: split along axis 0 over the ``"data"`` axis."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh
                 ) -> dict[str, jax.Array]:
  """Assembles the global batch from this process's share.

  Each process passes its ``global_batch_size / process_count`` examples;
  the result is one global ``jax.Array`` per key, sharded over ``"data"``.
  With a single process this is a plain sharded ``device_put``.
  """
  sharding = batch_sharding(mesh)
  return {key: jax.make_array_from_process_local_data(sharding, value)
          for key, value in local_batch.items()}


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places every array of ``tree`` on every device of ``mesh``."""
  return jax.device_put(tree, replicated(mesh))


def localize(tree: Any, mesh: Mesh) -> Any:
  """A copy of a replicated ``tree`` on this process's ``mesh``.

  Every leaf of ``tree`` must be fully replicated (parameters); the copy is
  taken from the first device this process holds, so it also works when the
  global arrays span devices of other processes.
  """
  sharding = replicated(mesh)
  return jax.tree.map(
      lambda x: jax.device_put(x.addressable_data(0), sharding), tree)


def _env_count(name: str) -> int:
  try:
    return int(os.environ.get(name, "1").split("(")[0])
  except ValueError:
    return 1


def cluster_job_detected() -> bool:
  """Whether the environment describes a job of several processes.

  Looks at the variables set by SLURM (``SLURM_NTASKS`` or
  ``SLURM_STEP_NUM_TASKS`` > 1), Open MPI (``OMPI_COMM_WORLD_SIZE`` > 1),
  Cloud TPU pods (several ``TPU_WORKER_HOSTNAMES``) and Kubernetes JobSets or
  indexed Jobs launched with ``JAX_COORDINATOR_ADDRESS``.
  """
  return (_env_count("SLURM_STEP_NUM_TASKS") > 1
          or _env_count("SLURM_NTASKS") > 1
          or _env_count("OMPI_COMM_WORLD_SIZE") > 1
          or "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
          or "JAX_COORDINATOR_ADDRESS" in os.environ)


def initialize_distributed(mode: str = "auto", *,
                           coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None,
                           local_device_ids: Sequence[int] | None = None
                           ) -> bool:
  """Starts JAX's multi-controller runtime when the job spans processes.

  Must run before anything else touches the devices.

  Args:
    mode: "auto" starts it when a coordinator is given or
      :func:`cluster_job_detected`; "on" always (JAX then auto-detects SLURM,
      Open MPI, Kubernetes or Cloud TPU unless the arguments are given); "off"
      never.
    coordinator_address: ``host:port`` of process 0, for clusters JAX does not
      detect; then ``num_processes`` and ``process_id`` are needed too.
    num_processes: total number of processes.
    process_id: this process's index in ``[0, num_processes)``.
    local_device_ids: the local accelerators this process drives. On SLURM,
      JAX assumes one process per GPU; with one process per node list all of
      the node's GPUs, e.g. ``0,1,2,3``.

  Returns:
    True when the distributed runtime was started.

  Right after starting, all processes run one tiny collective over all
  devices, while they are still in step: on CPU, gloo sets up its
  communicator at the first collective and gives the other processes only
  30 s to arrive (not configurable), which a first train step whose
  compilation takes longer in one process than in another would miss. Later
  collectives over the same devices reuse the communicator and wait as long
  as needed.
  """
  if mode not in ("auto", "on", "off"):
    raise ValueError(f"distributed mode must be auto, on or off, got {mode!r}.")
  explicit = coordinator_address is not None
  if mode == "off" or (mode == "auto" and not explicit and
                       not cluster_job_detected()):
    return False
  if explicit and (num_processes is None or process_id is None):
    raise ValueError("--coordinator needs --num_processes and --process_id.")
  jax.distributed.initialize(
      coordinator_address=coordinator_address, num_processes=num_processes,
      process_id=process_id,
      local_device_ids=list(local_device_ids) if local_device_ids else None)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("tversky_jax: processes started")
  return True
