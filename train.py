"""Trains the 3D U-Net of Salehi et al. (2017) with the Tversky loss.

  python train.py --config configs/demo.py --workdir runs/demo
  python train.py --config configs/paper.py --config.data.root=DATA \
      --config.loss.beta=0.8

Running the same command again resumes from the latest checkpoint in the
workdir. Ctrl-C or SIGTERM saves a checkpoint and exits.
"""

import os
import sys

import jax
from absl import app
from absl import flags
from absl import logging

from tversky_jax import cli
from tversky_jax import parallel

_CONFIG = cli.define_config_file("configs/demo.py",
                                  "Training configuration file.")
_WORKDIR = flags.DEFINE_string(
    "workdir", None,
    "Directory for checkpoints and metrics (default: runs/<config name>). In "
    "a multi-host job it must be on a file system all hosts share.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "on", "off"],
    "Start JAX's multi-process runtime: auto = when a coordinator is given or "
    "this process is one of several started by srun (a SLURM job step), Open "
    "MPI or a TPU pod; a batch script or salloc shell alone runs one process.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator", None, "host:port of process 0 (clusters JAX does not "
    "auto-detect); needs --num_processes and --process_id.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None,
                                      "Number of processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None,
                                   "Index of this process.")
_LOCAL_DEVICE_IDS = flags.DEFINE_list(
    "local_device_ids", None, "Local accelerators of this process, e.g. "
    "0,1,2,3 for one process per 4-GPU SLURM node (JAX otherwise assumes one "
    "process per GPU).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  # orbax logs every save at INFO level; keep the terminal for the progress
  # bar and for what the user needs to act on.
  logging.set_verbosity(logging.ERROR)
  try:
    parallel.initialize_distributed(
        _DISTRIBUTED.value, coordinator_address=_COORDINATOR.value,
        num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value,
        local_device_ids=[int(i) for i in _LOCAL_DEVICE_IDS.value or []])
  except ValueError as error:
    sys.exit(f"error: {error}")
  config = cli.load_config(_CONFIG, flags.FLAGS["config"].config_filename)
  # Imported once the flags and the config are known to be good: a mistyped
  # flag is reported without loading orbax, grain and the trainer (~1.5 s).
  # pylint: disable=g-import-not-at-top
  from tversky_jax import train_lib
  # pylint: enable=g-import-not-at-top
  workdir = _WORKDIR.value or os.path.join(
      "runs", os.path.splitext(os.path.basename(
          flags.FLAGS["config"].config_filename))[0])
  try:
    summary = train_lib.train_and_evaluate(config, workdir)
  except train_lib.USER_ERRORS as error:
    sys.exit(f"error: {error}")
  if not summary.interrupted and jax.process_index() == 0:
    print(f"Done: {summary.step} steps, workdir {os.path.abspath(workdir)}")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
