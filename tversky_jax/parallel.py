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
import sys
import threading
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


DEFAULT_INIT_TIMEOUT_S = 300
# jax.distributed.initialize gets this much longer than our own deadline, so
# that our one-line error comes first: JAX itself ends a start that timed out
# with a C++ check failure and a stack trace that name no missing process.
_JAX_TIMEOUT_MARGIN_S = 30
# (name, rank variable, size variable) of the launchers JAX auto-detects, in
# the order JAX tries them, with the variables it reads; only for the
# start-up line.
_LAUNCHERS = (("Open MPI", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
              ("SLURM step", "SLURM_PROCID", "SLURM_NTASKS"))


def _env_count(name: str) -> int:
  try:
    return int(os.environ.get(name, "1").split("(")[0])
  except ValueError:
    return 1


def _slurm_step_tasks() -> int:
  """The task count of the srun job step this process is a task of, else 1.

  srun sets ``SLURM_STEP_NUM_TASKS`` (with ``SLURM_STEP_ID``) and the task's
  ``SLURM_PROCID`` in every task it starts. A batch script or an ``salloc``
  shell has ``SLURM_NTASKS``, the allocation's task count, but runs as one
  process: ``SLURM_STEP_NUM_TASKS`` is unset there, or 1 in the one-task
  interactive step of ``salloc``. Where JAX's own SLURM detection applies
  (``SLURM_JOB_ID``, ``SLURM_STEP_NODELIST``, ``SLURM_PROCID`` and
  ``SLURM_LOCALID`` set), it takes ``SLURM_NTASKS`` as the process count, and
  there it would wait for tasks nobody starts.
  """
  if "SLURM_PROCID" not in os.environ:
    return 1
  return _env_count("SLURM_STEP_NUM_TASKS")


def cluster_job_detected() -> bool:
  """Whether this process was launched as one of several processes of a job.

  True for a task of a SLURM job step of several tasks (``srun``:
  ``SLURM_STEP_NUM_TASKS`` > 1 and ``SLURM_PROCID`` set; ``SLURM_NTASKS``
  alone, as in a batch script or an ``salloc`` shell, does not count), Open
  MPI (``OMPI_COMM_WORLD_SIZE`` > 1), Cloud TPU pods (several
  ``TPU_WORKER_HOSTNAMES``) and Kubernetes JobSets or indexed Jobs launched
  with ``JAX_COORDINATOR_ADDRESS``.
  """
  return (_slurm_step_tasks() > 1
          or _env_count("OMPI_COMM_WORLD_SIZE") > 1
          or "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
          or "JAX_COORDINATOR_ADDRESS" in os.environ)


def _this_process(num_processes: int | None, process_id: int | None) -> str:
  """"process I of N" from the arguments or the launcher's variables."""
  if process_id is not None:
    return f"process {process_id} of {num_processes}"
  for name, rank, size in _LAUNCHERS:
    if _env_count(size) > 1 and rank in os.environ:
      return f"process {os.environ[rank]} of {_env_count(size)} ({name})"
  return "this process"


def _abort(message: str) -> None:
  """Writes ``message`` to stderr and ends the process with status 1 at once.

  Called by the start-up watchdog thread while the main thread is blocked in
  JAX's C++ start-up, which no exception would interrupt.
  """
  sys.stderr.write(message + "\n")
  sys.stderr.flush()
  os._exit(1)  # pylint: disable=protected-access


def _start(timeout_s: float, **kwargs) -> None:
  """``jax.distributed.initialize(**kwargs)``, saying on stderr what it waits
  for; after ``timeout_s`` seconds without all processes, a one-line error
  and exit status 1."""
  who = _this_process(kwargs["num_processes"], kwargs["process_id"])
  where = (kwargs["coordinator_address"]
           or os.environ.get("JAX_COORDINATOR_ADDRESS")
           or "the address JAX derives from the environment")
  print(f"Starting JAX's distributed runtime: {who}, waiting up to "
        f"{timeout_s:g} s for the others at {where}...", file=sys.stderr,
        flush=True)
  watchdog = threading.Timer(timeout_s, _abort, args=(
      f"error: JAX's distributed runtime did not start within {timeout_s:g} "
      f"s: {who} waited for the others at {where}, and not all came. Every "
      "process that starts prints a \"Starting JAX's distributed runtime\" "
      f"line; those missing were not launched or cannot reach {where}.",))
  watchdog.daemon = True
  watchdog.start()
  try:
    jax.distributed.initialize(
        **kwargs,
        initialization_timeout=int(timeout_s) + _JAX_TIMEOUT_MARGIN_S)
  finally:
    watchdog.cancel()


def _note_single_process_in_slurm_job() -> None:
  """Tells on stderr why an allocation of several tasks runs one process."""
  tasks = _env_count("SLURM_NTASKS")
  if tasks > 1:
    print(f"note: SLURM_NTASKS={tasks}, but this process is no task of an "
          "srun job step of several tasks, so it trains alone: `python "
          "train.py` does not start the job's other tasks; run `srun python "
          "train.py ...` for one process per task.", file=sys.stderr,
          flush=True)


def initialize_distributed(mode: str = "auto", *,
                           coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None,
                           local_device_ids: Sequence[int] | None = None,
                           initialization_timeout: float = (
                               DEFAULT_INIT_TIMEOUT_S)
                           ) -> bool:
  """Starts JAX's multi-controller runtime when the job spans processes.

  Must run before anything else touches the devices.

  Args:
    mode: "auto" starts it when a coordinator is given or
      :func:`cluster_job_detected`; "on" always (JAX then auto-detects SLURM,
      Open MPI, Kubernetes or Cloud TPU unless the arguments are given); "off"
      never. In "auto" mode inside a SLURM allocation of several tasks but
      outside an srun step, a note on stderr says that only this process
      runs.
    coordinator_address: ``host:port`` of process 0, for clusters JAX does not
      detect; then ``num_processes`` and ``process_id`` are needed too.
    num_processes: total number of processes.
    process_id: this process's index in ``[0, num_processes)``.
    local_device_ids: the local accelerators this process drives. On SLURM,
      JAX assumes one process per GPU; with one process per node list all of
      the node's GPUs, e.g. ``0,1,2,3``.
    initialization_timeout: seconds to wait for all processes to connect.
      Each process says on stderr what it waits for; when the time is up it
      prints a one-line error and exits with status 1.

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
  if mode == "off":
    return False
  if mode == "auto" and not explicit and not cluster_job_detected():
    _note_single_process_in_slurm_job()
    return False
  if explicit and (num_processes is None or process_id is None):
    raise ValueError("--coordinator needs --num_processes and --process_id.")
  _start(initialization_timeout,
         coordinator_address=coordinator_address,
         num_processes=num_processes, process_id=process_id,
         local_device_ids=list(local_device_ids) if local_device_ids else None)
  if jax.process_count() > 1:
    _no_persistent_cache_on_cpu()
    multihost_utils.sync_global_devices("tversky_jax: processes started")
  return True


def _no_persistent_cache_on_cpu() -> None:
  """Turns JAX's persistent compilation cache off in a multi-process CPU job.

  With jaxlib 0.12, processes that load a multi-process CPU program from
  the cache (all but the first run of it) hang in its first collective:
  the deserialised executable does not take up this process's place in the
  job (cf. openxla/xla#18286 for the same class of bug on GPU). Compiling
  costs seconds; a hang costs the job.
  """
  if jax.default_backend() == "cpu" and jax.config.jax_enable_compilation_cache:
    jax.config.update("jax_enable_compilation_cache", False)
    if jax.config.jax_compilation_cache_dir and jax.process_index() == 0:
      print("note: JAX's persistent compilation cache is off in this "
            "multi-process CPU job (cached multi-process CPU programs hang "
            "on load).", file=sys.stderr, flush=True)
